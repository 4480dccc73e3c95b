//! A dataset record's info on its lease: `PromptLease.info_json` is the record's, within
//! the wire's bound, and a lease granted before a coordinator restart carries the same
//! info after it (the coordinator keeps the prompt index, and reads the record again).

use std::path::Path;
use std::time::Duration;

use tandem_coordinator::config::{CoordinatorConfig, RunSection};
use tandem_coordinator::server;
use tandem_coordinator::service::Settings;
use tandem_coordinator::store::STATE_FILE;
use tandem_data::{DataConfig, DataKind, Dataset};
use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::limits::Check;
use tandem_proto::tls::Tls;
use tandem_proto::v1::{LeaseRequest, PromptLease, RegisterRequest, Role};

const RUN_TOKEN: &str = "run-token-coordinator-info-0123";
const GEN_TOKEN: &str = "gen-token-coordinator-info-4567";

/// The data crate checks records against the same bound the wire does.
#[test]
fn the_data_crate_and_the_wire_bound_info_alike() {
    assert_eq!(tandem_data::INFO_BYTES, tandem_proto::limits::INFO_BYTES);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a coordinator on `state` and asks for leases as generator `session` (the
/// first time: registers); returns the worker id, its session and the leases.
fn lease_once(
    data: &DataConfig,
    state: &Path,
    session: Option<(u64, String)>,
) -> (u64, String, Vec<PromptLease>) {
    let rt = runtime();
    let out = rt.block_on(async {
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
            coordinator: CoordinatorConfig::default(),
            config_toml: "the same run".into(),
        };
        let running = server::start(settings, Dataset::load(data).unwrap(), &creds, Some(state))
            .await
            .unwrap();
        let gen = Credentials::new(GEN_TOKEN, Tls::none()).unwrap();
        let ch = client::connect(&running.grpc.to_string(), &gen)
            .await
            .unwrap();
        let mut c = client::coordinator(ch, &gen);
        let (id, token) = match session {
            Some(s) => s,
            None => {
                let r = c
                    .register(RegisterRequest {
                        role: Role::Generator as i32,
                        name: "gen-0".into(),
                        address: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (r.worker_id, r.session_token)
            }
        };
        gen.set_session(&token);
        let leases = c
            .lease(LeaseRequest {
                worker_id: id,
                max_groups: 3,
                request_id: 77,
            })
            .await
            .unwrap()
            .into_inner()
            .leases;
        (id, token, leases)
    });
    // Every task of the first coordinator ends with its runtime, as with a kill.
    rt.shutdown_timeout(Duration::from_secs(5));
    out
}

#[test]
fn a_lease_carries_its_record_s_info_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.jsonl");
    let text: String = (0..6)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": format!("p{i}"), "answer": i, "info": {"id": i}, "level": i % 3})
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    let data = DataConfig {
        kind: DataKind::Jsonl,
        path: Some(path),
        ..Default::default()
    };
    let state = dir.path().join("run").join(STATE_FILE);
    let (id, session, first) = lease_once(&data, &state, None);
    assert!(!first.is_empty());
    for l in &first {
        l.check().unwrap();
        let info: serde_json::Value = serde_json::from_str(&l.info_json).unwrap();
        let i = info["id"].as_u64().unwrap();
        assert_eq!(l.text, format!("p{i}"), "{l:?}: the info of another record");
        assert_eq!(info, serde_json::json!({"id": i, "level": i % 3}));
    }
    // The same request again after a restart: the same leases, with the same info.
    let (_, _, again) = lease_once(&data, &state, Some((id, session)));
    assert_eq!(again, first);
}
