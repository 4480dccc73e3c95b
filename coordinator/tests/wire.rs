//! The coordinator against a hostile generator, over a real socket: every forged value
//! is refused with INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) naming its field, counts
//! saturate, and `/metrics` holds the series of live generators only.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use tandem_coordinator::config::{CoordinatorConfig, RunSection};
use tandem_coordinator::server::{self, Running};
use tandem_coordinator::service::Settings;
use tandem_data::{DataConfig, Dataset};
use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::limits;
use tandem_proto::tls::Tls;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::*;
use tonic::Code;

const RUN_TOKEN: &str = "run-token-coordinator-wire-0123";
const GEN_TOKEN: &str = "gen-token-coordinator-wire-4567";

async fn start(coordinator: CoordinatorConfig) -> Running {
    let creds = Credentials::new(RUN_TOKEN, Tls::none())
        .unwrap()
        .with_generator_token(GEN_TOKEN)
        .unwrap();
    let settings = Settings {
        run: RunSection {
            batch_groups: 2,
            max_staleness: 1,
            ..RunSection::default()
        },
        coordinator,
        config_toml: String::new(),
    };
    server::start(
        settings,
        Dataset::load(&DataConfig::default()).unwrap(),
        &creds,
        None,
    )
    .await
    .unwrap()
}

/// A client holding the generator token, with its own session slot.
async fn generator_client(c: &Running) -> (CoordinatorClient<Authed>, Credentials) {
    let creds = Credentials::new(GEN_TOKEN, Tls::none()).unwrap();
    let ch = client::connect(&c.grpc.to_string(), &creds).await.unwrap();
    (client::coordinator(ch, &creds), creds)
}

