//! Episodes that failed through no doing of the model: an agent program that exited
//! non-zero or was killed at its wall time, the Environment service's error (`Step`,
//! or `Reset` in the generator), a tool whose infrastructure failed (the sandbox could
//! not be set up, the interpreter could not start). What the model did wrong (a
//! malformed call, a program that raises) is an observation and its reward, never a
//! failure. A group with a failed episode is never trained: the generator runs it
//! again (`[env] max_retries`) or gives its lease back.

/// What failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The agent program (`[env] agent`).
    Agent,
    /// The Environment service (`[env] service`).
    Environment,
    /// A built-in tool's infrastructure.
    Tool,
}

/// An episode's failure: what failed, and why (for the logs and the lease's release).
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub why: String,
}

/// The failed episodes of a group: how many, and the first one's failure.
#[derive(Clone, Debug, PartialEq)]
pub struct Failed {
    pub episodes: u32,
    pub first: Failure,
}

impl Failed {
    /// The group's failure from its episodes' (`None` when none failed).
    pub fn of<'a>(failures: impl IntoIterator<Item = Option<&'a Failure>>) -> Option<Failed> {
        let mut out: Option<Failed> = None;
        for f in failures.into_iter().flatten() {
            match &mut out {
                Some(g) => g.episodes += 1,
                None => {
                    out = Some(Failed {
                        episodes: 1,
                        first: f.clone(),
                    })
                }
            }
        }
        out
    }
}
