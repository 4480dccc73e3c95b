//! `tandem-coordinator`: the control plane of a run. Prompts come from a
//! [`tandem_data::Dataset`]; the coordinator depends on no model and no other role.
//!
//! - [`lease`] — prompt leases (exactly-once work), the staleness admission rule and
//!   the fair share of its slots (no generator starves the run)
//! - [`membership`] — workers, heartbeats, dropping the silent
//! - [`group`] — the weight-broadcast group (ranks, epochs, exclusion)
//! - [`state`] — the state those make up, and the run's settings
//! - [`store`] — that state saved in the run folder, so a restarted coordinator continues
//! - [`publish`] — the trainer's publish: checked whole, then applied
//! - [`service`] — the Coordinator gRPC service over that state
//! - [`export`] — gauges of the state and the series computed at scrape time
//! - [`server`] — listeners, `/metrics` + `/status` + health endpoints, the reaper;
//!   [`https`] — those endpoints over TLS when the run uses TLS
//! - [`metrics`] — the lag metrics' names and the Prometheus recorder
//! - [`config`] — the `[run]` and `[coordinator]` sections
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod export;
pub mod group;
pub mod https;
pub mod lease;
pub mod membership;
pub mod metrics;
pub mod publish;
pub mod server;
pub mod service;
pub mod state;
pub mod store;

pub use error::{Error, Result};
