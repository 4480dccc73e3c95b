//! The learner loop as the trainer process runs it: each step trained (and evaluated
//! when due), published to the coordinator, broadcast to the generators and
//! checkpointed; the final model after the last.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use tandem_proto::client::{self, Authed};
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{BroadcastGroup, PublishVersionRequest};

use super::buffer::Group;
use super::checkpoint;
use super::evaluate::Evaluations;
use super::learner::{Learner, StepReport};
use super::publisher::Pusher;
use super::service::Shared;
use super::watch::Watch;
use super::Settings;
use crate::error::{invalid, Context, Result};

/// What the loop works with besides the learner.
pub(super) struct Training<'a> {
    pub s: &'a Settings,
    pub rt: &'a tokio::runtime::Runtime,
    pub coord: &'a CoordinatorClient<Authed>,
    pub shared: &'a Shared,
    pub pusher: Option<&'a Pusher>,
    pub evals: Option<Evaluations>,
    /// `samples.jsonl` and TensorBoard's events.
    pub watch: Watch,
    /// What no resume can go back past (sent with each publish: the coordinator
    /// forgets the leases trained before it).
    pub resumable_from: u64,
}

impl Training<'_> {
    /// Runs the steps from the learner's to the run's last: the held-out evaluation
    /// first on a fresh run, then per step train, publish, broadcast, checkpoint (the
    /// last step writes the final model before its publish, and neither broadcasts nor
    /// checkpoints). A stop asked for ends the loop after the step being trained, or at
    /// once while it waits for a batch ([`Training::stop`]).
    pub fn run(&mut self, learner: &mut Learner) -> Result<Ended> {
        let run_dir = &self.s.run_dir;
        if let (Some(e), 0) = (&mut self.evals, learner.step) {
            let m = e
                .run(&learner.policy, 0, learner.version, run_dir)
                .context("the held-out evaluation before the first step")?;
            self.watch.eval(0, &m);
        }
        while learner.step < self.s.steps {
            if self.shared.stopping() {
                return self.stop(learner);
            }
            let report = match self.train(learner)? {
                Ok(report) => report,
                Err(stale) => {
                    record_stale(&stale, run_dir)?;
                    return self.stop(learner);
                }
            };
            let last = learner.step == self.s.steps;
            if last {
                finish(learner, self.shared, run_dir)?;
            }
            let group = self.publish(&report, last)?;
            if !last {
                self.broadcast(group);
                if self.shared.stopping() {
                    return self.stop(learner);
                }
                self.checkpoint(learner)?;
            }
        }
        Ok(Ended::Finished)
    }

    /// After a stop was asked for: ingestion closed (the groups committed by then are
    /// in the buffer), then a checkpoint of the step the learner finished (published),
    /// unless the newest checkpoint already is of it, so that `--resume` continues
    /// exactly there: no step is done twice, no committed group is lost.
    fn stop(&mut self, learner: &Learner) -> Result<Ended> {
        self.shared.close(Duration::from_secs(10));
        let run_dir = &self.s.run_dir;
        let newest = checkpoint::latest(run_dir)
            .ok()
            .flatten()
            .and_then(|d| checkpoint::load_state(&d).ok())
            .map(|st| st.step);
        if newest != Some(learner.step) {
            self.save(learner)?;
        }
        tracing::info!(
            step = learner.step,
            "stopped: the checkpoint of step {} is kept; `--resume` continues from it",
            learner.step
        );
        Ok(Ended::Stopped)
    }

    /// One step on the next batch, evaluated when due, its line logged; `Err` of the
    /// groups dropped as stale while it waited when a stop was asked for meanwhile.
    fn train(&mut self, learner: &mut Learner) -> Result<Result<StepReport, Vec<Group>>> {
        let mut report = match learner.step_once(self.shared)? {
            Ok(report) => report,
            Err(stale) => return Ok(Err(stale)),
        };
        let last = learner.step == self.s.steps;
        if let Some(e) = self.evals.as_mut().filter(|e| e.due(report.step, last)) {
            report.eval = e
                .run(
                    &learner.policy,
                    report.step,
                    report.version,
                    &self.s.run_dir,
                )
                .with_context(|| format!("the held-out evaluation after step {}", report.step))?;
        }
        let line = learner.log(&report)?;
        self.watch.step(report.step, &line, &report.samples);
        Ok(Ok(report))
    }

    /// Publishes the step's version to the coordinator, with what it consumed and what
    /// was dropped since the last publish; returns the broadcast group the
    /// coordinator formed for it.
    fn publish(&self, report: &StepReport, last: bool) -> Result<Option<BroadcastGroup>> {
        let dropped = dropped_since_last_publish(self.shared, report, &self.s.run_dir)?;
        tracing::info!(
            step = report.step,
            reward = format!("{:.3}", report.metrics.reward_mean),
            loss = format!("{:.4}", report.metrics.loss),
            staleness_max = report.staleness.iter().max().copied().unwrap_or(0),
            seconds = format!("{:.2}", report.step_seconds),
            "step"
        );
        let req = PublishVersionRequest {
            version: report.version,
            step: report.step,
            metrics: report.metric_map(),
            staleness: report.staleness.clone(),
            dropped,
            buffer_groups: self.shared.buffer_len() as u64,
            wait_seconds: report.wait_seconds,
            version_bytes: report.version_bytes,
            finished: last,
            // Consumed: trained, or dropped as stale (either way done with; a rewind
            // past this step re-issues them, one before it does not).
            trained_leases: report
                .trained_leases
                .iter()
                .copied()
                .chain(report.stale_dropped.iter().map(|g| g.lease_id))
                .collect(),
            resumable_from: self.resumable_from,
            ..Default::default()
        };
        let published = self
            .rt
            .block_on(publish_version(self.coord, req))
            .map_err(|e| {
                invalid(format!(
                    "publishing version {} to the coordinator: {}",
                    report.version,
                    client::describe(&e)
                ))
            })?;
        Ok(published.into_inner().group)
    }

    /// Offers the new weights to the broadcast group (when there is a pusher).
    fn broadcast(&self, group: Option<BroadcastGroup>) {
        if let (Some(p), Some(group)) = (self.pusher, group) {
            if let Ok(w) = self.shared.weights.read() {
                p.offer(group, w.clone());
            }
        }
    }

    /// Every `checkpoint_every` steps, a checkpoint (after the publish, so the
    /// coordinator knows what it has trained).
    fn checkpoint(&mut self, learner: &Learner) -> Result<()> {
        let every = self.s.trainer.checkpoint_every;
        if every > 0 && learner.step.is_multiple_of(every) {
            self.save(learner)?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the learner and the buffer now.
    fn save(&mut self, learner: &Learner) -> Result<()> {
        let buffer = self
            .shared
            .buffer
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default();
        let keep = self.s.trainer.keep_checkpoints;
        let dir = checkpoint::save(&self.s.run_dir, learner, &buffer, keep)?;
        tracing::info!(checkpoint = %dir.display(), "checkpoint written");
        self.resumable_from = checkpoint::resumable_from(&self.s.run_dir);
        Ok(())
    }
}

/// How the learner loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// The run's last step is done and the final model saved.
    Finished,
    /// A stop was asked for; the checkpoint of the step finished is written.
    Stopped,
}

