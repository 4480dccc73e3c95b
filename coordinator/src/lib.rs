//! `tandem-coordinator`: the control plane of a run.
//!
//! - [`lease`] — prompt leases (exactly-once work) and the staleness admission rule
//! - [`membership`] — workers, heartbeats, dropping the silent
//! - [`service`] — the Coordinator gRPC service over that state
//! - [`server`] — listeners, `/metrics` + `/status` + health endpoints, the reaper
//! - [`metrics`] — the lag metrics' names and the Prometheus recorder
//! - [`config`] — the `[run]` and `[coordinator]` sections

pub mod config;
pub mod error;
pub mod group;
pub mod lease;
pub mod membership;
pub mod metrics;
pub mod server;
pub mod service;

pub use error::{Error, Result};
