//! The learner loop of the trainer service: wait for a batch of fresh-enough groups,
//! run one step of the configured algorithm, publish the next version.

use candle_core::DType;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_model::{Model, Pretrained};

use crate::config::{AlgorithmConfig, Compute, OptimizerConfig};
use crate::error::{invalid, Result};
use crate::node::buffer::Group;
use crate::node::service::Shared;
use crate::node::watch;
use crate::optimizer::Optimizer;
use crate::rl::rollout::Rollout;
use crate::rl::step::{Frozen, StepMetrics, StepPlan};
use tandem_model::ScalarHead;
use tandem_report::samples::Sample;
use tandem_weights::Snapshot;

/// The run's shape as the learner needs it.
pub struct RunShape {
    pub steps: u64,
    pub batch_groups: usize,
    pub max_staleness: u64,
    pub run_dir: PathBuf,
    pub dump_batches: bool,
    /// `[run] log_samples`: steps between the samples in `samples.jsonl` (0 = none).
    pub log_samples: u64,
    /// Sleep instead of training (benchmarks of the control plane).
    pub mock_train_ms: u64,
    /// Layout and scheduling of the step's compute (`[trainer]`).
    pub compute: Compute,
}

/// What one finished step reports (to the coordinator and to `metrics.jsonl`).
pub struct StepReport {
    pub step: u64,
    pub version: u64,
    pub metrics: StepMetrics,
    /// Staleness of every trained sample.
    pub staleness: Vec<u32>,
    /// Groups dropped as too stale while forming this batch.
    pub stale_dropped: Vec<Group>,
    /// The leases whose groups this step trained.
    pub trained_leases: Vec<u64>,
    pub wait_seconds: f64,
    pub step_seconds: f64,
    /// Groups dynamic sampling has filtered out so far (`[run] filter_zero_std`).
    pub filtered_groups: u64,
    /// The held-out evaluation after this step (`eval_*`), when one ran.
    pub eval: BTreeMap<String, f64>,
    /// A few of the step's completions as text, every `log_samples` steps.
    pub samples: Vec<Sample>,
    /// The bytes of the version this step published (under LoRA the adapter's only).
    pub version_bytes: u64,
    /// Over the step's groups: the episodes of their failed runs that failed, and the
    /// times they were run again (failures are retried, never trained).
    pub episodes_failed: u64,
    pub groups_retried: u64,
}

pub struct Learner {
    pub policy: Pretrained,
    pub reference: Option<Model>,
    /// The on-policy distillation teacher (`[algorithm] teacher`).
    pub teacher: Option<Model>,
    pub critic: Option<ScalarHead>,
    pub opt: Optimizer,
    pub algorithm: AlgorithmConfig,
    pub optimizer: OptimizerConfig,
    pub plan: RunShape,
    pub step: u64,
    pub version: u64,
    /// The dtype `final/` is saved in: `[model] save_dtype`, else the dtype the run's
    /// starting model came in (kept through `--resume` in `trainer.json`).
    pub save_dtype: DType,
    /// The run's starting model as configured (`[model] path`): a LoRA adapter's base.
    pub base: String,
}

