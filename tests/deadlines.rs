//! Deadlines: a unary call to a peer that never answers fails with a timeout at
//! `[coordinator] rpc_timeout_s` instead of hanging (its own test binary: the
//! deadline is process-wide).

mod common;

use std::time::{Duration, Instant};

use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::tls::Tls;
use tandem_proto::v1::reward_server::Reward;
use tandem_proto::v1::{ScoreReply, ScoreRequest};

const TOKEN: &str = "deadline-test-token-0123";

/// A reward service that takes 30 s to answer.
struct Stuck;

#[tonic::async_trait]
impl Reward for Stuck {
    async fn score(
        &self,
        _req: tonic::Request<ScoreRequest>,
    ) -> Result<tonic::Response<ScoreReply>, tonic::Status> {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(tonic::Response::new(ScoreReply { rewards: vec![] }))
    }
}

#[test]
fn a_peer_that_never_answers_fails_the_call_at_the_deadline() {
    let (rt, addr) = common::serve_reward(TOKEN, Stuck);
    let creds = Credentials::new(TOKEN, Tls::none()).unwrap();
    client::set_rpc_timeout(Duration::from_millis(400));
    assert_eq!(client::rpc_timeout(), Duration::from_millis(400));
    let t0 = Instant::now();
    let status = rt.block_on(async {
        let ch = client::connect(&addr, &creds).await.unwrap();
        client::reward(ch, &creds)
            .score(client::unary(ScoreRequest {
                prompt: "1 + 1".into(),
                answer: "2".into(),
                completions: vec!["2".into()],
                info_json: String::new(),
            }))
            .await
            .expect_err("a reply from a service that sleeps 30 s")
    });
    let took = t0.elapsed();
    // The client gives up at its deadline ("Timeout expired"); a server that noticed
    // first would answer DEADLINE_EXCEEDED.
    assert!(
        status.code() == tonic::Code::DeadlineExceeded
            || (status.code() == tonic::Code::Cancelled && status.message().contains("Timeout")),
        "{status:?}"
    );
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(5),
        "failed after {took:?}"
    );
}
