//! The lag metrics of a run, exported in Prometheus text format at `/metrics`.
//! Every name is prefixed `tandem_`; the coordinator is the one scrape target (workers
//! report to it in heartbeats and publishes).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

pub const POLICY_VERSION: &str = "tandem_policy_version";
pub const STEP: &str = "tandem_step";
/// The per-generator series (label `generator`), rendered at scrape time from the live
/// members (`export.rs`), never through the recorder: a generator that leaves or is
/// dropped takes them with it.
pub const GENERATOR_POLICY_VERSION: &str = "tandem_generator_policy_version";
pub const GENERATOR_LAG: &str = "tandem_generator_lag";
pub const ROLLOUT_STALENESS: &str = "tandem_rollout_staleness";
pub const BUFFER_GROUPS: &str = "tandem_buffer_groups";
pub const LEASES_RUNNING: &str = "tandem_leases_running";
pub const GROUPS_ACCEPTED: &str = "tandem_groups_accepted_total";
pub const GROUPS_DROPPED: &str = "tandem_groups_dropped_total";
pub const LEASES_REISSUED: &str = "tandem_leases_reissued_total";
/// Leases taken back for a starved generator (overdue, or above the holder's share).
pub const LEASES_RECLAIMED: &str = "tandem_leases_reclaimed_total";
/// Calls refused because a generator's token made a trainer's call.
pub const PERMISSION_DENIED: &str = "tandem_permission_denied_total";
/// Requests refused for a value past its limit or malformed (INVALID_ARGUMENT,
/// RESOURCE_EXHAUSTED).
pub const REQUESTS_REFUSED: &str = "tandem_requests_refused_total";
/// Leases granted in place of groups dynamic sampling filtered out.
pub const LEASES_EXTRA: &str = "tandem_leases_extra_total";
/// accepted / (accepted + filtered): the share of groups that taught something.
pub const INFORMATIVE_SHARE: &str = "tandem_informative_group_share";
pub const WEIGHT_SYNC_SECONDS: &str = "tandem_weight_sync_seconds";
pub const WEIGHT_SYNC_BYTES: &str = "tandem_weight_sync_bytes_total";
/// Bytes of the latest published version (a LoRA run's are only the adapter's).
pub const WEIGHT_VERSION_BYTES: &str = "tandem_weight_version_bytes";
pub const GENERATED_TOKENS: &str = "tandem_generated_tokens_total";
/// Prompt tokens a generator's engine computed (its prefix cache's hits not included).
pub const PREFILL_TOKENS: &str = "tandem_generator_prefill_tokens_total";
/// Prompt tokens a generator's engine took from its prefix cache.
pub const PREFIX_CACHE_HIT_TOKENS: &str = "tandem_generator_prefix_cache_hit_tokens_total";
pub const TRAINER_WAIT: &str = "tandem_trainer_wait_seconds_total";
pub const GENERATOR_WAIT: &str = "tandem_generator_wait_seconds_total";
pub const WORKERS: &str = "tandem_workers";
pub const WORKERS_DROPPED: &str = "tandem_workers_dropped_total";
pub const HEARTBEAT_AGE: &str = "tandem_generator_heartbeat_age_seconds";
pub const WEIGHT_SYNC_FAILURES: &str = "tandem_weight_sync_failures_total";
pub const STALENESS_BOUND: &str = "tandem_staleness_bound";
pub const RUN_FINISHED: &str = "tandem_run_finished";
/// The `reason` labels of `GROUPS_DROPPED`: the trainer's ("stale": past η when taken,
/// "invalid": failed the ingest checks, "malformed": undecodable, "disconnected": the
/// rollout stream was cut (a generator died or its connection was reset), "zero_std":
/// filtered out by dynamic sampling) and the coordinator's commit refusals
/// (`Refusal::as_str`).
pub const DROP_REASONS: &[&str] = &[
    "stale",
    "zero_std",
    "invalid",
    "malformed",
    "disconnected",
    "unknown_lease",
    "expired",
    "duplicate",
    "mismatch",
    "not_holder",
];
/// Episodes that failed through no doing of the model (an agent program, the
/// Environment service, a tool's infrastructure, the reward service), as generators
/// report them in heartbeats: never trained, their groups run again.
pub const EPISODES_FAILED: &str = "tandem_episodes_failed_total";
/// Groups a generator ran again after a failed run (heartbeats).
pub const GROUPS_RETRIED: &str = "tandem_groups_retried_total";
/// Groups given back after `[env] max_retries` failed re-runs, by `reason`
/// ([`FAILURE_REASONS`], from the generator's `Release`).
pub const GROUPS_FAILED: &str = "tandem_groups_failed_total";
/// The `reason` labels of `GROUPS_FAILED`, by `GroupFailure`.
pub const FAILURE_REASONS: &[&str] = &[
    "agent",
    "environment",
    "tool",
    "reward_service",
    "reward_bound",
];

