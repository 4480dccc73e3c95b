//! The coordinator's durable state: members, leases, the prompt cursor, the broadcast
//! group, the published version and the metrics a resumed run reports, saved in an
//! embedded transactional database (`redb`) in the run's folder. Each change is
//! committed (and fsynced) before the reply that depends on it, so a coordinator killed
//! at any instant and started again on the same folder continues the run: its workers
//! find themselves still registered, a lease granted before the crash commits exactly
//! once, and a retried call whose reply was lost is answered as the first was.
//!
//! The state is one record, written whole (it is small: the lease tables are bounded by
//! [`crate::lease::HISTORY`] and settled as the trainer checkpoints) and only when it
//! changed. What is not saved restarts from zero: heartbeat ages (every worker gets the
//! heartbeat timeout to show up again), lease ages (each counts from the restart) and
//! the Prometheus counters (a counter reset, which `rate()` handles).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::group::Group;
use crate::lease::Leases;
use crate::membership::Members;
use crate::state::Core;

/// The file in the run folder that holds the state.
pub const STATE_FILE: &str = "coordinator.redb";

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("coordinator");
const KEY: &str = "state";

/// The database, and the bytes last written (an unchanged state is not written again).
pub struct Store {
    db: Database,
    path: PathBuf,
    last: Vec<u8>,
    /// The run's [`run_identity`], computed once.
    identity: String,
}

/// The saved record. Borrowed from the [`Core`] when saving, owned when loading.
#[derive(Serialize, Deserialize)]
struct Saved<'a> {
    /// The run's config without its `[coordinator]` section (see [`run_identity`]): a
    /// coordinator started on this folder with another one refuses, rather than mixing
    /// two runs.
    config: Cow<'a, str>,
    leases: Cow<'a, Leases>,
    members: Cow<'a, Members>,
    group: Cow<'a, Group>,
    version: u64,
    step: u64,
    train_metrics: Cow<'a, BTreeMap<String, f64>>,
    dropped: Cow<'a, BTreeMap<String, u64>>,
    buffer_groups: u64,
    max_staleness_seen: u32,
    trainer_wait_s: f64,
    finished: bool,
    /// Absent in a state saved before it was kept (0: not reported).
    #[serde(default)]
    version_bytes: u64,
}

