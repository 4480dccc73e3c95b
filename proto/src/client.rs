//! Connecting to a Tandem service with the shared token and the message size limits.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::WithToken;
use crate::v1::coordinator_client::CoordinatorClient;
use crate::v1::reward_client::RewardClient;
use crate::v1::trainer_client::TrainerClient;
use crate::MAX_MESSAGE_BYTES;

/// A channel whose every request carries the token.
pub type Authed = InterceptedService<Channel, WithToken>;

/// Connects to `addr` ("host:port" or "http://host:port"); the error names the address.
pub async fn connect(addr: &str) -> Result<Channel, String> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(crate::WINDOW_BYTES))
        .initial_connection_window_size(Some(crate::WINDOW_BYTES))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {uri}: {e}"))
}

pub fn coordinator(ch: Channel, token: &WithToken) -> CoordinatorClient<Authed> {
    CoordinatorClient::with_interceptor(ch, token.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn trainer(ch: Channel, token: &WithToken) -> TrainerClient<Authed> {
    TrainerClient::with_interceptor(ch, token.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn reward(ch: Channel, token: &WithToken) -> RewardClient<Authed> {
    RewardClient::with_interceptor(ch, token.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}
