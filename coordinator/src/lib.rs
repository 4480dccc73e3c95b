//! `tandem-coordinator`: the control plane (membership, prompt leases, staleness
//! admission, step and weight-sync scheduling, lag metrics).