/// The `reason` label of a group's failure (`None`: not a failure).
pub fn failure_reason(f: tandem_proto::v1::GroupFailure) -> Option<&'static str> {
    use tandem_proto::v1::GroupFailure as F;
    match f {
        F::Unspecified => None,
        F::Agent => Some("agent"),
        F::Environment => Some("environment"),
        F::Tool => Some("tool"),
        F::RewardService => Some("reward_service"),
        F::RewardBound => Some("reward_bound"),
    }
}

/// Per-step training metrics become `tandem_train_<name>` gauges.
pub const TRAIN_PREFIX: &str = "tandem_train_";

/// How long a series may go without an update before `/metrics` forgets it.
pub const IDLE_SERIES: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(ROLLOUT_STALENESS.into()),
                    &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(WEIGHT_SYNC_SECONDS.into()),
                        &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
                    )
                })
                .expect("bucket lists are non-empty")
                // The per-generator series are rendered from the members at scrape time
                // (`export.rs`): they go with their generator. Any other series not
                // updated for 15 minutes is forgotten too; the run's own gauges are set
                // again on every reaper tick.
                .idle_timeout(
                    MetricKindMask::COUNTER | MetricKindMask::GAUGE,
                    Some(IDLE_SERIES),
                )
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder already installed (a test harness) keeps its own.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Describes every metric so `/metrics` carries HELP lines.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(POLICY_VERSION, "Newest published policy version");
    describe_gauge!(STEP, "Optimizer steps done");
    describe_histogram!(
        ROLLOUT_STALENESS,
        "Versions between a trained sample's oldest token and the policy"
    );
    describe_gauge!(BUFFER_GROUPS, "Groups waiting in the trainer's buffer");
    describe_gauge!(LEASES_RUNNING, "Prompt leases outstanding");
    describe_counter!(
        GROUPS_ACCEPTED,
        "Groups committed into the trainer's buffer"
    );
    describe_counter!(GROUPS_DROPPED, "Groups refused or dropped, by reason");
    describe_counter!(
        PERMISSION_DENIED,
        "Calls refused because a generator's token made a call only the trainer may make"
    );
    describe_counter!(
        LEASES_EXTRA,
        "Leases granted in place of groups dynamic sampling filtered out (every reward equal)"
    );
    describe_gauge!(
        INFORMATIVE_SHARE,
        "Share of finished groups that were informative: accepted / (accepted + filtered)"
    );
    describe_counter!(
        LEASES_REISSUED,
        "Leases expired and their prompts leased again"
    );
    describe_counter!(
        REQUESTS_REFUSED,
        "Requests refused for a value past its limit (tandem_proto::limits) or malformed"
    );
    describe_counter!(
        LEASES_RECLAIMED,
        "Leases taken back for a generator that had none: overdue, or above the holder's fair share"
    );
    describe_histogram!(
        WEIGHT_SYNC_SECONDS,
        "Duration of a generator's weight fetch"
    );
    describe_counter!(WEIGHT_SYNC_BYTES, "Bytes of weights fetched by generators");
    describe_gauge!(
        WEIGHT_VERSION_BYTES,
        "Bytes of the latest published version as generators receive it (under [lora] only the adapter's A and B; 0 until the trainer reports one)"
    );
    describe_gauge!(WORKERS, "Registered workers by role");
    describe_counter!(
        WORKERS_DROPPED,
        "Workers dropped for missing heartbeats, by role"
    );
    describe_gauge!(
        STALENESS_BOUND,
        "The configured staleness bound η in versions (0 = synchronous)"
    );
    describe_gauge!(
        RUN_FINISHED,
        "1 once the trainer has published its last step"
    );
    describe_counter!(
        EPISODES_FAILED,
        "Episodes that failed through no doing of the model (agent program, Environment service, tool infrastructure, reward service): never trained"
    );
    describe_counter!(
        GROUPS_RETRIED,
        "Groups a generator ran again with new episodes after a failed run"
    );
    describe_counter!(
        GROUPS_FAILED,
        "Groups given back after [env] max_retries failed re-runs, by what failed"
    );
}

