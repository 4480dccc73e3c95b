//! A hostile generator against real processes: it holds the generator token (and its
//! own session), and sends what the wire lets it send. Every value it forges is
//! refused naming its field, it cannot starve the run of admission slots, it cannot
//! join the weight broadcast as another worker or hold the trainer's threads, and a
//! forged broadcast header makes a generator fetch over gRPC instead of aborting it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::tls::Tls;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::*;
use tonic::Code;

use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A coordinator client holding `token`, with a session slot of its own.
fn coordinator_client(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    token: &str,
) -> (CoordinatorClient<Authed>, Credentials) {
    let creds = Credentials::new(token, Tls::none()).unwrap();
    let ch = rt.block_on(client::connect(addr, &creds)).unwrap();
    (client::coordinator(ch, &creds), creds)
}

/// Registers a generator with the generator token; its client sends its session.
fn register_generator(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    name: &str,
) -> (CoordinatorClient<Authed>, Credentials, u64) {
    let (mut c, creds) = coordinator_client(rt, addr, GEN_TOKEN);
    let r = rt
        .block_on(c.register(RegisterRequest {
            role: Role::Generator as i32,
            name: name.into(),
            address: String::new(),
        }))
        .unwrap()
        .into_inner();
    creds.set_session(&r.session_token);
    (c, creds, r.worker_id)
}

