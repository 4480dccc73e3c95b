//! The broadcast over loopback: TCP and the stand-in collective, with members that
//! receive, stall, never join or join a stale epoch.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1::{BroadcastGroup, GroupMember};

use super::frame::{header, read_array, ACK};
use super::*;
use crate::collective::SharedBackend;
use crate::snapshot::Snapshot;

const SECOND: Duration = Duration::from_secs(1);

/// The run's token in these tests; members present it as their token too.
const RUN: &str = "secret";

/// Who may join: holders of `RUN` with their worker's session.
fn access() -> Access {
    Access {
        token: RUN.into(),
        run_token: RUN.into(),
    }
}

/// Worker `worker_id`'s session token.
fn session(worker_id: u64) -> &'static str {
    Box::leak(tandem_proto::auth::session_token(RUN, worker_id, "generator").into_boxed_str())
}

/// Member `worker_id` of epoch `epoch` as rank `rank` of a 4-rank world, with its
/// session, expecting versions of [`LEN`] bytes of f32.
fn join(addr: &str, epoch: u64, rank: u32, worker_id: u64) -> Join<'_> {
    Join {
        addr,
        epoch,
        rank,
        world_size: 4,
        worker_id,
        token: RUN,
        session: session(worker_id),
        param_elements: LEN as u64 / 4,
        base: None,
    }
}

/// The size of every version in these tests (f32: a multiple of 4), unless a test
/// says otherwise.
const LEN: usize = 3020;

fn member(worker_id: u64, rank: u32) -> GroupMember {
    GroupMember {
        worker_id,
        name: format!("gen-{worker_id}"),
        rank,
    }
}

fn group(epoch: u64, members: Vec<GroupMember>, addr: SocketAddr) -> BroadcastGroup {
    BroadcastGroup {
        epoch,
        world_size: members.len() as u32 + 1,
        rank: 0,
        address: addr.to_string(),
        members,
    }
}

fn snapshot(version: u64, len: usize) -> Snapshot {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + version as usize) as u8).collect();
    Snapshot::new(version, "f32", bytes.into())
}

/// A member that receives versions on its own thread until version 2.
fn member_thread(
    addr: SocketAddr,
    epoch: u64,
    rank: u32,
    id: u64,
    len: usize,
) -> std::thread::JoinHandle<Vec<Received>> {
    let t = member_sized(addr, (epoch, rank, 4, id), None, 2, len);
    std::thread::spawn(move || t.join().unwrap().0)
}

/// A member `(epoch, rank, world_size, worker_id)`, with a collective `backend` or
/// not, that receives on its own thread until version `last` arrives or the trainer
/// hangs up; it returns the versions and the errors of failed receives.
fn member_of(
    addr: SocketAddr,
    (epoch, rank, world_size, id): (u64, u32, u32, u64),
    backend: Option<SharedBackend>,
    last: u64,
) -> std::thread::JoinHandle<(Vec<Received>, Vec<String>)> {
    member_sized(addr, (epoch, rank, world_size, id), backend, last, LEN)
}

/// [`member_of`] expecting versions of `len` bytes.
fn member_sized(
    addr: SocketAddr,
    who: (u64, u32, u32, u64),
    backend: Option<SharedBackend>,
    last: u64,
    len: usize,
) -> std::thread::JoinHandle<(Vec<Received>, Vec<String>)> {
    member_on(addr, who, backend, last, len, None)
}

