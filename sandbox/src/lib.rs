//! `tandem-sandbox`: runs a program that Tandem does not trust (code a model wrote, an
//! agent program) in Linux namespaces of its own, so that it sees nothing of the run
//! and nothing it starts outlives its call.
//!
//! Every call gets, from one fork of the caller:
//! - its own **PID namespace** with its own `/proc`: the program is process 1 there, it
//!   sees no other process, and when it ends the kernel kills everything it started
//!   (a `fork` + `setsid` leftover included) before the call returns;
//! - its own **mount namespace**: with [`View::Minimal`] a fresh root holding only the
//!   system's read-only program folders (`/usr`, `/lib*`, `/bin`), the paths the caller
//!   names read-only, a few device nodes, and one writable tmpfs of a fixed size that
//!   is the working directory, `/tmp` and `/dev/shm`; with [`View::Host`] the host's
//!   files with the paths the caller names hidden;
//! - its own **IPC** and **UTS** namespaces, and with [`Network::None`] its own network
//!   namespace (a loopback that is down: no TCP, no abstract Unix socket outside);
//! - **a user of its own**: run by root, a uid chosen per call ([`call_uid`]) that no
//!   account owns; run by anyone else, a new user namespace in which the program is uid
//!   1000 without capabilities;
//! - the limits of [`Limits`] (CPU seconds, address space, processes of its user, file
//!   size, wall time) and `no_new_privs`.
//!
//! Where a namespace cannot be made (a kernel or a container that forbids it) the call
//! fails with the step that failed and its `errno`: there is no weaker mode.
//!
//! - [`limits`] — [`Limits`] and how output is kept ([`Keep`])
//! - [`plan`] — a call's namespaces, mounts and identity as a list of steps
//!   ([`plan::Step`]), prepared before the fork
//! - [`enter`] — the steps run between fork and exec (the crate's `unsafe`, with
//!   `pre_exec` in [`run`] and two credential reads in [`plan`])
//! - [`run`] — [`Sandbox`]: spawns a call, feeds it, keeps its output, kills it at its
//!   wall time, and says how it ended ([`Ran`])

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod capture;
#[allow(unsafe_code)]
pub mod enter;
pub mod error;
pub mod limits;
#[allow(unsafe_code)]
pub mod plan;
#[allow(unsafe_code)]
pub mod run;

pub use error::Error;
pub use limits::{Keep, Limits};
pub use plan::{call_uid, Network, View};
pub use run::{Call, End, Ran, Sandbox};
