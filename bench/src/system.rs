//! `tandem bench system`: the distributed loop's transport and scheduling, each figure
//! next to its reference in the same run:
//!
//! - weight sync: a policy version's bytes fetched over gRPC by 1 and by N concurrent
//!   receivers, next to the same bytes over raw loopback TCP; with `--lora R`, a
//!   version of the whole model next to a LoRA version (rank R, every projection):
//!   bytes, fetch and broadcast seconds, and the seconds a generator takes to install
//!   it;
//! - rollout ingest: groups/s and MB/s the trainer service accepts (checked and
//!   committed at a real coordinator) from N streaming clients, next to the time of
//!   one training step of the same batch shape;
//! - async vs sync: steps/hour of `tandem run` at max_staleness 0, 1, 2 with mock
//!   compute (generators and trainer sleep for set times), next to the ideal ratio
//!   (gen + train) / max(gen, train).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::tls::Tls;
use tandem_proto::v1::{
    Completion, FetchWeightsRequest, LeaseRequest, RegisterRequest, Role, RolloutGroup,
};
use tandem_trainer::node::buffer::Buffer;
use tandem_trainer::node::ingest::Limits;
use tandem_trainer::node::service::{Shared, TrainerService};
use tandem_weights::bucket::Assembler;
use tandem_weights::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{ensure, invalid, Context, Error, Result};

fn credentials() -> Result<Credentials> {
    Credentials::new("bench", Tls::none()).map_err(invalid)
}

#[derive(Args, Clone)]
pub struct SystemBench {
    /// The model whose weights are synced (`smollm2`: 538 MB in f32).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Concurrent receivers / streaming generators.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Rollout groups each ingest client streams.
    #[arg(long, default_value_t = 200)]
    groups_per_client: usize,
    /// Ingest group shape: completions per group, prompt and completion tokens.
    #[arg(long, default_value_t = 8)]
    group_size: usize,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 256)]
    completion_tokens: usize,
    /// Groups per training step (for the per-step transport figure).
    #[arg(long, default_value_t = 4)]
    batch_groups: usize,
    /// Mock compute for the async-vs-sync runs, milliseconds.
    #[arg(long, default_value_t = 1000)]
    mock_generate_ms: u64,
    #[arg(long, default_value_t = 1000)]
    mock_train_ms: u64,
    /// Steps per async-vs-sync run.
    #[arg(long, default_value_t = 12)]
    steps: u64,
    /// Also measure a LoRA version of this rank beside the full one (0 = no).
    #[arg(long, default_value_t = 0)]
    lora: usize,
    /// Skip parts: any of weights, ingest, async.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs the parts not skipped and prints (and with `--json` writes) their figures.
