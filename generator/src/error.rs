//! The error type of the generator crate.

pub use tandem_model::error::Context;

/// What can go wrong producing rollouts. Messages name the field, the file or the peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Rpc(String),
    /// A weight version of another kind than this generator's model (an adapter version
    /// without an adapter, a full one with one, an adapter of another base): retrying
    /// cannot help, so the generator stops with it.
    #[error("{0}")]
    Incompatible(String),
    /// Most of the generator's recent groups failed through no doing of the model, after
    /// their re-runs (`failure.rs`): its environment is broken, so restarting cannot
    /// help; the generator stops with it (`tandem run` stops the run).
    #[error("{0}")]
    Failing(String),
    #[error(transparent)]
    Model(#[from] tandem_model::Error),
    #[error(transparent)]
    Data(#[from] tandem_data::Error),
    #[error(transparent)]
    Env(#[from] tandem_env::Error),
    #[error(transparent)]
    Context(#[from] tandem_model::error::Contextual),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// A failed call or connection: `what` (the peer, the call) and why.
pub(crate) fn rpc(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Rpc(format!("{what}: {e}"))
}

/// `return Err(invalid(format!(…)))`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::invalid(format!($($arg)*)))
    };
}
pub(crate) use bail;