/// [`member_sized`] whose model carries an adapter on base `base` (`None`: none).
fn member_on(
    addr: SocketAddr,
    (epoch, rank, world_size, id): (u64, u32, u32, u64),
    backend: Option<SharedBackend>,
    last: u64,
    len: usize,
    base: Option<u64>,
) -> std::thread::JoinHandle<(Vec<Received>, Vec<String>)> {
    std::thread::spawn(move || {
        let addr = addr.to_string();
        let j = Join {
            world_size,
            param_elements: len as u64 / 4,
            base,
            ..join(&addr, epoch, rank, id)
        };
        let mut r = Receiver::connect(&j, SECOND * 5, backend.as_ref()).unwrap();
        let (mut got, mut errors) = (Vec::new(), Vec::new());
        let give_up = Instant::now() + SECOND * 20;
        while Instant::now() < give_up {
            match r.recv(Duration::from_millis(50), SECOND * 5) {
                Ok(Some(v)) => {
                    let done = v.version == last;
                    got.push(v);
                    if done {
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) if e.to_string().contains("closed") => break,
                Err(e) => errors.push(e.to_string()),
            }
        }
        (got, errors)
    })
}

fn stand_in() -> SharedBackend {
    Arc::new(crate::collective::stand_in::LocalBackend::default())
}

fn ranks(members: &[GroupMember]) -> Vec<u32> {
    let mut r: Vec<u32> = members.iter().map(|m| m.rank).collect();
    r.sort();
    r
}

#[test]
fn the_collective_carries_each_version_when_every_member_has_a_communicator() {
    let backend = stand_in();
    let b = Broadcaster::bind("127.0.0.1:0", access(), Some(backend.clone())).unwrap();
    let members = vec![member(11, 1), member(12, 2), member(13, 3)];
    let g = group(1, members.clone(), b.local_addr());
    let threads: Vec<_> = members
        .iter()
        .map(|m| {
            let who = (1, m.rank, 4, m.worker_id);
            member_of(b.local_addr(), who, Some(backend.clone()), 2)
        })
        .collect();
    for v in 1..=2 {
        let out = b.send(&g, &snapshot(v, LEN), 1000, SECOND * 5, SECOND * 10);
        assert!(out.failed.is_empty(), "{}", out.describe_failures());
        assert_eq!(out.plane, "stand-in");
        assert_eq!(ranks(&out.delivered), [1, 2, 3]);
    }
    for t in threads {
        let (got, errors) = t.join().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(got[1].bytes, &snapshot(2, LEN).bytes[..]);
    }
}

#[test]
fn a_member_without_a_communicator_makes_the_epoch_go_over_tcp() {
    let backend = stand_in();
    let b = Broadcaster::bind("127.0.0.1:0", access(), Some(backend.clone())).unwrap();
    let g = group(1, vec![member(1, 1), member(2, 2)], b.local_addr());
    let with = member_of(b.local_addr(), (1, 1, 3, 1), Some(backend), 1);
    let without = member_of(b.local_addr(), (1, 2, 3, 2), None, 1);
    let out = b.send(&g, &snapshot(1, LEN), 100, SECOND * 5, SECOND * 10);
    assert_eq!(out.plane, "tcp");
    assert_eq!(ranks(&out.delivered), [1, 2], "{}", out.describe_failures());
    for t in [with, without] {
        assert_eq!(t.join().unwrap().0[0].bytes, &snapshot(1, LEN).bytes[..]);
    }
}

#[test]
fn a_stalled_member_is_named_and_the_epoch_goes_on_over_tcp() {
    let backend = stand_in();
    let b = Broadcaster::bind("127.0.0.1:0", access(), Some(backend.clone())).unwrap();
    let addr = b.local_addr();
    let g = group(1, vec![member(1, 1), member(2, 2), member(3, 3)], addr);
    let good: Vec<_> = [1, 2]
        .map(|r| member_of(addr, (1, r, 4, r as u64), Some(backend.clone()), 2))
        .into();
    // Rank 3 joins, communicator and all, and never reads: the collective hangs on it.
    let a = addr.to_string();
    let _stalled = Receiver::connect(&join(&a, 1, 3, 3), SECOND * 5, Some(&backend)).unwrap();
    let short = Duration::from_millis(800);
    let out = b.send(&g, &snapshot(1, LEN), 1000, SECOND * 5, short);
    assert_eq!(out.plane, "stand-in");
    assert_eq!(
        ranks(&out.failed.iter().map(|f| f.0.clone()).collect::<Vec<_>>()),
        [3]
    );
    assert!(
        out.describe_failures()
            .contains("gen-3 (rank 3): stalled: did not take the header of v1"),
        "{}",
        out.describe_failures()
    );
    // The ready members got it, or missed only this version: none is excluded.
    let mut served = out.delivered.clone();
    served.extend(out.missed.iter().map(|m| m.0.clone()));
    assert_eq!(ranks(&served), [1, 2]);

    // The trainer hung up on the stalled member (the coordinator excludes it), and
    // the rest of the epoch goes over TCP.
    let out = b.send(
        &g,
        &snapshot(2, LEN),
        1000,
        Duration::from_millis(300),
        short,
    );
    assert_eq!(out.plane, "tcp");
    assert_eq!(ranks(&out.delivered), [1, 2]);
    assert!(
        out.describe_failures()
            .contains("gen-3 (rank 3): did not join epoch 1"),
        "{}",
        out.describe_failures()
    );
    for t in good {
        let (got, _) = t.join().unwrap();
        assert_eq!(got.last().unwrap().bytes, &snapshot(2, LEN).bytes[..]);
    }
}

#[test]
fn a_collective_failing_with_no_one_to_blame_costs_the_members_only_that_version() {
    let backend = stand_in();
    let b = Broadcaster::bind("127.0.0.1:0", access(), Some(backend.clone())).unwrap();
    let addr = b.local_addr();
    // The communicator waits for a fourth rank that never comes.
    let g = BroadcastGroup {
        world_size: 4,
        ..group(1, vec![member(1, 1), member(2, 2)], addr)
    };
    let members: Vec<_> = [1, 2]
        .map(|r| member_of(addr, (1, r, 4, r as u64), Some(backend.clone()), 2))
        .into();
    let out = b.send(
        &g,
        &snapshot(1, LEN),
        100,
        SECOND * 5,
        Duration::from_millis(500),
    );
    assert!(out.failed.is_empty(), "{}", out.describe_failures());
    assert_eq!(
        ranks(&out.missed.iter().map(|m| m.0.clone()).collect::<Vec<_>>()),
        [1, 2]
    );
    assert!(
        out.describe_missed()
            .contains("the stand-in broadcast failed: timed out"),
        "{}",
        out.describe_missed()
    );
    let out = b.send(&g, &snapshot(2, LEN), 100, SECOND * 5, SECOND * 5);
    assert_eq!((out.plane, ranks(&out.delivered)), ("tcp", vec![1, 2]));
    for t in members {
        let (got, errors) = t.join().unwrap();
        assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [2]);
        assert!(
            errors[0].contains("collective receive of v1 failed"),
            "{errors:?}"
        );
    }
}

