//! The sandbox's error: which step of setting it up failed, and why.

/// What can go wrong before a sandboxed program starts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path or argument the caller gave cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// A step of building the sandbox failed in the child (`step` says which).
    #[error("the sandbox cannot be set up here: {step}: {source}{hint}")]
    Setup {
        step: String,
        source: std::io::Error,
        /// What to change, where the step's failure has a known cause.
        hint: String,
    },
    /// The program could not be started, or the caller's side failed (pipes, waiting).
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