impl Learner {
    /// Waits (polling the buffer) for a batch; returns it (`None` when a stop was asked
    /// for meanwhile), the groups dropped as stale meanwhile, and the seconds waited.
    fn next_batch(&self, shared: &Shared) -> Result<(Option<Vec<Group>>, Vec<Group>, f64)> {
        let t0 = Instant::now();
        let mut dropped_total = Vec::new();
        loop {
            let (batch, dropped) = match shared.buffer.lock() {
                Ok(mut b) => b.take_batch(
                    self.plan.batch_groups,
                    self.version,
                    self.plan.max_staleness,
                ),
                Err(_) => return Err(invalid("the rollout buffer was poisoned by a panic")),
            };
            if !dropped.is_empty() {
                shared.space.notify_waiters();
                if let Some(tx) = shared.discard.get() {
                    let _ = tx.send(dropped.iter().map(|g| g.lease_id).collect());
                }
            }
            dropped_total.extend(dropped);
            if let Some(batch) = batch {
                shared.space.notify_waiters();
                return Ok((Some(batch), dropped_total, t0.elapsed().as_secs_f64()));
            }
            if shared.stopping() {
                return Ok((None, dropped_total, t0.elapsed().as_secs_f64()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs one step on the next batch; publishes the new version into `shared`. A stop
    /// asked for while it waits for the batch ends it with `Err` of the groups dropped
    /// as stale meanwhile (no step ran).
    pub fn step_once(&mut self, shared: &Shared) -> Result<Result<StepReport, Vec<Group>>> {
        let (groups, stale_dropped, wait_seconds) = match self.next_batch(shared)? {
            (Some(groups), dropped, wait) => (groups, dropped, wait),
            (None, dropped, _) => return Ok(Err(dropped)),
        };
        let t0 = Instant::now();
        let rollouts: Vec<Rollout> = groups
            .iter()
            .flat_map(|g| g.rollouts.iter().cloned())
            .collect();
        let staleness: Vec<u32> = rollouts
            .iter()
            .map(|r| {
                let oldest = r.oldest_version().unwrap_or(self.version);
                self.version.saturating_sub(oldest) as u32
            })
            .collect();
        if let Some(&s) = staleness.iter().max() {
            if u64::from(s) > self.plan.max_staleness {
                return Err(invalid(format!(
                    "a sample {s} versions old reached the step (max_staleness {})",
                    self.plan.max_staleness
                )));
            }
        }
        if self.plan.dump_batches {
            self.dump(&groups)?;
        }
        let metrics = if self.plan.mock_train_ms > 0 {
            // Benchmarks of the control plane: wait instead of training.
            std::thread::sleep(Duration::from_millis(self.plan.mock_train_ms));
            StepMetrics {
                sequences: rollouts.len(),
                reward_mean: rollouts.iter().map(|r| r.reward).sum::<f64>()
                    / rollouts.len().max(1) as f64,
                ..Default::default()
            }
        } else {
            StepPlan {
                policy: &self.policy.model,
                frozen: Frozen {
                    reference: self.reference.as_ref(),
                    teacher: self.teacher.as_ref(),
                },
                critic: self.critic.as_ref(),
                rollouts: &rollouts,
                algorithm: &self.algorithm,
                optimizer: &self.optimizer,
                step_index: self.step,
                policy_version: Some(self.version),
                compute: &self.plan.compute,
            }
            .run(&mut self.opt)?
        };
        let samples = match watch::samples_due(self.plan.log_samples, self.step + 1) {
            true => {
                let (adv, tok) = (&metrics.completion_advantages, &self.policy.tokenizer);
                watch::pick(&rollouts, adv, tok, self.step + 1, self.version)
            }
            false => Vec::new(),
        };
        self.step += 1;
        self.version += 1;
        let snap = Snapshot::of(&self.policy.model, self.version)?;
        let version_bytes = snap.bytes.len() as u64;
        // Checksummed here, off the RPC path, before any receiver asks.
        snap.checksums(shared.bucket_bytes);
        if let Ok(mut w) = shared.weights.write() {
            *w = Arc::new(snap);
        }
        shared.version.store(self.version, Ordering::SeqCst);
        Ok(Ok(StepReport {
            step: self.step,
            version: self.version,
            metrics,
            staleness,
            stale_dropped,
            trained_leases: groups.iter().map(|g| g.lease_id).collect(),
            wait_seconds,
            step_seconds: t0.elapsed().as_secs_f64(),
            filtered_groups: shared.filtered.load(Ordering::SeqCst),
            eval: BTreeMap::new(),
            samples,
            version_bytes,
            episodes_failed: groups.iter().map(|g| u64::from(g.episodes_failed)).sum(),
            groups_retried: groups.iter().map(|g| u64::from(g.retries)).sum(),
        }))
    }

    /// `RUN_DIR/batches/step-N.jsonl`: each rollout of `groups` as a line, with its
    /// ids decoded beside them and its group's `info` (the dataset record's) when the
    /// record has one.
    fn dump(&self, groups: &[Group]) -> Result<()> {
        let dir = self.plan.run_dir.join("batches");
        std::fs::create_dir_all(&dir)
            .map_err(|e| invalid(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(format!("step-{:06}.jsonl", self.step + 1));
        let mut text = String::new();
        let decode = |ids: &[u32]| {
            let t = self.policy.tokenizer.decode(ids, false);
            t.unwrap_or_else(|e| format!("<not decodable: {e}>"))
        };
        for g in groups {
            // Checked to be one JSON object at ingest.
            let info: Option<serde_json::Value> =
                g.info.as_deref().and_then(|t| serde_json::from_str(t).ok());
            for r in &g.rollouts {
                // The ids decoded beside them (`parse_jsonl` reads the ids, not the text).
                let mut line = serde_json::to_value(r).map_err(|e| invalid(e.to_string()))?;
                line["prompt_text"] = decode(&r.prompt_ids).into();
                line["completion_text"] = decode(&r.completion_ids).into();
                if let Some(info) = &info {
                    line["info"] = info.clone();
                }
                text += &line.to_string();
                text.push('\n');
            }
        }
        // Whole or not at all: a reader (a test, `tandem train-step`) never sees half.
        tandem_model::write_atomic(&path, text)
            .map_err(|e| invalid(format!("writing {}: {e}", path.display())))
    }

    /// Appends the step's line to `RUN_DIR/metrics.jsonl`; returns it.
    pub fn log(&self, r: &StepReport) -> Result<serde_json::Value> {
        let path = self.plan.run_dir.join("metrics.jsonl");
        let mut line = serde_json::to_value(&r.metrics).map_err(|e| invalid(e.to_string()))?;
        if let Some(obj) = line.as_object_mut() {
            for (k, v) in r.batch_metrics() {
                obj.insert(k.to_string(), v);
            }
            for (k, v) in &r.eval {
                obj.insert(k.clone(), (*v).into());
            }
            obj.insert(
                "unix_time".into(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0)
                    .into(),
            );
        }
        tandem_model::durable::append_line(&path, &line.to_string())?;
        Ok(line)
    }
}

impl StepReport {
    /// What the step measured about its batch beside the training metrics: step,
    /// version, staleness max and mean, stale drops, the wait and step seconds, and the
    /// groups dynamic sampling filtered out so far, the published version's bytes, and
    /// the failed episodes and re-runs of the step's groups.
    fn batch_metrics(&self) -> [(&'static str, serde_json::Value); 11] {
        let s = &self.staleness;
        [
            ("step", self.step.into()),
            ("version", self.version.into()),
            ("staleness_max", s.iter().copied().max().unwrap_or(0).into()),
            (
                "staleness_mean",
                (s.iter().map(|&x| x as f64).sum::<f64>() / s.len().max(1) as f64).into(),
            ),
            ("stale_dropped", self.stale_dropped.len().into()),
            ("wait_seconds", self.wait_seconds.into()),
            ("step_seconds", self.step_seconds.into()),
            ("filtered_groups", self.filtered_groups.into()),
            ("version_bytes", self.version_bytes.into()),
            ("episodes_failed", self.episodes_failed.into()),
            ("groups_retried", self.groups_retried.into()),
        ]
    }

    /// Every metric of the step as name → value (the coordinator's `tandem_train_*`
    /// gauges): the training metrics and the batch's (step, version and the version's
    /// bytes travel in their own fields).
    pub fn metric_map(&self) -> HashMap<String, f64> {
        let mut out: HashMap<String, f64> = match serde_json::to_value(&self.metrics) {
            Ok(serde_json::Value::Object(o)) => o
                .into_iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
                .collect(),
            _ => HashMap::new(),
        };
        for (k, v) in self.batch_metrics() {
            // Step, version and the version's bytes travel in their own fields (the
            // last as the coordinator's `tandem_weight_version_bytes`).
            let own_field = matches!(k, "step" | "version" | "version_bytes");
            if let (false, Some(x)) = (own_field, v.as_f64()) {
                out.insert(k.to_string(), x);
            }
        }
        out.extend(self.eval.iter().map(|(k, v)| (k.clone(), *v)));
        out.retain(|_, x| x.is_finite());
        out
    }
}