#[test]
fn every_member_receives_each_version_intact() {
    let b = Broadcaster::bind("127.0.0.1:0", access(), None).unwrap();
    let members = vec![member(11, 1), member(12, 2), member(13, 3)];
    let g = group(1, members.clone(), b.local_addr());
    let threads: Vec<_> = members
        .iter()
        .map(|m| member_thread(b.local_addr(), 1, m.rank, m.worker_id, LEN))
        .collect();
    // Several buckets, the last one short.
    for v in 1..=2 {
        let snap = snapshot(v, LEN);
        let out = b.send(
            &g,
            &snap,
            1000,
            Duration::from_secs(5),
            Duration::from_secs(10),
        );
        assert!(out.failed.is_empty(), "{}", out.describe_failures());
        assert_eq!(out.delivered.len(), 3);
    }
    for t in threads {
        let got = t.join().unwrap();
        assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(got[1].bytes, &snapshot(2, LEN).bytes[..]);
        assert_eq!(got[1].dtype, "f32");
    }
}

#[test]
fn absent_stalled_and_stale_members_are_named_and_the_rest_served() {
    let b = Broadcaster::bind("127.0.0.1:0", access(), None).unwrap();
    let addr = b.local_addr();
    let g = group(
        3,
        vec![member(1, 1), member(2, 2), member(3, 3), member(4, 4)],
        addr,
    );
    // Rank 1 receives. Rank 2 joins but never reads (a hung generator). Rank 3
    // never joins. Rank 4 joined the previous epoch only.
    let good = member_thread(addr, 3, 1, 1, 16 << 20);
    let a = addr.to_string();
    let stalled = Receiver::connect(&join(&a, 3, 2, 2), SECOND * 5, None).unwrap();
    let _old = Receiver::connect(&join(&a, 2, 4, 4), SECOND * 5, None).unwrap();
    // Larger than the socket buffers, so the stalled member blocks the writer.
    let snap = snapshot(2, 16 << 20);
    let out = b.send(
        &g,
        &snap,
        1 << 20,
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    assert_eq!(
        out.delivered.iter().map(|m| m.rank).collect::<Vec<_>>(),
        [1]
    );
    let mut failed: Vec<(u32, String)> = out
        .failed
        .iter()
        .map(|(m, w)| (m.rank, w.clone()))
        .collect();
    failed.sort();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(failed[0].1.starts_with("stalled: took "), "{failed:?}");
    assert!(failed[1].1.contains("did not join epoch 3"), "{failed:?}");
    assert!(failed[2].1.contains("did not join epoch 3"), "{failed:?}");
    assert!(out.describe_failures().contains("gen-2 (rank 2): stalled"));
    assert!(out.seconds < 5.0, "{}", out.seconds);
    drop(stalled);
    assert_eq!(good.join().unwrap()[0].bytes, &snap.bytes[..]);
}

#[test]
fn a_wrong_token_is_refused() {
    let b = Broadcaster::bind("127.0.0.1:0", access(), None).unwrap();
    let addr = b.local_addr().to_string();
    let j = Join {
        token: "guess",
        ..join(&addr, 1, 1, 1)
    };
    let e = Receiver::connect(&j, SECOND * 5, None).err().unwrap();
    assert!(e.to_string().contains("token refused"), "{e}");
}

#[test]
fn a_corrupted_version_is_acknowledged_as_such() {
    // A hand-made trainer sends a version whose bytes do not match its checksums.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let trainer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 4 + 8 + 4 + 4 + 8 + 1 + 2 + 6 + 1 + 64];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"TNDW\x01\x00\x00\x00\x00").unwrap();
        let mut snap = snapshot(5, 100);
        let h = header(1, &snap, 64, false);
        snap.bytes = vec![0u8; 100].into();
        s.write_all(&h).unwrap();
        s.write_all(&snap.bytes).unwrap();
        read_array::<13>(&mut s).unwrap()
    });
    let addr = addr.to_string();
    let j = Join {
        param_elements: 25,
        ..join(&addr, 1, 1, 9)
    };
    let mut r = Receiver::connect(&j, SECOND * 5, None).unwrap();
    let e = r
        .recv(Duration::from_secs(5), Duration::from_secs(5))
        .unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    let ack = trainer.join().unwrap();
    assert_eq!(&ack[..4], ACK);
    assert_eq!(u64::from_le_bytes(ack[4..12].try_into().unwrap()), 5);
    assert_eq!(ack[12], 1);
}

