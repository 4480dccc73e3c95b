//! `tandem-launch`: the supervisor of `tandem run`. It runs a whole run on one machine
//! as separate processes of the `tandem` binary — a coordinator, a trainer and N
//! generators on loopback — and never calls into them: it prepares the private run
//! folder, hands each role its token and TLS files through its environment, starts
//! each process with its log, starts the ones that fail again (the trainer with
//! `--resume`), and reads the run's progress from the coordinator's `Status` call. It
//! also holds the run folder's checks every process that writes there makes.
//!
//! Modules: [`config_file`] (a config file with `--set` overrides, unknown keys
//! refused by name), [`supervisor`] (the run's processes started, restarted and watched),
//! [`process`] (one process: its role, log, restarts), [`mod@env`] (tokens and TLS files
//! for the children), [`status`] (the progress line and `tandem status`'s lag table),
//! [`run_address`] (a run's coordinator address and token read from its folder; what a
//! wrong port's refusal means),
//! [`run_dir`] (a run folder no other user controls; logs and private files written
//! without following links), [`stop`] (Ctrl-C: the run stopped in order, a checkpoint
//! kept), [`resume`] (an earlier run in the folder: refused, continued with `--resume`
//! or started over with `--fresh`), [`progress`] (the live line on a terminal, a log
//! line every `[run] log_every` steps elsewhere).

#![forbid(unsafe_code)]

pub mod config_file;
pub mod env;
pub mod process;
pub mod progress;
pub mod resume;
pub mod run_address;
pub mod run_dir;
pub mod status;
pub mod stop;
pub mod supervisor;

pub use process::{Program, EXIT_DO_NOT_RESTART};
pub use run_address::{read_token, RunAddress};
pub use status::{lag_table, CoordinatorStatus, Progress, StatusSource};
pub use stop::Stop;
pub use supervisor::{Ending, Event, Outcome, Restart, RunPlan, Supervisor};

/// What can go wrong preparing or supervising a run; messages name the file, the
/// process or the setting, and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run folder (or a folder above it) is not this user's alone.
    #[error("{0}")]
    RunDir(String),
    /// A file or process operation failed: what was being done, and why.
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    /// A process of the run failed or did not start; the message names it and ends
    /// with the last lines of its log.
    #[error("{0}")]
    Process(String),
    /// The coordinator could not be reached or asked.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// A path or setting that cannot be used.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, cause: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            cause,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
