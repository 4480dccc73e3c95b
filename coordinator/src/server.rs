//! Starting the coordinator: the gRPC service (token-checked), the HTTP endpoints
//! (`/metrics`, `/status`, `/healthz`, `/readyz`; HTTPS when the run has TLS) and the
//! reaper that drops silent
//! workers and re-issues their leases.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tandem_proto::auth::Credentials;
use tandem_proto::health::HealthService;
use tandem_proto::v1::coordinator_server::CoordinatorServer;
use tandem_proto::v1::health_server::HealthServer;
use tandem_proto::v1::Role;
use tandem_proto::MAX_MESSAGE_BYTES;

use crate::error::{Error, Result};
use crate::metrics;
use crate::service::{CoordinatorService, Core, Settings};
use crate::store::Store;
use tandem_data::Dataset;

/// A coordinator that is serving.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub core: Arc<Mutex<Core>>,
}

/// Binds both listeners and starts serving; returns once they accept connections.
/// With `state` (`RUN_DIR/coordinator.redb`), the state is saved there and a run it
/// holds continues (see [`crate::store`]).
pub async fn start(
    settings: Settings,
    dataset: Dataset,
    creds: &Credentials,
    state: Option<&Path>,
) -> Result<Running> {
    let mut grpc_server = tandem_proto::server(creds).map_err(Error::Invalid)?;
    let handle = metrics::install();
    metrics::describe();
    metrics::initialise(settings.run.max_staleness);
    let grpc_listener = bind(&settings.coordinator.listen, "listen").await?;
    let http_listener = bind(&settings.coordinator.http_listen, "http_listen").await?;
    let grpc = grpc_listener
        .local_addr()
        .map_err(|e| Error::Io(e.to_string()))?;
    let http = http_listener
        .local_addr()
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut core = Core::new(settings, dataset);
    if let Some(path) = state {
        let (store, saved) = Store::open(path)?;
        core.attach(store, saved)?;
    }
    let core = Arc::new(Mutex::new(core));

    let svc = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(CoordinatorService {
            core: core.clone(),
            run_token: creds.token().to_string(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        creds.require_token(),
    );
    let health = HealthServer::with_interceptor(
        HealthService {
            service: "coordinator",
        },
        creds.require_token(),
    );
    tokio::spawn(async move {
        let r = grpc_server
            .add_service(health)
            .add_service(svc)
            .serve_with_incoming(tandem_proto::incoming(grpc_listener))
            .await;
        if let Err(e) = r {
            tracing::error!("coordinator gRPC server stopped: {e}");
        }
    });

    let app = axum::Router::new()
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_json))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(HttpState {
            core: core.clone(),
            handle: handle.clone(),
            bearer: format!("Bearer {}", creds.token()),
        });
    // With TLS, the HTTP endpoints speak it too (`/status` carries the run's token).
    match creds.tls().https() {
        Some(config) => {
            let config = config.map_err(Error::Invalid)?;
            let listener = crate::https::TlsListener::new(http_listener, config)
                .map_err(|e| Error::Io(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("coordinator HTTPS server stopped: {e}");
                }
            });
        }
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(http_listener, app).await {
                    tracing::error!("coordinator HTTP server stopped: {e}");
                }
            });
        }
    }

    let reaper = core.clone();
    tokio::spawn(async move {
        let mut ticks = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(mut c) = reaper.lock() {
                c.reap(Instant::now());
            }
            // The exporter keeps histogram samples until it folds them into buckets:
            // at a scrape, or here every 5 s, so memory stays flat without a scraper
            // (found by scripts/soak.sh).
            ticks += 1;
            if ticks.is_multiple_of(25) {
                handle.run_upkeep();
            }
        }
    });
    Ok(Running { grpc, http, core })
}

async fn bind(addr: &str, key: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io(format!("[coordinator] {key}: cannot listen on {addr}: {e}")))
}

impl Running {
    /// The run's state as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        self.core
            .lock()
            .map(|c| status_value(&c))
            .unwrap_or_default()
    }

    /// Waits until the run is finished (true) or this process is asked to stop by
    /// SIGINT / SIGTERM (false: every change is already saved, so a coordinator started
    /// again on the same state file continues the run).
    pub async fn wait_finished_or_stopped(&self) -> bool {
        tokio::select! {
            () = self.wait_finished() => true,
            () = tandem_proto::shutdown::requested() => {
                tracing::info!("stopped before the run finished; its state is saved for --resume");
                false
            }
        }
    }

    /// Waits until the run is finished and every worker has left (or a 30 s grace).
    pub async fn wait_finished(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Ok(c) = self.core.lock() else { return };
            if let Some(at) = c.finished_at {
                let left = c.members.iter().count();
                if left == 0 || at.elapsed() > Duration::from_secs(30) {
                    return;
                }
            }
        }
    }
}

#[derive(Clone)]
struct HttpState {
    core: Arc<Mutex<Core>>,
    handle: PrometheusHandle,
    /// `/status` names workers, leases and prompts: it needs the run's token
    /// (`authorization: Bearer <token>`), as every RPC does. `/metrics` and the probes
    /// stay open for scrapers and kubelets.
    bearer: String,
}

async fn metrics_text(State(s): State<HttpState>) -> impl IntoResponse {
    let extra = s
        .core
        .lock()
        .map(|c| c.render_computed(Instant::now()))
        .unwrap_or_default();
    (
        [("content-type", "text/plain; version=0.0.4")],
        format!("{}{extra}", s.handle.render()),
    )
}

async fn ready(State(s): State<HttpState>) -> impl IntoResponse {
    match s.core.lock() {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "state poisoned\n"),
    }
}

async fn status_json(
    State(s): State<HttpState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !tandem_proto::auth::constant_time_eq(given, s.bearer.as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            "{\"error\": \"send the run's token: authorization: Bearer <token>\"}".to_string(),
        );
    }
    let Ok(c) = s.core.lock() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "{}".to_string());
    };
    (StatusCode::OK, status_value(&c).to_string())
}

/// The run's state as JSON (`/status`, and `RUN_DIR/coordinator-status.json` at exit).
pub fn status_value(c: &Core) -> serde_json::Value {
    let st = c.status(Instant::now());
    let workers: Vec<serde_json::Value> = st
        .workers
        .iter()
        .map(|w| {
            serde_json::json!({
                "id": w.worker_id,
                "name": w.name,
                "role": if w.role == Role::Trainer as i32 { "trainer" } else { "generator" },
                "policy_version": w.policy_version,
                "lag": w.lag,
                "generated_tokens": w.generated_tokens,
                "last_seen_ms": w.last_seen_ms,
                "leases": w.leases,
            })
        })
        .collect();
    serde_json::json!({
        "policy_version": st.policy_version,
        "step": st.step,
        "total_steps": st.total_steps,
        "finished": st.finished,
        "groups_accepted": st.groups_accepted,
        "leases_running": st.leases_running,
        "buffer_groups": st.buffer_groups,
        "tokens_per_second": st.tokens_per_second,
        "max_staleness_seen": st.max_staleness_seen,
        "dropped": st.dropped,
        "metrics": st.metrics,
        "workers": workers,
        "prompt_cursor": c.leases.cursor,
        "reissued_prompts": c.leases.reissued,
        "pending_reissue": c.leases.pending_reissue(),
        "filtered_prompts": c.leases.filtered,
        "discarded_groups": c.leases.discarded,
        "informative_group_share": c.leases.informative_share(),
    })
}
