//! A service asked to stop: SIGINT (Ctrl-C) or SIGTERM (`kill`, `tandem run`'s stop,
//! Kubernetes, Slurm's `scancel`). Each role stops its own way once [`requested`]
//! returns: the trainer checkpoints the step it finished, a generator gives its leases
//! back, the coordinator exits with its state saved.

/// Returns once this process receives SIGINT or SIGTERM. From the first call on, the
/// signals no longer end the process at once: the caller decides when it exits.
/// Pending forever when the handlers cannot be installed (the default action stays).
pub async fn requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
    }
}