impl Store {
    /// Opens (or creates) the database at `path`; returns it with the saved state's
    /// bytes when there are any.
    pub fn open(path: &Path) -> Result<(Store, Option<Vec<u8>>)> {
        let io = |e: &dyn std::fmt::Display| {
            Error::Io(format!(
                "the coordinator's state {}: {e} (is another coordinator running on this run folder?)",
                path.display()
            ))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
        }
        let db = Database::create(path).map_err(|e| io(&e))?;
        let saved = {
            let tx = db.begin_read().map_err(|e| io(&e))?;
            match tx.open_table(TABLE) {
                Ok(t) => t.get(KEY).map_err(|e| io(&e))?.map(|v| v.value().to_vec()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(io(&e)),
            }
        };
        Ok((
            Store {
                db,
                path: path.to_path_buf(),
                last: saved.clone().unwrap_or_default(),
                identity: String::new(),
            },
            saved,
        ))
    }

    /// Writes `bytes` in one transaction, durable when this returns; nothing when they
    /// equal what was last written.
    fn save(&mut self, bytes: Vec<u8>) -> Result<()> {
        if bytes == self.last {
            return Ok(());
        }
        let io = |e: &dyn std::fmt::Display| {
            Error::Io(format!(
                "saving the coordinator's state to {}: {e}",
                self.path.display()
            ))
        };
        let tx = self.db.begin_write().map_err(|e| io(&e))?;
        {
            let mut t = tx.open_table(TABLE).map_err(|e| io(&e))?;
            t.insert(KEY, bytes.as_slice()).map_err(|e| io(&e))?;
        }
        tx.commit().map_err(|e| io(&e))?;
        self.last = bytes;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What must not change across a restart: the config without its `[coordinator]`
/// section (addresses, timeouts and deadlines may: a restarted coordinator may listen
/// on the port its first start was given). Text that is not TOML is taken as it is.
fn run_identity(config_toml: &str) -> String {
    match config_toml.parse::<toml::Table>() {
        Ok(mut t) => {
            t.remove("coordinator");
            t.to_string()
        }
        Err(_) => config_toml.to_string(),
    }
}

impl Core {
    /// Saves the state if it has a store and changed; the error is what the caller's
    /// reply says (`UNAVAILABLE`: the change is not durable, so it must not be relied
    /// on — the caller retries).
    pub fn persist(&mut self) -> Result<(), tonic::Status> {
        let Some(mut store) = self.store.take() else {
            return Ok(());
        };
        let r = serde_json::to_vec(&self.saved(&store.identity))
            .map_err(|e| Error::Io(format!("encoding the coordinator's state: {e}")))
            .and_then(|bytes| store.save(bytes));
        self.store = Some(store);
        r.map_err(|e| {
            tracing::error!("{e}");
            tonic::Status::unavailable(e.to_string())
        })
    }

    fn saved<'a>(&'a self, identity: &'a str) -> Saved<'a> {
        Saved {
            config: Cow::Borrowed(identity),
            leases: Cow::Borrowed(&self.leases),
            members: Cow::Borrowed(&self.members),
            group: Cow::Borrowed(&self.group),
            version: self.version,
            step: self.step,
            train_metrics: Cow::Borrowed(&self.train_metrics),
            dropped: Cow::Borrowed(&self.dropped),
            buffer_groups: self.buffer_groups,
            max_staleness_seen: self.max_staleness_seen,
            trainer_wait_s: self.trainer_wait_s,
            finished: self.finished(),
            version_bytes: self.version_bytes,
        }
    }

    /// Attaches `store` and continues from the state it holds, if any. Refuses a state
    /// saved by a run with another config, or by a run that has finished.
    pub fn attach(&mut self, mut store: Store, saved: Option<Vec<u8>>) -> Result<()> {
        let path = store.path().display().to_string();
        store.identity = run_identity(&self.settings.config_toml);
        let identity = store.identity.clone();
        self.store = Some(store);
        let Some(bytes) = saved else {
            tracing::info!(state = %path, "a new run: the coordinator's state is saved here");
            return self
                .persist()
                .map_err(|e| Error::Io(e.message().to_string()));
        };
        let s: Saved<'static> = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Invalid(format!(
                "{path}: not a Tandem coordinator state ({e}); move it away to start a new run"
            ))
        })?;
        if s.config != identity {
            return Err(Error::Invalid(format!(
                "{path} holds the state of a run with another config: start the coordinator with the same config to continue that run, or use a new [run] run_dir (or move the file away) to start a new one"
            )));
        }
        if s.finished {
            return Err(Error::Invalid(format!(
                "{path}: this run finished at step {}; use a new [run] run_dir (or move the file away) to start a new one",
                s.step
            )));
        }
        self.leases = s.leases.into_owned();
        self.members = s.members.into_owned();
        self.group = s.group.into_owned();
        self.version = s.version;
        self.step = s.step;
        self.train_metrics = s.train_metrics.into_owned();
        self.dropped = s.dropped.into_owned();
        self.buffer_groups = s.buffer_groups;
        self.max_staleness_seen = s.max_staleness_seen;
        self.trainer_wait_s = s.trainer_wait_s;
        self.version_bytes = s.version_bytes;
        let now = Instant::now();
        for (_, w) in self.members.iter_mut() {
            w.last_seen = now;
        }
        for (k, v) in &self.train_metrics {
            metrics::gauge!(crate::metrics::train_metric_name(k)).set(*v);
        }
        self.export_gauges();
        tracing::warn!(
            state = %path,
            version = self.version,
            step = self.step,
            leases_open = self.leases.running(),
            workers = self.members.iter().count(),
            "continuing the run from the saved state: workers have the heartbeat timeout to reconnect"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tandem_data::{DataConfig, Dataset};
    use tandem_proto::v1::{PublishVersionRequest, Role};

    use super::*;
    use crate::config::{CoordinatorConfig, RunSection};
    use crate::lease::Closing;
    use crate::state::Settings;

    fn core(config: &str) -> Core {
        let settings = Settings {
            run: RunSection::default(),
            coordinator: CoordinatorConfig::default(),
            config_toml: config.into(),
        };
        Core::new(settings, Dataset::load(&DataConfig::default()).unwrap())
    }

    fn opened(path: &Path, config: &str) -> Result<Core> {
        let mut c = core(config);
        let (store, saved) = Store::open(path)?;
        c.attach(store, saved)?;
        Ok(c)
    }

    /// Everything a resumed run depends on comes back; what was not saved restarts.
    #[test]
    fn a_reopened_state_continues_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let now = Instant::now();
        let (gen, leases) = {
            let mut c = opened(&path, "a").unwrap();
            let gen = c
                .members
                .register("gen-0".into(), Role::Generator, String::new(), now);
            c.members
                .register("trainer".into(), Role::Trainer, "127.0.0.1:9".into(), now);
            let leases = c.leases.grant(gen, 3, now);
            c.leases.commit(leases[0].0, leases[0].1, 0, 7).unwrap();
            c.publish(&PublishVersionRequest {
                version: 1,
                step: 1,
                trained_leases: vec![leases[0].0],
                metrics: [("loss".to_string(), 0.5)].into(),
                version_bytes: 4096,
                ..Default::default()
            })
            .unwrap();
            c.leases.commit(leases[1].0, leases[1].1, 0, 8).unwrap();
            c.persist().unwrap();
            (gen, leases)
            // Dropped without a goodbye, as a killed process.
        };
        let mut c = opened(&path, "a").unwrap();
        assert_eq!((c.version, c.step), (1, 1));
        assert_eq!(c.train_metrics["loss"], 0.5);
        assert_eq!(c.version_bytes, 4096);
        assert_eq!(c.members.trainer_address(), Some("127.0.0.1:9"));
        assert_eq!(c.members.get(gen).map(|w| w.name.as_str()), Some("gen-0"));
        assert_eq!((c.leases.accepted, c.leases.running()), (2, 1));
        // The commit retried across the restart, a late duplicate, the open lease.
        assert_eq!(
            c.leases.commit(leases[1].0, leases[1].1, 0, 8),
            Ok(Closing::Repeat)
        );
        assert!(c.leases.commit(leases[0].0, leases[0].1, 0, 9).is_err());
        assert_eq!(
            c.leases.commit(leases[2].0, leases[2].1, 0, 10),
            Ok(Closing::Now)
        );
        // The cursor goes on; ids are not reused.
        let next = c.leases.grant(gen, 1, now);
        assert_eq!(next[0].1, 3);
        assert!(next[0].0 > leases[2].0);
        // A worker that never comes back is dropped after the timeout, counted from
        // the restart.
        c.reap(Instant::now() + Duration::from_secs(60));
        assert_eq!(c.members.iter().count(), 0);
        assert_eq!(c.leases.pending_reissue(), vec![3]);
    }

    #[test]
    fn another_run_or_a_finished_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        {
            let mut c = opened(&path, "a").unwrap();
            c.leases.grant(1, 1, Instant::now());
            c.persist().unwrap();
        }
        let e = opened(&path, "b").err().unwrap().to_string();
        assert!(e.contains("another config") && e.contains("run_dir"), "{e}");
        {
            let mut c = opened(&path, "a").unwrap();
            c.publish(&PublishVersionRequest {
                version: 1,
                step: 1,
                finished: true,
                ..Default::default()
            })
            .unwrap();
            c.persist().unwrap();
        }
        let e = opened(&path, "a").err().unwrap().to_string();
        assert!(e.contains("finished at step 1"), "{e}");
        std::fs::write(&path, b"not a database").unwrap();
        assert!(opened(&path, "a").is_err());
    }
}
