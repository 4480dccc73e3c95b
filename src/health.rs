//! `/healthz` and `/readyz` for the trainer and generator processes (the coordinator
//! serves its own beside `/metrics`), for Kubernetes probes and load balancers.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 once the worker
//! has registered with the coordinator and can do its work (the trainer serves
//! rollouts and weights; the generator holds its model), and 503 with the phase
//! before that and while it shuts down.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::routing::get;

/// The phase a worker reports at `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<Phase>>);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Registering with the coordinator, loading the model.
    #[default]
    Starting,
    Ready,
    /// The run is over; the process is draining.
    Stopping,
}

impl Readiness {
    pub fn set(&self, phase: Phase) {
        if let Ok(mut p) = self.0.lock() {
            *p = phase;
        }
    }

    fn get(&self) -> Phase {
        self.0.lock().map(|p| *p).unwrap_or(Phase::Stopping)
    }
}

/// Serves the probes on `addr` (from `--http`) in the background; returns the bound
/// address.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    readiness: Readiness,
) -> Result<std::net::SocketAddr> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("--http: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let phase = readiness.get();
                async move {
                    match phase {
                        Phase::Ready => (StatusCode::OK, "ready\n".to_string()),
                        p => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("{}\n", format!("{p:?}").to_lowercase()),
                        ),
                    }
                }
            }),
        );
    rt.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("health endpoints stopped: {e}");
        }
    });
    tracing::info!(%bound, "health endpoints (/healthz, /readyz) serving");
    Ok(bound)
}
