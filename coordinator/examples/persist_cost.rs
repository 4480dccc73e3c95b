//! How long saving the coordinator's state takes (`Core::persist`: encode + one redb
//! transaction with fsync) with `open` open leases and `committed` committed ones: the
//! cost each lease, commit and publish pays before its reply.
//!
//!   cargo run --release -p tandem-coordinator --example persist_cost
use std::time::Instant;

use tandem_coordinator::config::{CoordinatorConfig, RunSection};
use tandem_coordinator::state::{Core, Settings};
use tandem_coordinator::store::{Store, STATE_FILE};
use tandem_data::{DataConfig, Dataset};
use tandem_proto::v1::Role;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    for (open, committed) in [(8, 8), (256, 256), (4096, 4096)] {
        let path = dir.path().join(format!("{open}-{STATE_FILE}"));
        let mut core = Core::new(
            Settings {
                run: RunSection::default(),
                coordinator: CoordinatorConfig::default(),
                config_toml: "[run]\nsteps = 1\n".into(),
            },
            Dataset::load(&DataConfig::default()).unwrap(),
        );
        let (store, saved) = Store::open(&path).unwrap();
        core.attach(store, saved).unwrap();
        let now = Instant::now();
        let gens: Vec<u64> = (0..64)
            .map(|i| {
                core.members
                    .register(format!("gen-{i}"), Role::Generator, String::new(), now)
            })
            .collect();
        let granted = core.leases.grant(gens[0], (open + committed) as u64, now);
        for (id, prompt) in granted.iter().take(committed) {
            core.leases.commit(*id, *prompt, 0, 1).unwrap();
        }
        let mut times = Vec::new();
        for i in 0..50 {
            // One change per save, as a lease or a commit makes.
            core.leases.grant(gens[i % 64], 1, now);
            let t0 = Instant::now();
            core.persist().unwrap();
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "open {open:>5}, committed {committed:>5}: persist median {:.2} ms, p90 {:.2} ms, file {} KiB",
            times[times.len() / 2],
            times[times.len() * 9 / 10],
            std::fs::metadata(&path).unwrap().len() / 1024
        );
    }
}