/// Heartbeats of `worker_id` until one names the trainer's address; the reply.
fn beat_until_trainer(
    rt: &tokio::runtime::Runtime,
    c: &mut CoordinatorClient<Authed>,
    worker_id: u64,
    cluster: &Cluster,
) -> HeartbeatReply {
    let t0 = Instant::now();
    loop {
        let r = rt
            .block_on(c.heartbeat(HeartbeatRequest {
                worker_id,
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        if !r.trainer_address.is_empty() {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{}",
            cluster.log("trainer")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts INVALID_ARGUMENT whose message starts with `field`.
fn invalid<T>(r: Result<tonic::Response<T>, tonic::Status>, field: &str) {
    let Err(e) = r else {
        panic!("{field}: accepted")
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
    assert!(
        e.message().starts_with(field),
        "{field}: {}",
        tandem_proto::limits::printable(e.message())
    );
}

/// A generator that takes every lease it can, beats to stay in the run, and never
/// delivers a group; `granted` counts the leases it was given.
struct Hog {
    stop: Arc<AtomicBool>,
    granted: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hog {
    fn start(addr: &str) -> Hog {
        let (stop, granted) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, g, addr) = (stop.clone(), granted.clone(), addr.to_string());
        let thread = std::thread::spawn(move || {
            let rt = runtime();
            let (mut c, _creds, id) = register_generator(&rt, &addr, "hog");
            while !s.load(Ordering::SeqCst) {
                let beat = rt.block_on(c.heartbeat(HeartbeatRequest {
                    worker_id: id,
                    ..Default::default()
                }));
                if beat.is_ok_and(|b| b.get_ref().stop) {
                    break;
                }
                if let Ok(r) = rt.block_on(c.lease(LeaseRequest {
                    worker_id: id,
                    max_groups: 4096,
                    request_id: 0,
                })) {
                    g.fetch_add(r.get_ref().leases.len() as u64, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = rt.block_on(c.leave(LeaveRequest { worker_id: id }));
        });
        Hog {
            stop,
            granted,
            thread: Some(thread),
        }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A generator that grabbed the whole admission window before any other joined, and
/// never delivers, holds the run back by the overdue time (10 s here), not by
/// `lease_timeout_s` (900 s): the newcomer gets its share at once and the hog's overdue
/// leases next; on probation, the hog holds one lease at a time.
#[test]
fn a_generator_holding_every_slot_cannot_starve_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 8;
    let mut c = Cluster::start(dir.path(), &config(dir.path(), &model, steps, 1, ""));
    c.trainer();
    let hog = Hog::start(&c.grpc);
    // The window: (η + 1)·B = 4 groups, all the hog's.
    let t0 = Instant::now();
    while hog.granted.load(Ordering::SeqCst) < 4 {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", c.report());
        std::thread::sleep(Duration::from_millis(20));
    }
    c.generator("gen-0");
    let t1 = Instant::now();
    c.wait_steps(steps as usize, Duration::from_secs(240));
    let took = t1.elapsed();
    drop(hog);
    c.wait_all(Duration::from_secs(120));
    let coordinator = c.log("coordinator");
    assert!(
        coordinator.contains("leases taken back for a starved generator: held above"),
        "{coordinator}"
    );
    assert!(
        coordinator
            .contains("leases taken back for a starved generator: held past the overdue time")
            && coordinator.contains("from=hog"),
        "{coordinator}"
    );
    // Far below the 900 s the hog's leases would have lasted.
    assert!(took < Duration::from_secs(200), "{took:?}");
    check_trained(&c.run, steps, 2, 4, 1);
}

/// Forged values against a running coordinator and trainer: each is refused naming
/// its field; none reaches a log whole or the saved state.
#[test]
fn forged_values_are_refused_by_the_running_services() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let mut c = Cluster::start(dir.path(), &config(dir.path(), &model, 2, 1, ""));
    c.trainer();
    let rt = runtime();
    let (mut anon, _) = coordinator_client(&rt, &c.grpc, GEN_TOKEN);
    let gen = |name: &str, address: &str| RegisterRequest {
        role: Role::Generator as i32,
        name: name.into(),
        address: address.into(),
    };
    invalid(
        rt.block_on(anon.register(gen("gen-x", &"a".repeat(16 << 20)))),
        "address: 16777216 bytes",
    );
    invalid(
        rt.block_on(anon.register(gen("gen-0\nINFO forged: a line of its own", ""))),
        "name: contains a control character",
    );
    let (mut me, creds, id) = register_generator(&rt, &c.grpc, "hostile");
    let beat = beat_until_trainer(&rt, &mut me, id, &c);
    invalid(
        rt.block_on(me.heartbeat(HeartbeatRequest {
            worker_id: id,
            wait_seconds: 1e308,
            ..Default::default()
        })),
        "wait_seconds",
    );
    // Counts saturate: the coordinator goes on answering.
    for _ in 0..2 {
        rt.block_on(me.heartbeat(HeartbeatRequest {
            worker_id: id,
            generated_tokens: u64::MAX,
            ..Default::default()
        }))
        .unwrap();
    }
    let lease = rt
        .block_on(me.lease(LeaseRequest {
            worker_id: id,
            max_groups: 1,
            request_id: 0,
        }))
        .unwrap()
        .into_inner()
        .leases
        .remove(0);
    invalid(
        rt.block_on(me.release(ReleaseRequest {
            worker_id: id,
            lease_id: lease.lease_id,
            reason: "r".repeat(8 << 20),
            failure: 0,
        })),
        "reason: 8388608 bytes",
    );
    invalid(
        rt.block_on(me.release(ReleaseRequest {
            worker_id: id,
            lease_id: lease.lease_id,
            reason: "a failure of no known kind".into(),
            failure: 1 << 20,
        })),
        "failure: 1048576",
    );

    // Groups for that lease: each refused by its ack, naming the field.
    let trainer_ch = rt
        .block_on(client::connect(&beat.trainer_address, &creds))
        .unwrap();
    let mut push = client::trainer(trainer_ch, &creds);
    let group = |seq: u64, edit: &dyn Fn(&mut Completion)| {
        let comp = Completion {
            completion_ids: vec![5, 6],
            behavior_logprobs: vec![-1.0, -1.0],
            versions: vec![0, 0],
            reward: 0.0,
            finish_reason: "length".into(),
            ..Default::default()
        };
        let mut completions = vec![comp; 4];
        edit(&mut completions[0]);
        RolloutGroup {
            seq,
            session_token: creds.session(),
            lease_id: lease.lease_id,
            prompt_index: lease.prompt_index,
            worker_id: id,
            prompt_ids: vec![1, 2, 3],
            completions,
            ..Default::default()
        }
    };
    let forged = vec![
        (group(1, &|c| c.reward = 1e308), "completions[0].reward"),
        (group(2, &|c| c.reward = -2e6), "[reward] bound"),
        (
            group(3, &|c| c.finish_reason = "x".repeat(60 << 20)),
            "completions[0].finish_reason: 62914560 bytes",
        ),
        (
            group(4, &|c| c.finish_reason = "eos\nINFO forged".into()),
            "completions[0].finish_reason = \"eos\\nINFO forged\"",
        ),
        (
            RolloutGroup {
                retries: u32::MAX,
                ..group(5, &|_| {})
            },
            "retries: 4294967295",
        ),
        (
            RolloutGroup {
                retries: 1,
                episodes_failed: u32::MAX,
                ..group(6, &|_| {})
            },
            "episodes_failed: 4294967295",
        ),
    ];
    let acks: Vec<PushAck> = rt.block_on(async {
        let msgs: Vec<RolloutGroup> = forged.iter().map(|(g, _)| g.clone()).collect();
        let mut s = push
            .push_rollouts(tokio_stream::iter(msgs))
            .await
            .unwrap()
            .into_inner();
        let mut out = vec![];
        while let Some(a) = s.message().await.unwrap() {
            out.push(a);
        }
        out
    });
    assert_eq!(acks.len(), forged.len());
    for (ack, (_, needle)) in acks.iter().zip(&forged) {
        assert!(!ack.accepted, "{needle}: accepted");
        assert!(ack.reason.contains(needle), "{needle}: {}", ack.reason);
        assert!(
            ack.reason.len() < 4096,
            "{needle}: a reason of {}",
            ack.reason.len()
        );
    }
    // A stream cut mid-way, as a generator that dies leaves it, is `disconnected`, not
    // `malformed`: one group acked, then the connection is cut with the stream open.
    let (proxy, cut) = cutting_proxy(&beat.trainer_address);
    rt.block_on(async {
        let ch = client::connect(&proxy, &creds).await.unwrap();
        let mut push = client::trainer(ch, &creds);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(group(7, &|c| c.reward = 1e308)).await.unwrap();
        let mut acks = push
            .push_rollouts(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let ack = acks.message().await.unwrap().unwrap();
        assert!(!ack.accepted && ack.reason.contains("completions[0].reward"));
        cut();
        drop(tx);
    });
    let t0 = Instant::now();
    while !c
        .log("trainer")
        .contains("a rollout stream ended in an error")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            c.log("trainer")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = c.log("trainer");
    assert!(
        log.contains("reason=\"disconnected\"") && !log.contains("malformed"),
        "{log}"
    );
    // Nothing forged reached a log whole, or as a line of its own, or the saved state.
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    for name in ["coordinator", "trainer"] {
        let log = c.log(name);
        assert!(log.len() < 1 << 20, "{name}.log: {} bytes", log.len());
        assert!(
            !log.lines().any(|l| l.starts_with("INFO forged")),
            "{name}.log: a forged line"
        );
    }
    assert!(
        size(&c.run.join("coordinator.redb")) < 8 << 20,
        "coordinator.redb: {} bytes",
        size(&c.run.join("coordinator.redb"))
    );
}

/// The threads of process `pid` named `name` (as `/proc` shows it: 15 bytes at most).
/// A loopback TCP proxy to `upstream` for one connection, and the function that cuts
/// it (both sockets shut at once, as a process that dies leaves them).
fn cutting_proxy(upstream: &str) -> (String, impl FnOnce()) {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let upstream = upstream.to_string();
    let held: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
    let h = held.clone();
    std::thread::spawn(move || {
        let Ok((down, _)) = listener.accept() else {
            return;
        };
        let up = TcpStream::connect(&upstream).unwrap();
        h.lock()
            .unwrap()
            .extend([down.try_clone().unwrap(), up.try_clone().unwrap()]);
        let pipe = |mut from: TcpStream, mut to: TcpStream| {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Both);
            })
        };
        pipe(down.try_clone().unwrap(), up.try_clone().unwrap());
        pipe(up, down);
    });
    let cut = move || {
        for s in held.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    (addr, cut)
}

fn threads(pid: u32, name: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// The weight broadcast of a running trainer: a client holding the generator token and
/// a session of its own cannot join as gen-0; 300 connections that never say hello
/// hold at most MAX_PENDING of the trainer's threads and are closed by the hello
/// deadline; gen-0 goes on receiving by broadcast.
#[test]
fn the_broadcast_refuses_impostors_and_bounds_slow_connections() {
    use tandem_weights::broadcast::{Join, Receiver, HELLO_TIMEOUT, MAX_PENDING};
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    // Longer than this test: the processes are killed at its end.
    let text = with_set(
        &config(dir.path(), &model, 100_000, 1, ""),
        &[
            "trainer.broadcast=\"tcp\"",
            "trainer.broadcast_timeout_s=2.0",
            "coordinator.heartbeat_timeout_ms=5000",
        ],
    );
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    let received = |c: &Cluster| {
        c.log("gen-0")
            .matches("weights updated by broadcast")
            .count()
    };
    let t0 = Instant::now();
    while received(&c) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no broadcast: {}",
            c.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = runtime();
    let (mut me, creds, id) = register_generator(&rt, &c.grpc, "impostor");
    let beat = beat_until_trainer(&rt, &mut me, id, &c);
    let group = beat.group.expect("the trainer broadcasts");
    let status: Value =
        serde_json::from_str(&http_status_as(&c.http, "/status", Some(TOKEN)).1).unwrap();
    let gen0 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "gen-0")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    // As gen-0, with the generator token and the impostor's own session, or none.
    let session = creds.session();
    for s in [session.as_str(), ""] {
        for _ in 0..10 {
            let j = Join {
                addr: &group.address,
                epoch: group.epoch,
                rank: 1,
                world_size: group.world_size,
                worker_id: gen0,
                token: GEN_TOKEN,
                session: s,
                param_elements: 0,
                base: None,
            };
            let e = Receiver::connect(&j, Duration::from_secs(5), None)
                .err()
                .expect("an impostor joined as gen-0");
            assert!(
                e.to_string()
                    .contains(&format!("session refused: not worker {gen0}'s")),
                "{e}"
            );
        }
    }

    // 300 connections that never finish their hello.
    let pid = c.child("trainer").id();
    // Each connection that has not said hello waits on a thread of this name; those of
    // the refused impostors end.
    let hello = "broadcast-hello";
    let t3 = Instant::now();
    while threads(pid, hello) > 0 {
        assert!(t3.elapsed() < Duration::from_secs(5), "hello threads stay");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t1 = Instant::now();
    let mut conns: Vec<std::net::TcpStream> = (0..300)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&group.address).unwrap();
            let _ = s.write_all(b"TNDH");
            s
        })
        .collect();
    let mut most = 0;
    while t1.elapsed() < Duration::from_secs(2) {
        most = most.max(threads(pid, hello));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        (1..=MAX_PENDING).contains(&most),
        "{most} connections held a trainer thread at once"
    );
    for s in &mut conns {
        s.set_read_timeout(Some(HELLO_TIMEOUT + Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a slow connection is still open: {other:?}"),
        }
    }
    assert!(
        t1.elapsed() < HELLO_TIMEOUT + Duration::from_secs(8),
        "{:?}",
        t1.elapsed()
    );
    let t4 = Instant::now();
    while threads(pid, hello) > 0 {
        assert!(
            t4.elapsed() < Duration::from_secs(2),
            "{} hello threads left",
            threads(pid, hello)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // gen-0 goes on taking versions by broadcast.
    let n = received(&c);
    let t2 = Instant::now();
    while received(&c) <= n + 2 {
        assert!(
            t2.elapsed() < Duration::from_secs(60),
            "gen-0 took no broadcast after the flood: {}",
            c.log("gen-0")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!c.log("trainer").contains("panicked"));
}

/// A stand-in trainer: serves `snap` to fetches, and takes every pushed group.
struct FakeTrainer {
    snap: Arc<tandem_weights::Snapshot>,
}

type Boxed<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl tandem_proto::v1::trainer_server::Trainer for FakeTrainer {
    type PushRolloutsStream = Boxed<PushAck>;
    type FetchWeightsStream = Boxed<WeightBucket>;

    async fn push_rollouts(
        &self,
        req: tonic::Request<tonic::Streaming<RolloutGroup>>,
    ) -> Result<tonic::Response<Self::PushRolloutsStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        let acks = req.into_inner().map(|g| {
            g.map(|g| PushAck {
                seq: g.seq,
                accepted: true,
                ..Default::default()
            })
        });
        Ok(tonic::Response::new(Box::pin(acks)))
    }

    async fn fetch_weights(
        &self,
        _req: tonic::Request<FetchWeightsRequest>,
    ) -> Result<tonic::Response<Self::FetchWeightsStream>, tonic::Status> {
        use tandem_weights::bucket::{bucket, checksums};
        let s = &self.snap;
        let size = tandem_proto::WEIGHT_BUCKET_BYTES;
        let buckets: Vec<Result<WeightBucket, tonic::Status>> = checksums(&s.bytes, size)
            .into_iter()
            .enumerate()
            .map(|(i, crc)| Ok(bucket(s.version, s.dtype, s.base, &s.bytes, size, i, crc)))
            .collect();
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(buckets))))
    }
}

/// A broadcast listener that answers every hello, then sends a version header that
/// announces a tebibyte; counts the hellos.
fn forging_listener() -> (String, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hellos = Arc::new(AtomicU64::new(0));
    let n = hellos.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let n = n.clone();
            std::thread::spawn(move || {
                let mut head = [0u8; 31];
                if s.read_exact(&mut head).is_err() {
                    return;
                }
                let mut token = vec![0u8; u16::from_le_bytes([head[29], head[30]]) as usize];
                let mut len = [0u8; 1];
                if s.read_exact(&mut token).is_err() || s.read_exact(&mut len).is_err() {
                    return;
                }
                let mut session = vec![0u8; len[0] as usize];
                let _ = s.read_exact(&mut session);
                n.fetch_add(1, Ordering::SeqCst);
                let mut f = b"TNDW\x01\x00\x00\x00\x00".to_vec();
                f.extend_from_slice(b"TNDV");
                f.extend_from_slice(&head[4..12]); // the member's epoch
                f.extend_from_slice(&1u64.to_le_bytes()); // version 1
                f.extend_from_slice(&[0, 3]);
                f.extend_from_slice(b"f32");
                f.push(0); // a full model's
                f.extend_from_slice(&0u64.to_le_bytes()); // no base
                f.extend_from_slice(&(8u64 << 20).to_le_bytes());
                f.extend_from_slice(&1u32.to_le_bytes());
                f.extend_from_slice(&0u32.to_le_bytes());
                f.extend_from_slice(&(1u64 << 40).to_le_bytes());
                let _ = s.write_all(&f);
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            });
        }
    });
    (addr, hellos)
}

/// A real generator whose broadcast header announces a tebibyte: it refuses the
/// header without allocating it (no abort), fetches the version over gRPC at once
/// (well within the 30 s broadcast timeout), and runs to the end.
#[test]
fn a_forged_broadcast_header_makes_the_generator_fetch_over_grpc() {
    use tandem_proto::v1::trainer_server::TrainerServer;
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let text = with_set(
        &config(dir.path(), &model, 2, 1, ""),
        &[
            "trainer.broadcast=\"tcp\"",
            "trainer.broadcast_timeout_s=30.0",
        ],
    );
    let mut c = Cluster::start(dir.path(), &text);
    // The trainer is this test: its gRPC service serves version 1's weights.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tiny = tandem_model::load_model(model.to_str().unwrap()).unwrap();
    let snap = Arc::new(tandem_weights::Snapshot::of(&tiny.model, 1).unwrap());
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let trainer_addr = listener.local_addr().unwrap().to_string();
    server_rt.spawn(
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                TrainerServer::new(FakeTrainer { snap })
                    .max_decoding_message_size(tandem_proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(tandem_proto::MAX_MESSAGE_BYTES),
                tandem_proto::auth::RequireToken::new(TOKEN).with_generator(Some(GEN_TOKEN)),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (forger, hellos) = forging_listener();
    let rt = runtime();
    let (mut admin, _) = coordinator_client(&rt, &c.grpc, TOKEN);
    let trainer_id = rt
        .block_on(admin.register(RegisterRequest {
            role: Role::Trainer as i32,
            name: "trainer".into(),
            address: trainer_addr,
        }))
        .unwrap()
        .into_inner()
        .worker_id;
    // Its beats name the forging listener as the broadcast's.
    let stop = Arc::new(AtomicBool::new(false));
    let (beating, grpc) = (stop.clone(), c.grpc.clone());
    let beats = std::thread::spawn(move || {
        let rt = runtime();
        let (mut admin, _) = coordinator_client(&rt, &grpc, TOKEN);
        while !beating.load(Ordering::SeqCst) {
            let _ = rt.block_on(admin.heartbeat(HeartbeatRequest {
                worker_id: trainer_id,
                broadcast_address: forger.clone(),
                ..Default::default()
            }));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    c.generator("gen-0");
    let t0 = Instant::now();
    while hellos.load(Ordering::SeqCst) == 0 || !c.log("gen-0").contains("refused the header of v1")
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", c.report());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Version 1 is published: gen-0 wants it, and fetches it.
    let published = Instant::now();
    rt.block_on(admin.publish_version(PublishVersionRequest {
        version: 1,
        step: 1,
        ..Default::default()
    }))
    .unwrap();
    while !c.log("gen-0").contains("weights updated by fetch") {
        assert!(
            c.child("gen-0").try_wait().unwrap().is_none(),
            "gen-0 died: {}",
            c.log("gen-0")
        );
        assert!(
            published.elapsed() < Duration::from_secs(60),
            "{}",
            c.log("gen-0")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        published.elapsed() < Duration::from_secs(20),
        "waited {:?} (the broadcast timeout is 30 s)",
        published.elapsed()
    );
    let log = c.log("gen-0");
    assert!(log.contains("announces 1099511627776 bytes"), "{log}");
    assert!(!log.contains("weights updated by broadcast"), "{log}");
    // The run ends; gen-0 exits cleanly.
    rt.block_on(admin.publish_version(PublishVersionRequest {
        version: 1,
        step: 2,
        finished: true,
        ..Default::default()
    }))
    .unwrap();
    let t1 = Instant::now();
    let st = loop {
        if let Some(st) = c.child("gen-0").try_wait().unwrap() {
            break st;
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "{}", c.log("gen-0"));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "gen-0: {st}: {}", c.log("gen-0"));
    stop.store(true, Ordering::SeqCst);
    beats.join().unwrap();
}

/// A reward service that scores the first group 1e308: the generator does not push it
/// (the trainer would refuse it), it runs the group again (failures are retried, never
/// zeroed), and the run goes on with every reward within `[reward] bound`.
#[test]
fn rewards_beyond_the_bound_never_reach_the_trainer() {
    use tandem_proto::v1::reward_server::Reward;
    use tandem_proto::v1::{ScoreReply, ScoreRequest};

    #[derive(Clone, Default)]
    struct Huge(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl Reward for Huge {
        async fn score(
            &self,
            req: tonic::Request<ScoreRequest>,
        ) -> Result<tonic::Response<ScoreReply>, tonic::Status> {
            let n = req.into_inner().completions.len();
            // Every attempt at the first group (the generator tries 4 times).
            let huge = self.0.fetch_add(1, Ordering::SeqCst) < 4;
            let rewards = (0..n)
                .map(|i| if huge { 1e308 } else { i as f64 / 4.0 })
                .collect();
            Ok(tonic::Response::new(ScoreReply { rewards }))
        }
    }

    let service = Huge::default();
    let calls = service.0.clone();
    let (_rt, addr) = common::serve_reward(REWARD_TOKEN, service);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 3;
    let text = reward_from_service(&config(dir.path(), &model, steps, 1, ""), &addr, &[]);
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    c.wait_all(Duration::from_secs(120));
    assert!(calls.load(Ordering::SeqCst) > 4);
    let gen = c.log("gen-0");
    assert!(gen.contains("within [reward] bound ±1000000"), "{gen}");
    let trained = check_trained(&c.run, steps, 2, 4, 1);
    for (_, rows) in batches(&c.run) {
        for r in rows {
            assert!(r["reward"].as_f64().unwrap().abs() <= 1.0, "{r}");
        }
    }
    let status = coordinator_status(&c.run);
    // No group was refused by the trainer.
    assert!(
        status["dropped"]["invalid"].as_u64().unwrap_or(0) == 0,
        "{status}"
    );
    assert!(gen.contains("the group runs again"), "{gen}");
    assert!(
        status["reissued_prompts"].as_array().unwrap().is_empty(),
        "a lease was given back: {status}"
    );
    check_nothing_lost(&c.run, &trained, true);
}

/// A generator of a `[lora]` run (its model carries the run's adapter) against a
/// stand-in trainer serving `snap` as version 1: the cluster, with gen-0 started and
/// version 1 published, and the thread that keeps the trainer registered (stopped by
/// setting the flag).
fn lora_generator_fetching(
    dir: &Path,
    model: &Path,
    snap: tandem_weights::Snapshot,
) -> (
    Cluster,
    tokio::runtime::Runtime,
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
    CoordinatorClient<Authed>,
) {
    use tandem_proto::v1::trainer_server::TrainerServer;
    let text = with_set(
        &config(dir, model, 2, 1, "[lora]\nrank = 4\n"),
        &["trainer.broadcast=\"off\""],
    );
    let mut c = Cluster::start(dir, &text);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let trainer_addr = listener.local_addr().unwrap().to_string();
    server_rt.spawn(
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                TrainerServer::new(FakeTrainer {
                    snap: Arc::new(snap),
                })
                .max_decoding_message_size(tandem_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(tandem_proto::MAX_MESSAGE_BYTES),
                tandem_proto::auth::RequireToken::new(TOKEN).with_generator(Some(GEN_TOKEN)),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (mut admin, _) = coordinator_client(&server_rt, &c.grpc, TOKEN);
    let trainer_id = server_rt
        .block_on(admin.register(RegisterRequest {
            role: Role::Trainer as i32,
            name: "trainer".into(),
            address: trainer_addr,
        }))
        .unwrap()
        .into_inner()
        .worker_id;
    let stop = Arc::new(AtomicBool::new(false));
    let (beating, grpc) = (stop.clone(), c.grpc.clone());
    let beats = std::thread::spawn(move || {
        let rt = runtime();
        let (mut admin, _) = coordinator_client(&rt, &grpc, TOKEN);
        while !beating.load(Ordering::SeqCst) {
            let _ = rt.block_on(admin.heartbeat(HeartbeatRequest {
                worker_id: trainer_id,
                ..Default::default()
            }));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    c.generator("gen-0");
    server_rt
        .block_on(admin.publish_version(PublishVersionRequest {
            version: 1,
            step: 1,
            ..Default::default()
        }))
        .unwrap();
    (c, server_rt, stop, beats, admin)
}

/// `[lora]` end to end at a real generator: it samples the base with the run's
/// adapter, so a full version (a trainer without `[lora]`) is refused naming both sides
/// and the fix, and the generator stops at once (no sampling on under v1's number);
/// an adapter version for its base is fetched and assigned.
#[test]
fn a_lora_generator_takes_adapter_versions_of_its_base_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let tiny = tandem_model::load_model(model.to_str().unwrap()).unwrap();

    let full = tandem_weights::Snapshot::of(&tiny.model, 1).unwrap();
    let (mut c, _rt, stop, beats, _) = lora_generator_fetching(dir.path(), &model, full);
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = c.child("gen-0").try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", c.report());
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = c.log("gen-0");
    assert!(!st.success(), "gen-0 took a full version: {log}");
    for needle in [
        "weights v1 are a full model's parameters",
        "carries a LoRA adapter for base 0x",
        "start the trainer with the same [lora] section",
    ] {
        assert!(log.contains(needle), "no {needle:?} in {log}");
    }
    assert!(!log.contains("weights updated"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    stop.store(true, Ordering::SeqCst);
    beats.join().unwrap();
    drop(c);

    // The same base, another run folder.
    let dir = tempfile::tempdir().unwrap();
    let lora = tandem_model::LoraSection {
        rank: 4,
        seed: 7,
        ..Default::default()
    };
    let adapted = lora.attach(tiny.model.clone()).unwrap();
    let snap = tandem_weights::Snapshot::of(&adapted, 1).unwrap();
    assert!(snap.base.is_some());
    let (mut c, rt, stop, beats, mut admin) = lora_generator_fetching(dir.path(), &model, snap);
    let t0 = Instant::now();
    while !c.log("gen-0").contains("weights updated by fetch") {
        assert!(
            c.child("gen-0").try_wait().unwrap().is_none(),
            "gen-0 died: {}",
            c.log("gen-0")
        );
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", c.log("gen-0"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        c.log("gen-0").contains("adapter=true"),
        "{}",
        c.log("gen-0")
    );
    rt.block_on(admin.publish_version(PublishVersionRequest {
        version: 1,
        step: 2,
        finished: true,
        ..Default::default()
    }))
    .unwrap();
    let t1 = Instant::now();
    let st = loop {
        if let Some(st) = c.child("gen-0").try_wait().unwrap() {
            break st;
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "{}", c.log("gen-0"));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "gen-0: {st}: {}", c.log("gen-0"));
    stop.store(true, Ordering::SeqCst);
    beats.join().unwrap();
}
