//! The error type of the generator crate.

/// What can go wrong producing rollouts. Messages name the field or the peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Rpc(String),
    #[error(transparent)]
    Model(#[from] tandem_model::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}