pub fn run(a: SystemBench) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let p = tandem_model::load_model(&a.model)?;
    let (bytes, dtype) = p.model.params().to_bytes()?;
    let vocab = p.model.config().vocab_size;
    let mut out = json!({"model": a.model, "weight_bytes": bytes.len(), "clients": a.clients});
    let want = |part: &str| !a.skip.iter().any(|s| s == part);

    // A trainer service with this model's weights as version 1, and a coordinator.
    let total = bytes.len();
    let shared = Arc::new(Shared::new(
        Buffer::default(),
        usize::MAX,
        Snapshot::new(1, dtype, bytes.into()),
        Limits {
            vocab_size: vocab,
            group_size: a.group_size,
            samples_per_episode: 1,
            max_completion_tokens: a.completion_tokens,
            max_context_tokens: a.prompt_tokens + a.completion_tokens + 1,
            filter_zero_std: false,
            reward_bound: tandem_proto::limits::REWARD_BOUND,
        },
        tandem_proto::WEIGHT_BUCKET_BYTES,
    ));
    let (coord_addr, trainer_addr) = rt.block_on(start_services(shared.clone()))?;
    let creds = credentials()?;

    if want("weights") {
        for n in [1, a.clients] {
            let grpc = rt.block_on(fetch_all(&trainer_addr, &creds, n))?;
            let raw = rt.block_on(raw_tcp(shared.clone(), n, true))?;
            let fresh = rt.block_on(raw_tcp(shared.clone(), n, false))?;
            let pushed = broadcast(&shared, n)?;
            let (g, r, f, b) = (
                gbps(total * n, grpc),
                gbps(total * n, raw),
                gbps(total * n, fresh),
                gbps(total * n, pushed),
            );
            eprintln!(
                "weights to {n}: gRPC {g:.2} GB/s ({:.0}% of raw TCP into a reused buffer, {:.0}% into a new one); \
                 broadcast {b:.2} GB/s ({:.0}%, {:.0}%); raw TCP {r:.2} / {f:.2} GB/s",
                100.0 * g / r,
                100.0 * g / f,
                100.0 * b / r,
                100.0 * b / f
            );
            out[format!("weights_{n}")] = json!({"grpc_seconds": grpc, "raw_tcp_seconds": raw,
                "raw_tcp_new_buffer_seconds": fresh, "broadcast_seconds": pushed,
                "grpc_gbps": g, "raw_tcp_gbps": r, "raw_tcp_new_buffer_gbps": f,
                "broadcast_gbps": b, "ratio": g / r, "ratio_new_buffer": g / f,
                "broadcast_ratio": b / r, "broadcast_ratio_new_buffer": b / f});
        }
    }
    if a.lora > 0 {
        out["versions"] = versions(&a, &p, &shared, &rt, &trainer_addr, &creds)?;
    }
    if want("ingest") {
        let r = rt.block_on(ingest(&a, &coord_addr, &trainer_addr, &creds, vocab))?;
        eprintln!(
            "ingest from {}: {:.0} groups/s, {:.1} MB/s; one step's batch of {} groups: {:.1} ms",
            a.clients, r["groups_per_second"], r["mb_per_second"], a.batch_groups, r["batch_ms"]
        );
        let step = train_step_seconds(&p, &a)?;
        let frac = r["batch_ms"].as_f64().unwrap_or(0.0) / 1000.0 / step;
        eprintln!(
            "one training step of that batch: {step:.2} s; transport is {:.3}% of it",
            100.0 * frac
        );
        out["ingest"] =
            json!({"measured": r, "train_step_seconds": step, "transport_fraction": frac});
    }
    if want("async") {
        out["async_tiny_model"] = Value::Object(staleness_sweep(&a, false, "tiny model")?);
        let runs = staleness_sweep(&a, true, "mock run")?;
        let s0 = runs["max_staleness_0"]["steps_per_hour"]
            .as_f64()
            .unwrap_or(0.0);
        let s1 = runs["max_staleness_1"]["steps_per_hour"]
            .as_f64()
            .unwrap_or(0.0);
        let (g, t) = (a.mock_generate_ms as f64, a.mock_train_ms as f64);
        let ideal = (g + t) / g.max(t);
        eprintln!("async/sync = {:.2} (ideal {ideal:.2})", s1 / s0);
        out["async"] = json!({"runs": runs, "async_over_sync": s1 / s0, "ideal": ideal,
            "mock_generate_ms": a.mock_generate_ms, "mock_train_ms": a.mock_train_ms});
    }
    out["cpu"] = crate::timing::cpu();
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = &a.json {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

async fn start_services(shared: Arc<Shared>) -> Result<(String, String)> {
    // Admission never holds the clients back: the figure is transport, not staleness.
    let settings = tandem_coordinator::service::Settings {
        run: tandem_coordinator::config::RunSection {
            max_staleness: 1_000_000,
            batch_groups: 64,
            ..Default::default()
        },
        coordinator: Default::default(),
        // The clients here read nothing of the run's config.
        config_toml: String::new(),
    };
    let dataset = tandem_data::Dataset::load(&Default::default())?;
    let creds = credentials()?;
    let coord = tandem_coordinator::server::start(settings, dataset, &creds, None).await?;
    let ch = client::connect(&coord.grpc.to_string(), &creds)
        .await
        .map_err(invalid)?;
    let svc = TrainerService {
        shared,
        coordinator: client::coordinator(ch, &creds),
        run_token: creds.token().to_string(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move { tandem_trainer::node::service::serve(svc, listener, &creds).await });
    // The servers run on the runtime's tasks; `coord` only holds handles to them.
    Ok((coord.grpc.to_string(), addr))
}

/// `[trainer] broadcast = "tcp"`: the version pushed to n members, each receiving into
/// the buffer of the version before (the first round allocates) and checking the bucket
/// CRCs before it acknowledges; seconds from the start of the push to the last
/// acknowledgement (best of 2).
fn broadcast(shared: &Shared, n: usize) -> Result<f64> {
    use tandem_proto::v1::{BroadcastGroup, GroupMember};
    use tandem_weights::broadcast::{Broadcaster, Join, Receiver};
    let snap = shared
        .weights
        .read()
        .map_err(|_| invalid("the weights lock was poisoned"))?
        .clone();
    let token = "bench";
    let access = tandem_weights::broadcast::Access {
        token: token.into(),
        run_token: token.into(),
    };
    let b = Broadcaster::bind("127.0.0.1:0", access, None)?;
    let elements = (snap.bytes.len() / if snap.dtype == "f32" { 4 } else { 2 }) as u64;
    let base = snap.base;
    let addr = b.local_addr().to_string();
    let members: Vec<GroupMember> = (1..=n as u32)
        .map(|rank| GroupMember {
            worker_id: rank as u64,
            name: format!("bench-{rank}"),
            rank,
        })
        .collect();
    let rounds = 2;
    let receivers: Vec<_> = members
        .iter()
        .map(|m| {
            let (addr, rank) = (addr.clone(), m.rank);
            std::thread::spawn(move || -> Result<()> {
                let second = Duration::from_secs(1);
                let session = tandem_proto::auth::session_token(token, rank as u64, "generator");
                let j = Join {
                    addr: &addr,
                    epoch: 1,
                    rank,
                    world_size: n as u32 + 1,
                    worker_id: rank as u64,
                    token,
                    session: &session,
                    param_elements: elements,
                    base,
                };
                let mut r = Receiver::connect(&j, second * 5, None)?;
                let mut got = 0;
                while got < rounds {
                    if let Some(v) = r.recv(second, second * 60)? {
                        // As a generator does once the version is assigned.
                        r.recycle(v.bytes);
                        got += 1;
                    }
                }
                Ok(())
            })
        })
        .collect();
    let group = BroadcastGroup {
        epoch: 1,
        world_size: n as u32 + 1,
        rank: 0,
        address: addr,
        members,
    };
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let wait = Duration::from_secs(10);
        let out = b.send(&group, &snap, shared.bucket_bytes, wait, wait * 6);
        ensure!(out.failed.is_empty(), "{}", out.describe_failures());
        best = best.min(out.seconds);
    }
    for r in receivers {
        r.join().map_err(|_| invalid("a receiver panicked"))??;
    }
    Ok(best)
}

/// A full version and a LoRA version (rank `a.lora`) side by side, each made the
/// trainer's current one in turn: bytes, gRPC fetch by 1 and by `clients`, the
/// broadcast to `clients`, and a generator's install (`trainable().assign_bytes`: the
/// whole model's storage, or the adapter's, then folded into the weights) — best of 3
/// for the install.
fn versions(
    a: &SystemBench,
    p: &tandem_model::Pretrained,
    shared: &Arc<Shared>,
    rt: &tokio::runtime::Runtime,
    trainer_addr: &str,
    creds: &Credentials,
) -> Result<Value> {
    let section = tandem_model::LoraSection {
        rank: a.lora,
        alpha: 2.0 * a.lora as f64,
        ..Default::default()
    };
    // Its own copy of the base: a generator folds the adapter into its weights.
    let adapted = section
        .attach(tandem_model::load_model(&a.model)?.model)?
        .fold_adapter()?;
    let mut out = json!({"lora_rank": a.lora});
    for (name, model) in [("full", &p.model), ("lora", &adapted)] {
        let snap = Snapshot::of(model, 1)?;
        let bytes = snap.bytes.clone();
        let dtype = snap.dtype;
        *shared
            .weights
            .write()
            .map_err(|_| invalid("the weights lock was poisoned"))? = Arc::new(snap);
        let one = rt.block_on(fetch_all(trainer_addr, creds, 1))?;
        let many = rt.block_on(fetch_all(trainer_addr, creds, a.clients))?;
        let pushed = broadcast(shared, a.clients)?;
        let mut install = f64::INFINITY;
        for _ in 0..3 {
            let t0 = Instant::now();
            model.trainable().assign_bytes(&bytes, dtype)?;
            model.refold()?;
            install = install.min(t0.elapsed().as_secs_f64());
        }
        eprintln!(
            "{name} version: {} bytes; gRPC fetch {one:.4} s (1), {many:.4} s ({}); broadcast {pushed:.4} s; install {install:.4} s",
            bytes.len(),
            a.clients
        );
        out[name] = json!({"bytes": bytes.len(), "grpc_seconds_1": one,
            "grpc_seconds_clients": many, "broadcast_seconds_clients": pushed,
            "install_seconds": install,
            "version_seconds": one + install});
    }
    // The full weights again for the parts that follow.
    *shared
        .weights
        .write()
        .map_err(|_| invalid("the weights lock was poisoned"))? =
        Arc::new(Snapshot::of(&p.model, 1)?);
    Ok(out)
}

/// n concurrent receivers each fetch and verify the whole version; seconds (best of 2).
async fn fetch_all(addr: &str, creds: &Credentials, n: usize) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (addr, creds) = (addr.to_string(), creds.clone());
            tasks.push(tokio::spawn(async move {
                let ch = client::connect(&addr, &creds).await.map_err(invalid)?;
                let mut t = client::trainer(ch, &creds);
                let mut s = t
                    .fetch_weights(FetchWeightsRequest { version: 1 })
                    .await?
                    .into_inner();
                let mut asm = Assembler::default();
                while let Some(b) = s.message().await? {
                    asm.push(b).map_err(invalid)?;
                }
                asm.finish().map_err(invalid)?;
                Ok::<_, Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The same bytes over plain loopback TCP to n concurrent readers; seconds (best of 2).
/// With `reuse`, each reader reads into its own buffer, touched beforehand, so the
/// timing holds socket copies only (the socket's ceiling: no allocation, no page
/// faults); without, each reader allocates its buffer as it reads, as a receiver that
/// keeps a new version beside the old one does.
async fn raw_tcp(shared: Arc<Shared>, n: usize, reuse: bool) -> Result<f64> {
    let snap = shared
        .weights
        .read()
        .map_err(|_| invalid("the weights lock was poisoned"))?
        .clone();
    let total = snap.bytes.len();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                break;
            };
            let snap = snap.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                for chunk in snap.bytes.chunks(tandem_proto::WEIGHT_BUCKET_BYTES) {
                    if sock.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut bufs: Vec<Vec<u8>> = (0..n)
        .map(|_| if reuse { vec![1u8; total] } else { Vec::new() })
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for mut buf in bufs.drain(..) {
            tasks.push(tokio::spawn(async move {
                let mut sock = tokio::net::TcpStream::connect(addr).await?;
                if buf.is_empty() {
                    let mut fresh = Vec::with_capacity(total);
                    sock.read_to_end(&mut fresh).await?;
                    ensure!(fresh.len() == total, "short read");
                } else {
                    sock.read_exact(&mut buf).await?;
                    ensure!(sock.read(&mut [0u8; 1]).await? == 0, "long read");
                }
                Ok::<_, Error>(buf)
            }));
        }
        for t in tasks {
            bufs.push(t.await??);
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    server.abort();
    Ok(best)
}

/// n clients register, lease and stream groups; the trainer checks and commits each.
async fn ingest(
    a: &SystemBench,
    coord_addr: &str,
    trainer_addr: &str,
    creds: &Credentials,
    vocab: usize,
) -> Result<Value> {
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for c in 0..a.clients {
        let (coord_addr, trainer_addr, creds, a) = (
            coord_addr.to_string(),
            trainer_addr.to_string(),
            creds.clone(),
            a.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let ch = client::connect(&coord_addr, &creds)
                .await
                .map_err(invalid)?;
            let mut coord = client::coordinator(ch, &creds);
            let id = coord
                .register(RegisterRequest {
                    role: Role::Generator as i32,
                    name: format!("bench-{c}"),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .worker_id;
            let mut leases = Vec::new();
            while leases.len() < a.groups_per_client {
                let want = (a.groups_per_client - leases.len()).min(4096) as u32;
                leases.extend(
                    coord
                        .lease(LeaseRequest {
                            worker_id: id,
                            max_groups: want,
                            request_id: 0,
                        })
                        .await?
                        .into_inner()
                        .leases,
                );
            }
            let groups: Vec<RolloutGroup> = leases
                .iter()
                .enumerate()
                .map(|(i, l)| RolloutGroup {
                    session_token: String::new(),
                    seq: i as u64 + 1,
                    lease_id: l.lease_id,
                    prompt_index: l.prompt_index,
                    worker_id: id,
                    prompt_ids: (0..a.prompt_tokens).map(|t| (t % vocab) as u32).collect(),
                    completions: vec![
                        Completion {
                            completion_ids: (0..a.completion_tokens)
                                .map(|t| ((t * 7 + i) % vocab) as u32)
                                .collect(),
                            behavior_logprobs: vec![-1.5; a.completion_tokens],
                            versions: vec![1; a.completion_tokens],
                            reward: (i % 2) as f64,
                            finish_reason: "length".into(),
                            loss_mask: vec![],
                            ..Default::default()
                        };
                        a.group_size
                    ],
                    ..Default::default()
                })
                .collect();
            let bytes: usize = groups.iter().map(prost::Message::encoded_len).sum();
            let ch = client::connect(&trainer_addr, &creds)
                .await
                .map_err(invalid)?;
            let mut t = client::trainer(ch, &creds);
            let start = Instant::now();
            let mut acks = t
                .push_rollouts(tokio_stream::iter(groups))
                .await?
                .into_inner();
            let mut accepted = 0usize;
            while let Some(ack) = acks.message().await? {
                ensure!(ack.accepted, "refused: {}", ack.reason);
                accepted += 1;
            }
            Ok::<_, Error>((accepted, bytes, start.elapsed().as_secs_f64()))
        }));
    }
    let (mut groups, mut bytes) = (0usize, 0usize);
    for t in tasks {
        let (g, b, _) = t.await??;
        groups += g;
        bytes += b;
    }
    let secs = t0.elapsed().as_secs_f64();
    let per_group = secs / groups as f64;
    Ok(json!({
        "groups": groups, "bytes": bytes, "seconds": secs,
        "groups_per_second": groups as f64 / secs, "mb_per_second": bytes as f64 / secs / 1e6,
        "batch_ms": per_group * a.batch_groups as f64 * 1000.0,
    }))
}

/// Seconds of one real training step on a batch of the ingest shape.
fn train_step_seconds(p: &tandem_model::Pretrained, a: &SystemBench) -> Result<f64> {
    use tandem_trainer::rl::rollout::Rollout;
    let vocab = p.model.config().vocab_size;
    let rollouts: Vec<Rollout> = (0..a.batch_groups * a.group_size)
        .map(|i| Rollout {
            group: format!("g{}", i / a.group_size),
            prompt_ids: (0..a.prompt_tokens)
                .map(|t| ((t + 3) % vocab) as u32)
                .collect(),
            completion_ids: (0..a.completion_tokens)
                .map(|t| ((t * 7 + i) % vocab) as u32)
                .collect(),
            behavior_logprobs: vec![-1.5; a.completion_tokens],
            reward: (i % 3) as f64,
            versions: None,
            loss_mask: None,
            finish_reason: None,
            episode: None,
        })
        .collect();
    let cfg = tandem_trainer::config::TrainConfig::default();
    let mut opt = tandem_trainer::rl::step::Optimizer::new(&cfg.optimizer, &p.model, vec![])?;
    let t0 = Instant::now();
    tandem_trainer::rl::step::StepPlan {
        policy: &p.model,
        frozen: tandem_trainer::rl::step::Frozen::default(),
        critic: None,
        rollouts: &rollouts,
        algorithm: &cfg.algorithm,
        optimizer: &cfg.optimizer,
        step_index: 0,
        policy_version: None,
        compute: &cfg.trainer.compute(),
    }
    .run(&mut opt)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Steps/hour of `tandem run` at max_staleness 0, 1, 2.
fn staleness_sweep(
    a: &SystemBench,
    mock: bool,
    label: &str,
) -> Result<serde_json::Map<String, Value>> {
    let mut runs = serde_json::Map::new();
    for eta in [0u64, 1, 2] {
        let secs = loop_run(a, eta, mock)?;
        let per_hour = a.steps as f64 / secs * 3600.0;
        eprintln!(
            "{label}, max_staleness {eta}: {secs:.1} s for {} steps = {per_hour:.0} steps/hour",
            a.steps
        );
        runs.insert(
            format!("max_staleness_{eta}"),
            json!({"seconds": secs, "steps_per_hour": per_hour}),
        );
    }
    Ok(runs)
}

/// Seconds of `tandem run`'s loop (first step's start to last step's end) on the
/// tiny model at `max_staleness`, computing for real or sleeping (`mock`).
fn loop_run(a: &SystemBench, eta: u64, mock: bool) -> Result<f64> {
    let (gen_ms, train_ms) = if mock {
        (a.mock_generate_ms, a.mock_train_ms)
    } else {
        (0, 0)
    };
    let dir = tempfile_dir()?;
    let cfg = dir.join("mock.toml");
    let text = format!(
        "[run]\nsteps = {}\nbatch_groups = 2\ngroup_size = 2\nmax_staleness = {eta}\ngenerators = 1\nrun_dir = \"{}\"\n\
         [model]\npath = \"preset:tiny\"\n[data]\nchat = false\n[generator]\nmax_new_tokens = 4\nprompts_per_batch = 2\nmock_generate_ms = {}\n\
         [trainer]\nmock_train_ms = {}\ncheckpoint_every = 0\n[reward]\nformat = 1.0\nformat_kind = \"digits\"\n",
        a.steps,
        dir.join("run").display(),
        gen_ms,
        train_ms
    );
    std::fs::write(&cfg, text)?;
    let t0 = Instant::now();
    let st = std::process::Command::new(std::env::current_exe()?)
        .args([
            "run",
            cfg.to_str()
                .ok_or_else(|| invalid(format!("{} is not UTF-8", cfg.display())))?,
        ])
        .env("TANDEM_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    ensure!(
        st.success(),
        "mock run failed; see {}",
        dir.join("run/logs").display()
    );
    // The loop proper: first step's start to the last step's end, from metrics.jsonl.
    let lines: Vec<Value> = std::fs::read_to_string(dir.join("run/metrics.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let first = &lines[0];
    let last = &lines[lines.len() - 1];
    let start = first["unix_time"].as_f64().unwrap_or(0.0)
        - first["step_seconds"].as_f64().unwrap_or(0.0)
        - first["wait_seconds"].as_f64().unwrap_or(0.0);
    let secs = last["unix_time"].as_f64().unwrap_or(0.0) - start;
    let _ = std::fs::remove_dir_all(&dir);
    tracing::debug!(
        wall = t0.elapsed().as_secs_f64(),
        loop_seconds = secs,
        "mock run"
    );
    Ok(secs.max(Duration::from_millis(1).as_secs_f64()))
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "tandem-bench-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
