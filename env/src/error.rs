//! The error type of the environment crate.

/// What can go wrong running episodes. Messages name the section, the field or the
/// peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting, a request or a peer's answer that cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// A connection or a call that failed.
    #[error("{0}")]
    Rpc(String),
    #[error(transparent)]
    Model(#[from] tandem_model::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}