/// A hand-made trainer: accepts one member, answers its hello, sends `frame` and
/// returns what the member sent back before it closed the connection.
fn forging_trainer(frame: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 4 + 8 + 4 + 4 + 8 + 1 + 2 + 6 + 1 + 64];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"TNDW\x01\x00\x00\x00\x00").unwrap();
        // The member may close before it all went: that is a refusal too.
        let _ = s.write_all(&frame);
        s.set_read_timeout(Some(SECOND * 10)).unwrap();
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        back
    });
    (addr, t)
}

/// A version header: epoch 1, version 5, inline, `dtype`, a full model's (adapter 0,
/// base 0), `bucket_bytes`, `sums` checksums (zeros) and an announced length of `len`.
fn forged_header(dtype: &str, bucket_bytes: u64, sums: u32, len: u64) -> Vec<u8> {
    forged_kind(dtype, (0, 0), bucket_bytes, sums, len)
}

/// [`forged_header`] with the kind `(adapter, base)` given.
fn forged_kind(
    dtype: &str,
    (adapter, base): (u8, u64),
    bucket_bytes: u64,
    sums: u32,
    len: u64,
) -> Vec<u8> {
    let mut h = b"TNDV".to_vec();
    h.extend_from_slice(&1u64.to_le_bytes());
    h.extend_from_slice(&5u64.to_le_bytes());
    h.push(0);
    h.push(dtype.len() as u8);
    h.extend_from_slice(dtype.as_bytes());
    h.push(adapter);
    h.extend_from_slice(&base.to_le_bytes());
    h.extend_from_slice(&bucket_bytes.to_le_bytes());
    h.extend_from_slice(&sums.to_le_bytes());
    h.extend(std::iter::repeat_n(0u8, 4 * sums.min(16) as usize));
    h.extend_from_slice(&len.to_le_bytes());
    h
}

