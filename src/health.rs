//! `/healthz` and `/readyz` for the trainer and generator processes (the coordinator
//! serves its own beside `/metrics`), for Kubernetes probes and load balancers.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 once the worker
//! has registered with the coordinator and can do its work (the trainer serves
//! rollouts and weights; the generator holds its model), and 503 with the phase
//! before that and while it shuts down.

use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::routing::get;
pub use tandem_proto::health::{Phase, Readiness};

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
