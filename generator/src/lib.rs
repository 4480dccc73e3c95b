//! `tandem-generator`: the rollout worker (prompt leases, sampling, rewards, rollout
//! stream, weight receiver). Sampling itself is `tandem_model::generate`; the service
//! around it arrives with the distributed-system work.