/// Headers that announce more (or other) than the member's model holds are refused
/// before anything is allocated for them: a tebibyte, a count of checksums that does
/// not fit the length, a dtype no model has. The member closes the connection (no
/// acknowledgement: the trainer names it) and says which version to fetch over gRPC.
#[test]
fn a_header_announcing_more_than_the_model_holds_is_refused_without_allocating() {
    // The member's model: 25 f32 parameters, 100 bytes in buckets of 64.
    let cases = [
        (
            forged_header("f32", 64, 2, 1 << 40),
            "announces 1099511627776 bytes",
        ),
        (forged_header("f32", 64, 2, 104), "announces 104 bytes"),
        (
            forged_header("f32", 64, u32::MAX, 100),
            "4294967295 checksums",
        ),
        (forged_header("f32", 0, 1, 100), "0-byte buckets"),
        (forged_header("f64", 64, 2, 100), "dtype \"f64\""),
        (forged_header("f32\n;rm", 64, 2, 100), "dtype \"f32\\n;rm\""),
    ];
    for (frame, needle) in cases {
        let (addr, trainer) = forging_trainer(frame);
        let addr = addr.to_string();
        let j = Join {
            param_elements: 25,
            ..join(&addr, 1, 1, 9)
        };
        let mut r = Receiver::connect(&j, SECOND * 5, None).unwrap();
        let e = r.recv(SECOND * 5, SECOND * 5).unwrap_err().to_string();
        assert!(
            e.contains("refused the header of v5") && e.contains(needle),
            "{needle}: {e}"
        );
        assert!(e.contains("fetching it over gRPC"), "{e}");
        assert_eq!(r.refused(), Some(5));
        // Closed, with nothing acknowledged.
        assert!(trainer.join().unwrap().is_empty(), "{needle}");
    }
    // The header of the right size is taken.
    let snap = snapshot(5, 100);
    let mut frame = header(1, &snap, 64, false);
    frame.extend_from_slice(&snap.bytes);
    let (addr, trainer) = forging_trainer(frame);
    let addr = addr.to_string();
    let j = Join {
        param_elements: 25,
        ..join(&addr, 1, 1, 9)
    };
    let mut r = Receiver::connect(&j, SECOND * 5, None).unwrap();
    let got = r.recv(SECOND * 5, SECOND * 5).unwrap().unwrap();
    assert_eq!((got.version, got.bytes.len()), (5, 100));
    assert_eq!(r.refused(), None);
    drop(r);
    assert_eq!(&trainer.join().unwrap()[..4], ACK);
}

/// The base fingerprint of the adapter versions in these tests.
const BASE: u64 = 0x0123_4567_89ab_cdef;

/// An adapter version reaches members whose adapter is on its base with its kind and
/// base, over TCP and over the collective alike (the header, which carries them, goes
/// on TCP either way).
#[test]
fn an_adapter_version_keeps_its_kind_and_base_on_either_plane() {
    for backend in [None, Some(stand_in())] {
        let b = Broadcaster::bind("127.0.0.1:0", access(), backend.clone()).unwrap();
        let members = vec![member(11, 1), member(12, 2)];
        let g = group(1, members.clone(), b.local_addr());
        let threads: Vec<_> = members
            .iter()
            .map(|m| {
                let who = (1, m.rank, 3, m.worker_id);
                member_on(b.local_addr(), who, backend.clone(), 2, LEN, Some(BASE))
            })
            .collect();
        for v in 1..=2 {
            let snap = snapshot(v, LEN).with_base(Some(BASE));
            let out = b.send(&g, &snap, 1000, SECOND * 5, SECOND * 10);
            assert!(out.failed.is_empty(), "{}", out.describe_failures());
            let plane = if backend.is_some() { "stand-in" } else { "tcp" };
            assert_eq!((out.plane, ranks(&out.delivered)), (plane, vec![1, 2]));
        }
        for t in threads {
            let (got, errors) = t.join().unwrap();
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2]);
            assert!(got.iter().all(|r| r.base == Some(BASE)));
            assert_eq!(got[1].bytes, &snapshot(2, LEN).bytes[..]);
        }
    }
}

