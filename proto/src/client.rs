//! Connecting to a Tandem service with the shared token, TLS when configured, and the
//! message size limits.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{Credentials, WithToken};
use crate::v1::coordinator_client::CoordinatorClient;
use crate::v1::environment_client::EnvironmentClient;
use crate::v1::reward_client::RewardClient;
use crate::v1::trainer_client::TrainerClient;
use crate::MAX_MESSAGE_BYTES;

/// A channel whose every request carries the token.
pub type Authed = InterceptedService<Channel, WithToken>;

/// Connects to `addr`. A bare "host:port" speaks TLS when `creds` hold a CA and
/// plaintext otherwise; "http://…" is always plaintext and "https://…" always TLS. The
/// error names the address.
pub async fn connect(addr: &str, creds: &Credentials) -> Result<Channel, String> {
    let tls = creds.tls().client();
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(crate::WINDOW_BYTES))
        .initial_connection_window_size(Some(crate::WINDOW_BYTES))
        .max_frame_size(Some(crate::FRAME_BYTES))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    if uri.starts_with("https://") {
        let cfg = tls.ok_or_else(|| {
            format!("{uri}: TLS needs a CA to verify the server; set --tls-ca (TANDEM_TLS_CA)")
        })?;
        endpoint = endpoint
            .tls_config(cfg)
            .map_err(|e| format!("tls ca / cert / key: {}", crate::error_chain(&e)))?;
    }
    // The whole connection, HTTP/2 handshake included, within a bound: a peer that
    // accepts TCP but never answers (a stalled proxy, a frozen process) is an error the
    // caller can retry, not a hang.
    let connected = tokio::time::timeout(Duration::from_secs(15), endpoint.connect())
        .await
        .map_err(|_| format!("cannot connect to {uri}: no HTTP/2 handshake within 15 s"))?;
    connected.map_err(|e| {
        let hint = if uri.starts_with("http://") {
            " (if the service speaks TLS, set --tls-ca / TANDEM_TLS_CA)"
        } else {
            " (check that the service speaks TLS, that its certificate names this host and is signed by the CA, and, for mTLS, that this process has --tls-cert / --tls-key)"
        };
        format!("cannot connect to {uri}: {}{hint}", crate::error_chain(&e))
    })
}

pub fn coordinator(ch: Channel, creds: &Credentials) -> CoordinatorClient<Authed> {
    CoordinatorClient::with_interceptor(ch, creds.with_token())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn trainer(ch: Channel, creds: &Credentials) -> TrainerClient<Authed> {
    TrainerClient::with_interceptor(ch, creds.with_token())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn environment(ch: Channel, creds: &Credentials) -> EnvironmentClient<Authed> {
    EnvironmentClient::with_interceptor(ch, creds.with_token())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn reward(ch: Channel, creds: &Credentials) -> RewardClient<Authed> {
    RewardClient::with_interceptor(ch, creds.with_token())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A failed call in words: its code and message, the transport's cause when there is
/// one, and a hint for the usual TLS mistakes.
pub fn describe(e: &tonic::Status) -> String {
    use std::error::Error;
    let mut out = e.message().to_string();
    if let Some(source) = e.source() {
        let chain = crate::error_chain(source);
        if !out.contains(&chain) {
            out.push_str(": ");
            out.push_str(&chain);
        }
    }
    let lower = out.to_lowercase();
    // A peer that is down or went away is not a TLS mistake.
    let gone = [
        "connection refused",
        "broken pipe",
        "connection reset",
        "stream closed",
    ]
    .iter()
    .any(|w| lower.contains(w));
    if !gone
        && [
            "certificate",
            "tls",
            "handshake",
            "transport error",
            "h2 protocol",
        ]
        .iter()
        .any(|w| lower.contains(w))
    {
        out.push_str(
            " (a plaintext client meets a TLS server, or the reverse, or mTLS finds no valid client certificate: check --tls-ca, and with mTLS --tls-cert / --tls-key signed by the same CA)",
        );
    }
    // The peer's text: escaped and cut before it reaches a log or an error.
    format!("{:?}: {}", e.code(), crate::limits::printable(&out))
}

/// The deadline of this process's unary calls, in milliseconds (`[coordinator]
/// rpc_timeout_s`; 30 s until the config is known).
static RPC_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(30_000);

/// Sets the deadline of every later [`unary`] call of this process.
pub fn set_rpc_timeout(d: Duration) {
    RPC_TIMEOUT_MS.store(
        d.as_millis().clamp(1, u64::MAX as u128) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The current deadline of unary calls.
pub fn rpc_timeout() -> Duration {
    Duration::from_millis(RPC_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// `message` as a request that fails when no reply comes within [`rpc_timeout`] (the
/// `grpc-timeout` header: the client gives up at the deadline with "Timeout expired",
/// and a server that notices first answers `DEADLINE_EXCEEDED`). For unary calls; a stream's life is
/// bounded by its own logic (acks, HTTP/2 keep-alive).
pub fn unary<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(rpc_timeout());
    req
}
