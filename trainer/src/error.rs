//! The error type of the trainer crate.

pub use tandem_model::error::Context;

/// What can go wrong turning rollouts into a loss, training a stage or serving.
/// Messages name the field, sample, file or peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] tandem_model::Error),
    #[error(transparent)]
    Weights(#[from] tandem_weights::Error),
    #[error(transparent)]
    Data(#[from] tandem_data::Error),
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

/// `return Err(invalid(format!(…)))`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::invalid(format!($($arg)*)))
    };
}
pub(crate) use bail;