/// A header of another kind than the member's model (an adapter version to a member
/// without an adapter, a full one to a member with one, an adapter of another base), or
/// a kind that is neither, is refused by name before its length is looked at: the
/// member closes the connection unacknowledged and fetches the version over gRPC, where
/// the generator refuses it for good.
#[test]
fn a_header_of_another_kind_or_base_is_refused_before_its_length() {
    // The member's model: 25 trainable f32 parameters, 100 bytes in buckets of 64; the
    // forged lengths fit it, so only the kind can refuse them.
    let adapter_of = |base| forged_kind("f32", (1, base), 64, 2, 100);
    let cases = [
        (
            adapter_of(BASE),
            None,
            "are a LoRA adapter for base 0x0123456789abcdef; this generator's model (this member's model) has no adapter",
        ),
        (
            forged_header("f32", 64, 2, 100),
            Some(BASE),
            "are a full model's parameters",
        ),
        (
            adapter_of(0xfeed),
            Some(BASE),
            "adapter for base 0x000000000000feed; this generator's base is 0x0123456789abcdef",
        ),
        (
            forged_kind("f32", (2, BASE), 64, 2, 100),
            Some(BASE),
            "adapter = 2",
        ),
        (
            forged_kind("f32", (0, 5), 64, 2, 100),
            None,
            "a base 0x0000000000000005 on a full model's parameters",
        ),
    ];
    for (frame, base, needle) in cases {
        let (addr, trainer) = forging_trainer(frame);
        let addr = addr.to_string();
        let j = Join {
            param_elements: 25,
            base,
            ..join(&addr, 1, 1, 9)
        };
        let mut r = Receiver::connect(&j, SECOND * 5, None).unwrap();
        let e = r.recv(SECOND * 5, SECOND * 5).unwrap_err().to_string();
        assert!(
            e.contains("refused the header of v5") && e.contains(needle),
            "{needle}: {e}"
        );
        assert_eq!(r.refused(), Some(5));
        assert!(trainer.join().unwrap().is_empty(), "{needle}");
    }
    // The adapter of the member's own base is taken.
    let snap = snapshot(5, 100).with_base(Some(BASE));
    let mut frame = header(1, &snap, 64, false);
    frame.extend_from_slice(&snap.bytes);
    let (addr, trainer) = forging_trainer(frame);
    let addr = addr.to_string();
    let j = Join {
        param_elements: 25,
        base: Some(BASE),
        ..join(&addr, 1, 1, 9)
    };
    let mut r = Receiver::connect(&j, SECOND * 5, None).unwrap();
    let got = r.recv(SECOND * 5, SECOND * 5).unwrap().unwrap();
    assert_eq!(
        (got.version, got.base, got.bytes.len()),
        (5, Some(BASE), 100)
    );
    drop(r);
    assert_eq!(&trainer.join().unwrap()[..4], ACK);
}