/// Gives every series whose absence would read as "no data" a first value, so
/// alerts and dashboards see 0 rather than nothing before the first event.
pub fn initialise(max_staleness: u64) {
    metrics::gauge!(STALENESS_BOUND).set(max_staleness as f64);
    metrics::gauge!(RUN_FINISHED).set(0.0);
    metrics::counter!(GROUPS_ACCEPTED).absolute(0);
    metrics::counter!(LEASES_REISSUED).absolute(0);
    metrics::counter!(LEASES_RECLAIMED).absolute(0);
    metrics::counter!(REQUESTS_REFUSED).absolute(0);
    metrics::counter!(LEASES_EXTRA).absolute(0);
    metrics::counter!(PERMISSION_DENIED).absolute(0);
    metrics::gauge!(INFORMATIVE_SHARE).set(1.0);
    metrics::counter!(WEIGHT_SYNC_BYTES).absolute(0);
    metrics::gauge!(WEIGHT_VERSION_BYTES).set(0.0);
    for role in ["generator", "trainer"] {
        metrics::counter!(WORKERS_DROPPED, "role" => role).absolute(0);
    }
    for reason in DROP_REASONS {
        metrics::counter!(GROUPS_DROPPED, "reason" => *reason).absolute(0);
    }
    metrics::counter!(EPISODES_FAILED).absolute(0);
    metrics::counter!(GROUPS_RETRIED).absolute(0);
    for reason in FAILURE_REASONS {
        metrics::counter!(GROUPS_FAILED, "reason" => *reason).absolute(0);
    }
    // A histogram handle registers the series; its buckets read 0 until a sample.
    let _ = metrics::histogram!(ROLLOUT_STALENESS);
    let _ = metrics::histogram!(WEIGHT_SYNC_SECONDS);
}

/// A Prometheus-safe metric name from a training metric's name: `tandem_train_<name>`,
/// or `tandem_<name>` for the held-out evaluation's `eval_*` metrics.
pub fn train_metric_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.starts_with("eval_") {
        return format!("tandem_{clean}");
    }
    format!("{TRAIN_PREFIX}{clean}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Refusal;

    #[test]
    fn every_group_failure_is_a_known_reason() {
        use tandem_proto::v1::GroupFailure as F;
        let reasons: Vec<_> = [
            F::Agent,
            F::Environment,
            F::Tool,
            F::RewardService,
            F::RewardBound,
        ]
        .into_iter()
        .map(|f| failure_reason(f).unwrap())
        .collect();
        assert_eq!(reasons, FAILURE_REASONS);
        assert_eq!(failure_reason(F::Unspecified), None);
    }

    #[test]
    fn every_refusal_is_a_known_drop_reason() {
        for r in [
            Refusal::UnknownLease,
            Refusal::Expired,
            Refusal::Duplicate,
            Refusal::Mismatch,
            Refusal::NotHolder,
        ] {
            assert!(DROP_REASONS.contains(&r.as_str()), "{}", r.as_str());
        }
    }
}
