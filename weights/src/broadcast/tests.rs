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

/// Member `worker_id` of epoch `epoch` as rank `rank` of a 4-rank world.
fn join(addr: &str, epoch: u64, rank: u32, worker_id: u64) -> Join<'_> {
    Join {
        addr,
        epoch,
        rank,
        world_size: 4,
        worker_id,
        token: "secret",
    }
}

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
) -> std::thread::JoinHandle<Vec<Received>> {
    let t = member_of(addr, (epoch, rank, 4, id), None, 2);
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
    std::thread::spawn(move || {
        let addr = addr.to_string();
        let j = Join {
            world_size,
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
    let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
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
        let out = b.send(&g, &snapshot(v, 3017), 1000, SECOND * 5, SECOND * 10);
        assert!(out.failed.is_empty(), "{}", out.describe_failures());
        assert_eq!(out.plane, "stand-in");
        assert_eq!(ranks(&out.delivered), [1, 2, 3]);
    }
    for t in threads {
        let (got, errors) = t.join().unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(got[1].bytes, &snapshot(2, 3017).bytes[..]);
    }
}

#[test]
fn a_member_without_a_communicator_makes_the_epoch_go_over_tcp() {
    let backend = stand_in();
    let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
    let g = group(1, vec![member(1, 1), member(2, 2)], b.local_addr());
    let with = member_of(b.local_addr(), (1, 1, 3, 1), Some(backend), 1);
    let without = member_of(b.local_addr(), (1, 2, 3, 2), None, 1);
    let out = b.send(&g, &snapshot(1, 500), 100, SECOND * 5, SECOND * 10);
    assert_eq!(out.plane, "tcp");
    assert_eq!(ranks(&out.delivered), [1, 2], "{}", out.describe_failures());
    for t in [with, without] {
        assert_eq!(t.join().unwrap().0[0].bytes, &snapshot(1, 500).bytes[..]);
    }
}

#[test]
fn a_stalled_member_is_named_and_the_epoch_goes_on_over_tcp() {
    let backend = stand_in();
    let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
    let addr = b.local_addr();
    let g = group(1, vec![member(1, 1), member(2, 2), member(3, 3)], addr);
    let good: Vec<_> = [1, 2]
        .map(|r| member_of(addr, (1, r, 4, r as u64), Some(backend.clone()), 2))
        .into();
    // Rank 3 joins, communicator and all, and never reads: the collective hangs on it.
    let a = addr.to_string();
    let _stalled = Receiver::connect(&join(&a, 1, 3, 3), SECOND * 5, Some(&backend)).unwrap();
    let short = Duration::from_millis(800);
    let out = b.send(&g, &snapshot(1, 4000), 1000, SECOND * 5, short);
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
        &snapshot(2, 4000),
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
        assert_eq!(got.last().unwrap().bytes, &snapshot(2, 4000).bytes[..]);
    }
}

#[test]
fn a_collective_failing_with_no_one_to_blame_costs_the_members_only_that_version() {
    let backend = stand_in();
    let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
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
        &snapshot(1, 300),
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
    let out = b.send(&g, &snapshot(2, 300), 100, SECOND * 5, SECOND * 5);
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
    let b = Broadcaster::bind("127.0.0.1:0", "secret", None).unwrap();
    let members = vec![member(11, 1), member(12, 2), member(13, 3)];
    let g = group(1, members.clone(), b.local_addr());
    let threads: Vec<_> = members
        .iter()
        .map(|m| member_thread(b.local_addr(), 1, m.rank, m.worker_id))
        .collect();
    // Several buckets, the last one short.
    for v in 1..=2 {
        let snap = snapshot(v, 3 * 1000 + 17);
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
        assert_eq!(got[1].bytes, &snapshot(2, 3017).bytes[..]);
        assert_eq!(got[1].dtype, "f32");
    }
}

#[test]
fn absent_stalled_and_stale_members_are_named_and_the_rest_served() {
    let b = Broadcaster::bind("127.0.0.1:0", "secret", None).unwrap();
    let addr = b.local_addr();
    let g = group(
        3,
        vec![member(1, 1), member(2, 2), member(3, 3), member(4, 4)],
        addr,
    );
    // Rank 1 receives. Rank 2 joins but never reads (a hung generator). Rank 3
    // never joins. Rank 4 joined the previous epoch only.
    let good = member_thread(addr, 3, 1, 1);
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
    let b = Broadcaster::bind("127.0.0.1:0", "secret", None).unwrap();
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
        let mut hello = [0u8; 4 + 8 + 4 + 4 + 8 + 1 + 2 + 6];
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
    let mut r = Receiver::connect(&join(&addr, 1, 1, 9), SECOND * 5, None).unwrap();
    let e = r
        .recv(Duration::from_secs(5), Duration::from_secs(5))
        .unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    let ack = trainer.join().unwrap();
    assert_eq!(&ack[..4], ACK);
    assert_eq!(u64::from_le_bytes(ack[4..12].try_into().unwrap()), 5);
    assert_eq!(ack[12], 1);
}
