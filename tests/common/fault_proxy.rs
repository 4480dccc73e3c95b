//! A TCP proxy on loopback that misbehaves on purpose: it forwards each connection to
//! an upstream address, delays some chunks, and every few seconds cuts every
//! connection it holds (both directions at once, as a middlebox reset would). The
//! chaos test routes generator → trainer traffic through it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A small seeded generator (xorshift64*), so a failing run can be replayed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A seed from the environment variable `var` when set, else from the clock;
    /// printed with the setting that replays it.
    pub fn replayable_seed(var: &str, what: &str) -> u64 {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what} seed {seed} ({var}={seed} replays it)");
        seed
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in lo..=hi.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    resets: AtomicU64,
    delays: AtomicU64,
    refused: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`. Each forwarded chunk
    /// is held back 20–200 ms with probability 1/20; every 1.5–4 s every open
    /// connection is cut.
    pub fn start(upstream: String, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        {
            let (live, counts, stop) = (live.clone(), counts.clone(), stop.clone());
            let mut rng = Rng::new(seed ^ 0xC0FFEE);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(rng.between(1500, 4000)));
                    let cut: Vec<TcpStream> = std::mem::take(&mut *live.lock().unwrap());
                    if !cut.is_empty() {
                        counts.resets.fetch_add(1, Ordering::SeqCst);
                    }
                    for s in cut {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            });
        }
        {
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    n += 1;
                    let to = upstream.parse::<SocketAddr>().expect("an ip:port upstream");
                    let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else {
                        // The trainer is down (restarting): the client sees the
                        // connection close and tries again.
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                        continue;
                    };
                    counts.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    {
                        let mut l = live.lock().unwrap();
                        l.push(client.try_clone().unwrap());
                        l.push(server.try_clone().unwrap());
                    }
                    for (i, (from, to)) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let counts = counts.clone();
                        let rng = Rng::new(seed ^ (n << 1 | i as u64));
                        std::thread::spawn(move || pump(from, to, rng, &counts));
                    }
                }
            });
        }
        FaultProxy { addr, counts, stop }
    }

    /// Connections forwarded, cut (rounds of cuts that found a connection), chunks
    /// delayed, and connections refused because the upstream was down.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let c = &self.counts;
        (
            c.connections.load(Ordering::SeqCst),
            c.resets.load(Ordering::SeqCst),
            c.delays.load(Ordering::SeqCst),
            c.refused.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` → `to` until either side closes, holding back some chunks.
fn pump(mut from: TcpStream, mut to: TcpStream, mut rng: Rng, counts: &Counts) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if rng.between(1, 20) == 1 {
            counts.delays.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(rng.between(20, 200)));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