/// Announces the version a resumed trainer starts from, with the leases its buffer
/// kept.
pub(super) fn announce_resume(
    rt: &tokio::runtime::Runtime,
    coord: &CoordinatorClient<Authed>,
    learner: &Learner,
    kept: Vec<u64>,
    buffer_groups: usize,
) -> Result<()> {
    let req = PublishVersionRequest {
        version: learner.version,
        step: learner.step,
        resumed: true,
        buffered_leases: kept,
        buffer_groups: buffer_groups as u64,
        ..Default::default()
    };
    rt.block_on(publish_version(coord, req)).map_err(|e| {
        invalid(format!(
            "announcing the resumed version {}: {}",
            learner.version,
            client::describe(&e)
        ))
    })?;
    Ok(())
}

/// Publishes a version, through a coordinator restart (a repeat of a publish that was
/// applied changes nothing, so a retry is safe).
async fn publish_version(
    coord: &CoordinatorClient<Authed>,
    req: PublishVersionRequest,
) -> std::result::Result<tonic::Response<tandem_proto::v1::PublishVersionReply>, tonic::Status> {
    tandem_proto::retry::retry("publishing a version", || {
        let (mut c, req) = (coord.clone(), req.clone());
        async move { c.publish_version(client::unary(req)).await }
    })
    .await
}

/// After the last step: closes ingestion and writes `final/` and `trainer-summary.json`
/// (with what was left in the buffer).
fn finish(learner: &Learner, shared: &Shared, run_dir: &Path) -> Result<()> {
    shared.close(Duration::from_secs(10));
    let out = run_dir.join("final");
    tandem_model::save_policy(&learner.policy, &out, learner.save_dtype, &learner.base)
        .with_context(|| format!("writing {}", out.display()))?;
    if let Some(c) = &learner.critic {
        c.save(&out, tandem_model::VALUE_HEAD_FILE)?;
    }
    let left: Vec<String> = shared
        .buffer
        .lock()
        .map(|b| b.groups().map(|g| g.key()).collect())
        .unwrap_or_default();
    let summary = serde_json::json!({"steps": learner.step, "version": learner.version, "groups_left_in_buffer": left});
    tandem_model::write_atomic(&run_dir.join("trainer-summary.json"), summary.to_string())?;
    Ok(())
}

/// Groups refused since the last publish by reason, with the step's stale drops added
/// (and their keys appended to `RUN_DIR/stale-groups.txt`, across trainer restarts).
fn dropped_since_last_publish(
    shared: &Shared,
    report: &StepReport,
    run_dir: &Path,
) -> Result<HashMap<String, u64>> {
    let dropped = shared
        .dropped
        .lock()
        .map(|mut d| std::mem::take(&mut *d))
        .unwrap_or_default();
    let mut dropped: HashMap<String, u64> = dropped.into_iter().collect();
    if !report.stale_dropped.is_empty() {
        *dropped.entry("stale".into()).or_default() += report.stale_dropped.len() as u64;
        record_stale(&report.stale_dropped, run_dir)?;
    }
    Ok(dropped)
}

/// Appends the keys of groups dropped as stale to `RUN_DIR/stale-groups.txt` (across
/// trainer restarts).
fn record_stale(groups: &[Group], run_dir: &Path) -> Result<()> {
    if groups.is_empty() {
        return Ok(());
    }
    let keys: String = groups.iter().map(|g| format!("{}\n", g.key())).collect();
    let path = run_dir.join("stale-groups.txt");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    std::io::Write::write_all(&mut f, keys.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
