//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or saving a model.
///
/// Messages name the file (and line or field where there is one) and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what Tandem can use.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// An argument or an input record is invalid; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Writes a whole file, naming it in the error.
pub(crate) fn write_file(path: &std::path::Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// An error with what was being done when it happened: "reading x.jsonl: …". Every
/// Tandem library error converts from it, so [`Context`] works across crates.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {cause}")]
pub struct Contextual {
    pub context: String,
    /// Shown in this error's message, not as a separate source, so a chain prints once.
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

/// `.context(…)` / `.with_context(|| …)` on any result whose error is a standard error.
pub trait Context<T> {
    fn context(self, context: impl std::fmt::Display) -> std::result::Result<T, Contextual>;
    fn with_context<S: std::fmt::Display>(
        self,
        f: impl FnOnce() -> S,
    ) -> std::result::Result<T, Contextual>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl std::fmt::Display) -> std::result::Result<T, Contextual> {
        self.with_context(|| context)
    }

    fn with_context<S: std::fmt::Display>(
        self,
        f: impl FnOnce() -> S,
    ) -> std::result::Result<T, Contextual> {
        self.map_err(|e| Contextual {
            context: f().to_string(),
            cause: Box::new(e),
        })
    }
}
