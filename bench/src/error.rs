//! The error type of the benchmarks.

pub use tandem_model::error::Context;

/// What can stop a benchmark: its inputs, a part of Tandem it drives, or a peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] tandem_model::Error),
    #[error(transparent)]
    Trainer(#[from] tandem_trainer::Error),
    #[error(transparent)]
    Weights(#[from] tandem_weights::Error),
    #[error(transparent)]
    Data(#[from] tandem_data::Error),
    #[error(transparent)]
    Coordinator(#[from] tandem_coordinator::Error),
    #[error(transparent)]
    Context(#[from] tandem_model::error::Contextual),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("{}", tandem_proto::client::describe(.0))]
    Rpc(#[from] tonic::Status),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::Invalid(msg.to_string())
}

/// `return Err(invalid(format!(…)))`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::invalid(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// `bail!(…)` unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::error::bail!($($arg)*);
        }
    };
}
pub(crate) use ensure;