/// Registers `name` as a generator and sends its session from then on.
async fn register(c: &Running, name: &str) -> (CoordinatorClient<Authed>, u64) {
    let (mut cl, creds) = generator_client(c).await;
    let r = cl
        .register(RegisterRequest {
            role: Role::Generator as i32,
            name: name.into(),
            address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    creds.set_session(&r.session_token);
    (cl, r.worker_id)
}

/// Asserts INVALID_ARGUMENT whose message starts with the field's name.
fn refused<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, field: &str) {
    let e = r.expect_err(field);
    assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
    assert!(
        e.message().starts_with(field),
        "{field}: {}",
        limits::printable(e.message())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_value_is_refused_naming_its_field() {
    let c = start(CoordinatorConfig::default()).await;
    let (mut anon, _) = generator_client(&c).await;
    let gen = |name: &str, address: &str| RegisterRequest {
        role: Role::Generator as i32,
        name: name.into(),
        address: address.into(),
    };
    let huge = "a".repeat(16 << 20);
    refused(anon.register(gen("gen-x", &huge)).await, "address");
    refused(anon.register(gen(&huge, "")).await, "name");
    refused(anon.register(gen("", "")).await, "name");
    refused(
        anon.register(gen("gen-0\nINFO forged line", "")).await,
        "name",
    );
    refused(
        anon.register(gen("gen-x", "not an address")).await,
        "address",
    );
    let (mut me, id) = register(&c, "gen-0").await;
    let beat = |edit: &dyn Fn(&mut HeartbeatRequest)| {
        let mut b = HeartbeatRequest {
            worker_id: id,
            ..Default::default()
        };
        edit(&mut b);
        b
    };
    refused(
        me.heartbeat(beat(&|b| b.wait_seconds = 1e308)).await,
        "wait_seconds",
    );
    refused(
        me.heartbeat(beat(&|b| b.wait_seconds = f64::NAN)).await,
        "wait_seconds",
    );
    refused(
        me.heartbeat(beat(&|b| b.weight_sync_seconds = vec![0.1; 100_000]))
            .await,
        "weight_sync_seconds",
    );
    refused(
        me.heartbeat(beat(&|b| b.weight_sync_seconds = vec![0.1, -1.0]))
            .await,
        "weight_sync_seconds[1]",
    );
    refused(
        me.heartbeat(beat(&|b| b.broadcast_address = "127.0.0.1:9".into()))
            .await,
        "broadcast_address",
    );
    refused(
        me.heartbeat(beat(&|b| b.broadcast_address = "b".repeat(1 << 20)))
            .await,
        "broadcast_address",
    );
    refused(
        me.lease(LeaseRequest {
            worker_id: id,
            max_groups: 0,
            request_id: 0,
        })
        .await,
        "max_groups",
    );
    let lease = me
        .lease(LeaseRequest {
            worker_id: id,
            max_groups: 1,
            request_id: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .leases
        .remove(0);
    refused(
        me.release(ReleaseRequest {
            worker_id: id,
            lease_id: lease.lease_id,
            reason: "r".repeat(8 << 20),
            failure: 0,
        })
        .await,
        "reason",
    );
    refused(
        me.release(ReleaseRequest {
            worker_id: id,
            lease_id: lease.lease_id,
            reason: "a failure of no known kind".into(),
            failure: 99,
        })
        .await,
        "failure",
    );
    // The lease is still this generator's: the refused release changed nothing.
    assert!(
        me.release(ReleaseRequest {
            worker_id: id,
            lease_id: lease.lease_id,
            reason: "a reason\nwith a forged line".into(),
            failure: tandem_proto::v1::GroupFailure::Environment.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .released
    );

    // Counts saturate: two beats of u64::MAX tokens read u64::MAX, and the run goes on.
    for _ in 0..2 {
        me.heartbeat(beat(&|b| {
            b.generated_tokens = u64::MAX;
            b.prefill_tokens = u64::MAX;
            b.prefix_cache_hit_tokens = u64::MAX;
            b.weight_sync_bytes = u64::MAX;
            b.weight_sync_failures = u64::MAX;
            b.episodes_failed = u64::MAX;
            b.groups_retried = u64::MAX;
        }))
        .await
        .unwrap();
    }
    let status = c.core.lock().unwrap().status(Instant::now());
    let w = status.workers.iter().find(|w| w.worker_id == id).unwrap();
    assert_eq!(w.generated_tokens, u64::MAX);
    assert_eq!(status.tokens_per_second, u64::MAX as f64);
    let scrape = http_get(&c, "/metrics");
    assert!(
        scrape.contains(&format!(
            "tandem_generated_tokens_total{{generator=\"gen-0\"}} {}",
            u64::MAX
        )),
        "{scrape}"
    );
    for family in [
        "tandem_generator_prefill_tokens_total",
        "tandem_generator_prefix_cache_hit_tokens_total",
    ] {
        assert!(
            scrape.contains(&format!("{family}{{generator=\"gen-0\"}} {}", u64::MAX)),
            "{family}: {scrape}"
        );
    }
    assert!(
        scrape.contains(&format!("tandem_weight_sync_bytes_total {}", u64::MAX)),
        "{scrape}"
    );
    for line in [
        format!("tandem_episodes_failed_total {}", u64::MAX),
        format!("tandem_groups_retried_total {}", u64::MAX),
        // The released group that failed, by what failed; the other reasons start at 0.
        "tandem_groups_failed_total{reason=\"environment\"} 1".into(),
        "tandem_groups_failed_total{reason=\"agent\"} 0".into(),
    ] {
        assert!(scrape.contains(&line), "{line}: {scrape}");
    }

    // The trainer's calls, with the run's token, are bounded too.
    let admin_creds = Credentials::new(RUN_TOKEN, Tls::none()).unwrap();
    let ch = client::connect(&c.grpc.to_string(), &admin_creds)
        .await
        .unwrap();
    let mut admin = client::coordinator(ch, &admin_creds);
    refused(
        admin
            .exclude_from_group(ExcludeRequest {
                epoch: 1,
                worker_ids: vec![id],
                reason: "x".repeat(limits::REASON_BYTES + 1),
            })
            .await,
        "reason",
    );
    refused(
        admin
            .discard(DiscardRequest {
                lease_ids: vec![],
                reason: "x".repeat(limits::REASON_BYTES + 1),
            })
            .await,
        "reason",
    );
    refused(
        admin
            .publish_version(PublishVersionRequest {
                version: 1,
                step: 1,
                dropped: [("made-up\nreason".to_string(), 1)].into(),
                ..Default::default()
            })
            .await,
        "metrics/dropped key",
    );
    refused(
        admin
            .publish_version(PublishVersionRequest {
                version: 1,
                step: 1,
                dropped: [("made_up".to_string(), 1)].into(),
                ..Default::default()
            })
            .await,
        "dropped[",
    );
    refused(
        admin
            .publish_version(PublishVersionRequest {
                version: 1,
                step: 1,
                metrics: (0..limits::METRICS_PER_PUBLISH + 1)
                    .map(|i| (format!("m{i}"), 0.0))
                    .collect(),
                ..Default::default()
            })
            .await,
        "metrics",
    );
    refused(
        admin
            .publish_version(PublishVersionRequest {
                version: 1,
                step: 1,
                version_bytes: limits::WEIGHT_VERSION_BYTES + 1,
                ..Default::default()
            })
            .await,
        "version_bytes",
    );
    // The version's bytes are a gauge from the start (0 until the trainer reports them).
    assert!(
        http_get(&c, "/metrics")
            .lines()
            .any(|l| l.starts_with("tandem_weight_version_bytes ")),
        "no tandem_weight_version_bytes"
    );
    let refusals = http_get(&c, "/metrics")
        .lines()
        .find(|l| l.starts_with("tandem_requests_refused_total "))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap());
    assert!(refusals.is_some_and(|n| n >= 18.0), "{refusals:?}");
}

/// Past `limits::WORKERS` live workers, Register is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_bounded() {
    let c = start(CoordinatorConfig {
        heartbeat_timeout_ms: 600_000,
        ..CoordinatorConfig::default()
    })
    .await;
    let (mut cl, _) = generator_client(&c).await;
    for i in 0..limits::WORKERS {
        cl.register(RegisterRequest {
            role: Role::Generator as i32,
            name: format!("g{i}"),
            address: String::new(),
        })
        .await
        .unwrap();
    }
    let e = cl
        .register(RegisterRequest {
            role: Role::Generator as i32,
            name: "one-too-many".into(),
            address: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("WORKERS"), "{e:?}");
}

/// 300 generators register, beat and go (299 leave, one is dropped for silence): the
/// scrape holds the per-generator series of the two still live, and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_generators_take_their_series_with_them() {
    let c = start(CoordinatorConfig {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 1000,
        ..CoordinatorConfig::default()
    })
    .await;
    let (mut cl, _) = generator_client(&c).await;
    // The run's token acts for every id (a session per id would be 300 channels).
    let admin_creds = Credentials::new(RUN_TOKEN, Tls::none()).unwrap();
    let ch = client::connect(&c.grpc.to_string(), &admin_creds)
        .await
        .unwrap();
    let mut admin = client::coordinator(ch, &admin_creds);
    let mut ids = Vec::new();
    for i in 0..300 {
        let id = cl
            .register(RegisterRequest {
                role: Role::Generator as i32,
                name: format!("gen-{i}"),
                address: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        admin
            .heartbeat(HeartbeatRequest {
                worker_id: id,
                policy_version: 0,
                generated_tokens: 10,
                wait_seconds: 0.5,
                weight_sync_failures: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(id);
    }
    let series = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains("generator=\""))
            .map(String::from)
            .collect()
    };
    // Eight per-generator families: version, lag, tokens, prefill tokens, prefix-cache
    // hits, wait, sync failures, age.
    assert_eq!(series(&http_get(&c, "/metrics")).len(), 8 * 300);
    for &id in &ids[..298] {
        admin.leave(LeaveRequest { worker_id: id }).await.unwrap();
    }
    // gen-298 stops beating and is dropped; gen-299 beats on.
    let t0 = Instant::now();
    let live = loop {
        admin
            .heartbeat(HeartbeatRequest {
                worker_id: ids[299],
                ..Default::default()
            })
            .await
            .unwrap();
        let s = series(&http_get(&c, "/metrics"));
        if s.len() <= 8 || t0.elapsed() > Duration::from_secs(20) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(live.len(), 8, "{live:#?}");
    assert!(
        live.iter().all(|l| l.contains("generator=\"gen-299\"")),
        "{live:#?}"
    );
    assert!(live
        .iter()
        .any(|l| l == "tandem_generated_tokens_total{generator=\"gen-299\"} 10"));
}

fn http_get(c: &Running, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(c.http).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