/// A client holding the token cannot join as a worker whose session it does not
/// hold, nor under another rank or in an epoch that is over; the worker itself can.
#[test]
fn a_connection_is_tied_to_the_worker_it_claims() {
    let b = Broadcaster::bind("127.0.0.1:0", access(), None).unwrap();
    let addr = b.local_addr();
    let a = addr.to_string();
    let g = group(2, vec![member(1, 1), member(2, 2)], addr);
    // Worker 2's session, claiming worker 1.
    let impostor = Join {
        session: session(2),
        ..join(&a, 2, 1, 1)
    };
    let e = Receiver::connect(&impostor, SECOND * 5, None)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("session refused: not worker 1's"),
        "{e}"
    );
    let e = Receiver::connect(
        &Join {
            session: "",
            ..join(&a, 2, 1, 1)
        },
        SECOND * 5,
        None,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("session refused"), "{e}");
    assert!(b.joined().is_empty());
    // Once epoch 2 is being sent: the rank must be the worker's, the epoch current.
    let out = b.send(
        &g,
        &snapshot(1, LEN),
        1000,
        Duration::from_millis(100),
        SECOND,
    );
    assert_eq!(out.failed.len(), 2);
    let e = Receiver::connect(&join(&a, 2, 2, 1), SECOND * 5, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("not rank 2 of epoch 2"), "{e}");
    let e = Receiver::connect(&join(&a, 1, 1, 1), SECOND * 5, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("epoch 1 is over"), "{e}");
    // Worker 7 holds a valid session but is no member of epoch 2.
    let e = Receiver::connect(&join(&a, 2, 3, 7), SECOND * 5, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("not rank 3 of epoch 2"), "{e}");
    assert!(b.joined().is_empty());
    // The members themselves join and receive.
    let members: Vec<_> = [1, 2]
        .map(|r| member_of(addr, (2, r, 4, r as u64), None, 2))
        .into();
    let out = b.send(&g, &snapshot(2, LEN), 1000, SECOND * 5, SECOND * 5);
    assert_eq!(ranks(&out.delivered), [1, 2], "{}", out.describe_failures());
    for m in members {
        assert_eq!(m.join().unwrap().0[0].version, 2);
    }
}

/// 300 connections that never finish their hello: at most MAX_PENDING wait (each on
/// its thread), the rest are closed at once, and every waiting one is closed by the
/// hello deadline — one that trickles a byte a second too. A member joins afterwards.
#[test]
fn slow_connections_are_bounded_and_closed_by_the_hello_deadline() {
    let b = Broadcaster::bind("127.0.0.1:0", access(), None).unwrap();
    let addr = b.local_addr();
    // First, one that keeps sending, two bytes a second, never finishing its hello.
    let trickler = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        for _ in 0..60 {
            if c.write_all(b"T").is_err() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        started.elapsed()
    });
    while b.pending() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let mut conns: Vec<std::net::TcpStream> = (0..300)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            // Half a hello: the magic, then nothing.
            let _ = c.write_all(b"TNDH");
            c
        })
        .collect();
    // Watched for two seconds from when every connection is made (on a loaded machine
    // making 300 can itself take longer than that).
    let mut most = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        most = most.max(b.pending());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(most > 0 && most <= MAX_PENDING, "{most} pending");
    // Each connection ends: closed unread at once, or at its hello deadline.
    for c in &mut conns {
        c.set_read_timeout(Some(HELLO_TIMEOUT + SECOND * 5))
            .unwrap();
        let mut buf = [0u8; 16];
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a slow connection is still open: {other:?}"),
        }
    }
    assert!(
        t0.elapsed() < HELLO_TIMEOUT + SECOND * 5,
        "{:?}",
        t0.elapsed()
    );
    // Held until its deadline, not a moment past it (a write notices the close within
    // two writes).
    let trickled = trickler.join().unwrap();
    assert!(
        trickled >= HELLO_TIMEOUT - Duration::from_millis(100)
            && trickled < HELLO_TIMEOUT + SECOND * 3,
        "the trickler was held {trickled:?}"
    );
    let t1 = Instant::now();
    while b.pending() > 0 {
        assert!(t1.elapsed() < SECOND * 5, "{} still pending", b.pending());
        std::thread::sleep(Duration::from_millis(10));
    }
    let a = addr.to_string();
    let _member = Receiver::connect(&join(&a, 1, 1, 1), SECOND * 5, None).unwrap();
    // Kept once its welcome is written.
    let t2 = Instant::now();
    while b.joined() != [1] {
        assert!(t2.elapsed() < SECOND * 2, "{:?}", b.joined());
        std::thread::sleep(Duration::from_millis(5));
    }
}
