//! `tandem-proto`: the only wire contract between Tandem's services. The `.proto`
//! files under `proto/` are the source of truth; this crate is their generated code,
//! plus the rules every endpoint shares: the shared-token check, TLS when configured,
//! the message size limit, the limit of every field ([`limits`]), health and the
//! signal a service stops on ([`shutdown`]); and the private CA that issues a run's
//! certificates ([`ca`]), with the secrets it writes ([`secret`]). It depends on no
//! other Tandem crate.

// The generated tonic/prost code holds no `unsafe` either (checked), so the whole
// crate forbids it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod ca;
pub mod client;
pub mod health;
pub mod limits;
pub mod retry;
pub mod secret;
pub mod shutdown;
pub mod tls;

/// A server builder with Tandem's transport settings (flow-control windows, nodelay)
/// and, when `creds` hold a certificate, TLS (mTLS with `client_auth`).
pub fn server(creds: &auth::Credentials) -> Result<tonic::transport::Server, String> {
    let builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(WINDOW_BYTES))
        .initial_connection_window_size(Some(WINDOW_BYTES))
        .max_frame_size(Some(FRAME_BYTES))
        .tcp_nodelay(true);
    match creds.tls().server() {
        Some(cfg) => builder
            .tls_config(cfg)
            .map_err(|e| format!("tls cert / key: {}", error_chain(&e))),
        None => Ok(builder),
    }
}

/// The connections `listener` accepts, each with TCP_NODELAY: tonic applies the server
/// builder's `tcp_nodelay` only to listeners it binds itself, and without it a reply
/// smaller than a segment (a lease, a commit, a LoRA version) waits for the peer's
/// delayed ACK, about 40 ms on Linux. Every Tandem server serves through this.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// An error with its sources, `outer: inner: …` (tonic's transport errors hide the
/// cause in the source chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Messages and services of package `tandem.v1`.
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

/// The largest message any Tandem endpoint sends or accepts (a weight bucket is at
/// most [`WEIGHT_BUCKET_BYTES`] plus a small header; a rollout group of 64 × 8k tokens
/// is about 6 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// HTTP/2 flow-control window of every stream and connection. The default (64 KiB)
/// makes a 500 MB weight transfer wait for thousands of window updates.
pub const WINDOW_BYTES: u32 = 16 << 20;

/// The largest HTTP/2 frame each side accepts (the protocol's maximum). The default,
/// 16 KiB, cuts an 8 MiB weight bucket into 512 frames, each its own write and read
/// call; with large frames the system calls per byte fall and 1-receiver sync ran 1.5×
/// faster.
pub const FRAME_BYTES: u32 = (16 << 20) - 1;

/// The size of one weight bucket's payload (the trainer's default `bucket_mib`). Under
/// glibc's mmap threshold (32 MiB, see `tune_allocator`), each message's encode and
/// decode buffers come from the heap and are reused; larger ones are mapped and
/// faulted in afresh per message, which cost 2.5× the throughput.
pub const WEIGHT_BUCKET_BYTES: usize = 8 << 20;
