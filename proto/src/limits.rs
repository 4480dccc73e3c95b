//! Limits on every value a Tandem endpoint reads from the wire, in one place: each a
//! named constant with its reason, each documented at its field in `proto/*.proto`.
//! A server checks a request against them ([`Check`]) before it uses or stores any
//! part of it, and refuses one past a limit with INVALID_ARGUMENT naming the field,
//! the limit and the fix. Text a peer sent reaches a log only through [`printable`]
//! (control characters escaped, cut with a marker past [`LOG_BYTES`]).
//!
//! Not limited here: what a worker reads from the coordinator's replies (the run's own
//! config, dataset prompts, the trainer's address), which the run's operator wrote
//! (but a lease's `info_json`, bounded because it travels on to other services), and
//! lists of ids from the trainer (the only holder of the run's token): those are bounded
//! by [`crate::MAX_MESSAGE_BYTES`] like every message. Counts a peer reports (tokens,
//! bytes, failures) are any `u64`; whoever sums them saturates instead of wrapping.

use crate::v1::{
    DiscardRequest, ExcludeRequest, HeartbeatRequest, LeaseRequest, PromptLease,
    PublishVersionRequest, RegisterRequest, ReleaseRequest, RolloutGroup, WeightBucket,
};

/// `RegisterRequest.name`: a worker's name ("gen-0"), a label of every per-generator
/// metric and a field of log lines and `tandem status`; long enough for a pod or host
/// name with a suffix. Control characters are refused too (they would forge log lines
/// and break metric labels).
pub const NAME_BYTES: usize = 128;

/// `RegisterRequest.address`, `HeartbeatRequest.broadcast_address`: `host:port`, where
/// a DNS name is at most 253 bytes, plus `:65535`.
pub const ADDRESS_BYTES: usize = 260;

/// `ReleaseRequest.reason`, `ExcludeRequest.reason`, `DiscardRequest.reason`: free
/// text for the coordinator's log ("no ack for v7 within 10 s"); a few lines of error
/// chain fit, a dump does not.
pub const REASON_BYTES: usize = 4096;

/// `Completion.finish_reason`: "stop", "length" or empty.
pub const FINISH_REASON_BYTES: usize = 16;

/// `RolloutGroup.session_token` and the broadcast hello's session: a session token is
/// 64 hex digits (HMAC-SHA256, [`crate::auth::session_token`]).
pub const SESSION_TOKEN_BYTES: usize = 64;

/// The run's or the generator token as a broadcast hello presents it (a shared secret
/// of any reasonable length; `openssl rand -hex 32` makes 64 bytes).
pub const TOKEN_BYTES: usize = 1024;

/// `PublishVersionRequest.metrics` and `.dropped` keys: they become metric names and
/// label values ("loss", "eval_pass_at_8", "zero_std").
pub const METRIC_NAME_BYTES: usize = 128;

/// `PublishVersionRequest.metrics`: distinct training metrics one publish may carry
/// (a step reports a few dozen; each becomes a gauge, so their number is bounded).
pub const METRICS_PER_PUBLISH: usize = 256;

/// `HeartbeatRequest.weight_sync_seconds`: syncs one beat may report (a beat comes
/// every fraction of a second; a generator syncs at most once per version).
pub const SYNCS_PER_BEAT: usize = 1024;

/// `HeartbeatRequest.wait_seconds` and each `weight_sync_seconds`: seconds of what
/// happened since the previous beat, which came seconds ago; a day is generous.
pub const SECONDS_PER_BEAT: f64 = 86_400.0;

/// `LeaseRequest.max_groups`: prompt groups one request may ask for.
pub const LEASE_GROUPS: u32 = 4096;

/// Workers registered at once (the coordinator refuses more with RESOURCE_EXHAUSTED):
/// a run has one trainer and tens of generators; each member costs a row of the saved
/// state and a series of each per-generator metric.
pub const WORKERS: usize = 4096;

/// `Completion.tool_seconds`: seconds one episode spent in tools; a week is more than
/// any episode runs (and the sum over a batch stays finite).
pub const TOOL_SECONDS: f64 = 604_800.0;

/// `WeightBucket.dtype` and the broadcast header's dtype: "f32", "bf16" or "f16".
pub const DTYPE_BYTES: usize = 8;

/// `WeightBucket.total_bytes` and `PublishVersionRequest.version_bytes`: the bytes of one
/// version, which a generator assembles in memory (16 G parameters in f32).
pub const WEIGHT_VERSION_BYTES: u64 = 64 << 30;

/// `ResetReply.observation`, `StepReply.observation`: an environment's message to the
/// model (it is tokenized into the context, which is far smaller).
pub const OBSERVATION_BYTES: usize = 1 << 20;

/// `PromptLease.info_json`, `RolloutGroup.info_json` (and what the generator hands on
/// as `ScoreRequest.info_json`, `ResetRequest.info_json` and an agent's `info`): a
/// dataset record's info as JSON, which travels with every lease of the record and
/// every group, so a lease reply of a few hundred groups stays far below
/// [`crate::MAX_MESSAGE_BYTES`]. Metadata fits (a task name, a level, ids, a few tests);
/// large data (files, test suites) belongs in a store the service reads by a key kept in
/// the info. `tandem_data::INFO_BYTES` is the same number: a dataset with a larger info
/// is refused when it is loaded.
pub const INFO_BYTES: usize = 64 << 10;
/// `RolloutGroup.retries`: times a generator ran a group again after a failed episode
/// before the group it sends, and the most `[env] max_retries` may be (each re-run costs
/// a whole group's sampling; past a few, the environment is broken, not unlucky).
/// `RolloutGroup.episodes_failed` is at most `retries` × the run's group size (checked
/// by the trainer, which knows it).
pub const GROUP_RETRIES: u32 = 100;

/// The default `[reward] bound`: a completion's reward must satisfy |r| ≤ this (the
/// trainer refuses the group otherwise). Generous for any reward scale in use; small
/// enough that a sum of squares over a batch stays far from f64's and f32's range.
pub const REWARD_BOUND: f64 = 1e6;

/// The most of a peer's text a log line shows before the cut marker.
pub const LOG_BYTES: usize = 1024;

/// A value past its limit. The message names the field, the limit and the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "{field}: {len} bytes, over the limit of {limit} (tandem_proto::limits::{constant}); {fix}"
    )]
    TooLong {
        field: String,
        len: usize,
        limit: usize,
        constant: &'static str,
        fix: &'static str,
    },
    #[error("{field}: contains a control character ({found:?}) at byte {at}; send printable text")]
    Control {
        field: String,
        at: usize,
        found: char,
    },
    #[error("{field}: {value}, must be {bound}")]
    OutOfRange {
        field: String,
        value: String,
        bound: String,
    },
    #[error("{field}: {why}; {fix}")]
    Malformed {
        field: String,
        why: String,
        fix: &'static str,
    },
}

impl From<LimitError> for tonic::Status {
    fn from(e: LimitError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A message whose every field is checked against its limit.
pub trait Check {
    fn check(&self) -> Result<(), LimitError>;
}

/// `value` is at most `limit` bytes.
pub fn check_len(
    field: &str,
    value: &str,
    limit: usize,
    constant: &'static str,
    fix: &'static str,
) -> Result<(), LimitError> {
    if value.len() > limit {
        return Err(LimitError::TooLong {
            field: field.to_string(),
            len: value.len(),
            limit,
            constant,
            fix,
        });
    }
    Ok(())
}

/// `value` is at most `limit` bytes and has no control character.
pub fn check_text(
    field: &str,
    value: &str,
    limit: usize,
    constant: &'static str,
    fix: &'static str,
) -> Result<(), LimitError> {
    check_len(field, value, limit, constant, fix)?;
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, found)) => Err(LimitError::Control {
            field: field.to_string(),
            at,
            found,
        }),
        None => Ok(()),
    }
}

/// `value` is finite and in `lo..=hi`.
pub fn check_range(field: &str, value: f64, lo: f64, hi: f64) -> Result<(), LimitError> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        return Ok(());
    }
    Err(LimitError::OutOfRange {
        field: field.to_string(),
        value: format!("{value}"),
        bound: format!("finite and in [{lo}, {hi}]"),
    })
}

/// `n` items at most `limit`.
pub fn check_count(
    field: &str,
    n: usize,
    limit: usize,
    constant: &'static str,
) -> Result<(), LimitError> {
    if n > limit {
        return Err(LimitError::OutOfRange {
            field: field.to_string(),
            value: format!("{n} entries"),
            bound: format!("at most {limit} (tandem_proto::limits::{constant})"),
        });
    }
    Ok(())
}

/// A peer's text as a log line may show it: control characters escaped as `{:?}`
/// escapes them (`\n`, `\u{1b}`), the rest as it is, cut after [`LOG_BYTES`] with a
/// marker saying how much was left out.
pub fn printable(s: &str) -> Printable<'_> {
    Printable(s, LOG_BYTES)
}

/// See [`printable`]; `Printable(text, most_bytes)`.
#[derive(Clone, Copy)]
pub struct Printable<'a>(pub &'a str, pub usize);

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let kept = cut(self.0, self.1);
        for c in kept.chars() {
            if c.is_control() {
                for e in c.escape_debug() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        if kept.len() < self.0.len() {
            write!(f, "…[{} more bytes]", self.0.len() - kept.len())?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// The longest prefix of `s` of at most `most` bytes that ends on a character boundary.
pub fn cut(s: &str, most: usize) -> &str {
    if s.len() <= most {
        return s;
    }
    let mut end = most;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `host:port` with a non-empty host (an IP or a DNS name) and a numeric port.
pub fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    })
}

/// `value` is empty (no info) or the text of one JSON object of at most [`INFO_BYTES`].
pub fn check_info(field: &str, value: &str, fix: &'static str) -> Result<(), LimitError> {
    if value.is_empty() {
        return Ok(());
    }
    check_len(field, value, INFO_BYTES, "INFO_BYTES", fix)?;
    match serde_json::from_str::<serde_json::Value>(value) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(LimitError::Malformed {
            field: field.to_string(),
            why: "not a JSON object".into(),
            fix,
        }),
        Err(e) => Err(LimitError::Malformed {
            field: field.to_string(),
            why: format!("not JSON ({e})"),
            fix,
        }),
    }
}

fn address(field: &str, value: &str) -> Result<(), LimitError> {
    check_text(
        field,
        value,
        ADDRESS_BYTES,
        "ADDRESS_BYTES",
        "give host:port",
    )
}

fn reason(field: &str, value: &str) -> Result<(), LimitError> {
    check_len(
        field,
        value,
        REASON_BYTES,
        "REASON_BYTES",
        "cut the reason (it is for a log line)",
    )
}

impl Check for RegisterRequest {
    fn check(&self) -> Result<(), LimitError> {
        if self.name.is_empty() {
            return Err(LimitError::OutOfRange {
                field: "name".into(),
                value: "empty".into(),
                bound: format!("1 to {NAME_BYTES} bytes"),
            });
        }
        check_text(
            "name",
            &self.name,
            NAME_BYTES,
            "NAME_BYTES",
            "use a shorter --name",
        )?;
        address("address", &self.address)
    }
}

impl Check for HeartbeatRequest {
    fn check(&self) -> Result<(), LimitError> {
        address("broadcast_address", &self.broadcast_address)?;
        check_range("wait_seconds", self.wait_seconds, 0.0, SECONDS_PER_BEAT)?;
        check_count(
            "weight_sync_seconds",
            self.weight_sync_seconds.len(),
            SYNCS_PER_BEAT,
            "SYNCS_PER_BEAT",
        )?;
        for (i, s) in self.weight_sync_seconds.iter().enumerate() {
            check_range(
                &format!("weight_sync_seconds[{i}]"),
                *s,
                0.0,
                SECONDS_PER_BEAT,
            )?;
        }
        Ok(())
    }
}

impl Check for LeaseRequest {
    fn check(&self) -> Result<(), LimitError> {
        if !(1..=LEASE_GROUPS).contains(&self.max_groups) {
            return Err(LimitError::OutOfRange {
                field: "max_groups".into(),
                value: self.max_groups.to_string(),
                bound: format!("in 1..={LEASE_GROUPS}"),
            });
        }
        Ok(())
    }
}

impl Check for ReleaseRequest {
    fn check(&self) -> Result<(), LimitError> {
        if crate::v1::GroupFailure::try_from(self.failure).is_err() {
            return Err(LimitError::OutOfRange {
                field: "failure".into(),
                value: self.failure.to_string(),
                bound: "a GroupFailure value (0 to 5)".into(),
            });
        }
        reason("reason", &self.reason)
    }
}

impl Check for ExcludeRequest {
    fn check(&self) -> Result<(), LimitError> {
        if self.worker_ids.is_empty() {
            return Err(LimitError::OutOfRange {
                field: "worker_ids".into(),
                value: "none".into(),
                bound: "at least one".into(),
            });
        }
        check_count("worker_ids", self.worker_ids.len(), WORKERS, "WORKERS")?;
        reason("reason", &self.reason)
    }
}

impl Check for DiscardRequest {
    fn check(&self) -> Result<(), LimitError> {
        reason("reason", &self.reason)
    }
}

impl Check for PublishVersionRequest {
    fn check(&self) -> Result<(), LimitError> {
        check_count(
            "metrics",
            self.metrics.len(),
            METRICS_PER_PUBLISH,
            "METRICS_PER_PUBLISH",
        )?;
        for k in self.metrics.keys().chain(self.dropped.keys()) {
            check_text(
                "metrics/dropped key",
                k,
                METRIC_NAME_BYTES,
                "METRIC_NAME_BYTES",
                "use a shorter metric name",
            )?;
        }
        check_bytes("version_bytes", self.version_bytes)
    }
}

/// `value` bytes of one version at most [`WEIGHT_VERSION_BYTES`].
fn check_bytes(field: &str, value: u64) -> Result<(), LimitError> {
    if value > WEIGHT_VERSION_BYTES {
        return Err(LimitError::OutOfRange {
            field: field.into(),
            value: format!("{value} bytes"),
            bound: format!(
                "at most {WEIGHT_VERSION_BYTES} (tandem_proto::limits::WEIGHT_VERSION_BYTES)"
            ),
        });
    }
    Ok(())
}

/// A bucket of a version a generator fetches (the trainer's reply, checked by the
/// receiver before it allocates anything): the dtype's length, the version's size, and
/// the kind (a base fingerprint only on an adapter version). The receiver's assembler
/// checks the rest (order, offsets, checksums, the model's size and kind).
impl Check for WeightBucket {
    fn check(&self) -> Result<(), LimitError> {
        check_text(
            "dtype",
            &self.dtype,
            DTYPE_BYTES,
            "DTYPE_BYTES",
            "send \"f32\", \"bf16\" or \"f16\"",
        )?;
        check_bytes("total_bytes", self.total_bytes)?;
        if !self.adapter && self.base_fingerprint != 0 {
            return Err(LimitError::OutOfRange {
                field: "base_fingerprint".into(),
                value: format!("{:#018x}", self.base_fingerprint),
                bound: "0 when adapter is false (only an adapter version names a base)".into(),
            });
        }
        Ok(())
    }
}

/// A lease as a generator receives it: its info (the coordinator's dataset refuses a
/// larger one when it is loaded; a generator checks before it hands it on).
impl Check for PromptLease {
    fn check(&self) -> Result<(), LimitError> {
        check_info(
            "info_json",
            &self.info_json,
            "the dataset record's info must be one JSON object of at most INFO_BYTES as JSON: drop large fields from the file ([data] columns, docs/config.md)",
        )
    }
}

/// The group's text fields; the trainer's ingest checks the rest (token ids, logprobs,
/// versions, rewards against `[reward] bound`).
impl Check for RolloutGroup {
    fn check(&self) -> Result<(), LimitError> {
        check_len(
            "session_token",
            &self.session_token,
            SESSION_TOKEN_BYTES,
            "SESSION_TOKEN_BYTES",
            "send the `session_token` Register returned",
        )?;
        check_info(
            "info_json",
            &self.info_json,
            "send the lease's info_json as it came, or nothing",
        )?;
        if self.retries > GROUP_RETRIES {
            return Err(LimitError::OutOfRange {
                field: "retries".into(),
                value: self.retries.to_string(),
                bound: format!("at most {GROUP_RETRIES} (tandem_proto::limits::GROUP_RETRIES)"),
            });
        }
        if self.retries == 0 && self.episodes_failed > 0 {
            return Err(LimitError::OutOfRange {
                field: "episodes_failed".into(),
                value: self.episodes_failed.to_string(),
                bound: "0 when retries is 0 (only a failed run has failed episodes)".into(),
            });
        }
        for (i, c) in self.completions.iter().enumerate() {
            check_len(
                &format!("completions[{i}].finish_reason"),
                &c.finish_reason,
                FINISH_REASON_BYTES,
                "FINISH_REASON_BYTES",
                "send \"stop\", \"length\" or nothing",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::Completion;

    #[test]
    fn printable_escapes_and_cuts() {
        assert_eq!(printable("gen-0").to_string(), "gen-0");
        assert_eq!(
            printable("a\nINFO forged\x1b[0m").to_string(),
            "a\\nINFO forged\\u{1b}[0m"
        );
        let long = "é".repeat(2000);
        let shown = printable(&long).to_string();
        assert!(shown.len() <= LOG_BYTES + 40, "{}", shown.len());
        assert!(
            shown.ends_with(&format!("…[{} more bytes]", 4000 - LOG_BYTES)),
            "{shown}"
        );
        assert!(!shown.contains('\n'));
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(format!("{:?}", printable("x\"y")), "\"x\"y\"");
    }

    #[test]
    fn each_limit_names_its_field() {
        let e = RegisterRequest {
            role: 1,
            name: "gen-0".into(),
            address: "x".repeat(ADDRESS_BYTES + 1),
        }
        .check()
        .unwrap_err();
        assert!(
            e.to_string().starts_with("address: 261 bytes")
                && e.to_string().contains("ADDRESS_BYTES"),
            "{e}"
        );
        let e = RegisterRequest {
            role: 1,
            name: "gen\n0".into(),
            address: String::new(),
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("name: contains a control"), "{e}");
        let e = HeartbeatRequest {
            weight_sync_seconds: vec![1.0, f64::MAX],
            ..Default::default()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().starts_with("weight_sync_seconds[1]"), "{e}");
        let g = RolloutGroup {
            completions: vec![
                Completion::default(),
                Completion {
                    finish_reason: "x".repeat(100),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let e = g.check().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("completions[1].finish_reason: 100 bytes"),
            "{e}"
        );
        let s: tonic::Status = e.into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        for (g, field) in [
            (
                RolloutGroup {
                    retries: GROUP_RETRIES + 1,
                    ..Default::default()
                },
                "retries:",
            ),
            (
                RolloutGroup {
                    episodes_failed: 1,
                    ..Default::default()
                },
                "episodes_failed:",
            ),
        ] {
            let e = g.check().unwrap_err().to_string();
            assert!(e.starts_with(field), "{e}");
        }
        let e = ReleaseRequest {
            failure: 99,
            ..Default::default()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().starts_with("failure: 99"), "{e}");
        assert!(ReleaseRequest {
            reason: "x".repeat(REASON_BYTES),
            ..Default::default()
        }
        .check()
        .is_ok());
        assert!(LeaseRequest {
            max_groups: LEASE_GROUPS + 1,
            ..Default::default()
        }
        .check()
        .is_err());
        let e = PublishVersionRequest {
            version_bytes: WEIGHT_VERSION_BYTES + 1,
            ..Default::default()
        }
        .check()
        .unwrap_err();
        assert!(
            e.to_string().starts_with("version_bytes:")
                && e.to_string().contains("WEIGHT_VERSION_BYTES"),
            "{e}"
        );
    }

    /// A record's info on the wire: empty or one JSON object, at most INFO_BYTES; a
    /// refusal names the field and the fix.
    #[test]
    fn info_is_one_bounded_json_object() {
        let lease = |info: &str| PromptLease {
            info_json: info.into(),
            ..Default::default()
        };
        assert!(lease("").check().is_ok());
        assert!(lease(r#"{"level": 3, "tests": [1, 2]}"#).check().is_ok());
        let pad = "x".repeat(INFO_BYTES - 11);
        assert!(lease(&format!(r#"{{"pad": "{pad}"}}"#)).check().is_ok());
        let e = lease(&format!(r#"{{"pad": "{pad}x"}}"#))
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("info_json: {} bytes", INFO_BYTES + 1))
                && e.contains("INFO_BYTES")
                && e.contains("drop large fields"),
            "{e}"
        );
        for (bad, why) in [
            ("[1, 2]", "not a JSON object"),
            ("{oops", "not JSON"),
            ("\"s\"", "not a JSON object"),
        ] {
            let e = lease(bad).check().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("info_json: {why}")) && e.contains("[data] columns"),
                "{e}"
            );
        }
        let e = RolloutGroup {
            info_json: "[]".into(),
            ..Default::default()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("info_json: not a JSON object") && e.contains("as it came"),
            "{e}"
        );
        let s: tonic::Status = lease("7").check().unwrap_err().into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
    }

    /// A bucket names a base only as an adapter's, within the dtype's and the version's
    /// limits.
    #[test]
    fn a_weight_bucket_names_a_base_only_as_an_adapter() {
        let ok = WeightBucket {
            dtype: "bf16".into(),
            total_bytes: 1 << 20,
            ..Default::default()
        };
        assert!(ok.check().is_ok());
        let adapter = WeightBucket {
            adapter: true,
            base_fingerprint: 0xabcd,
            ..ok.clone()
        };
        assert!(adapter.check().is_ok());
        let e = WeightBucket {
            adapter: false,
            ..adapter.clone()
        }
        .check()
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("base_fingerprint: 0x000000000000abcd"),
            "{e}"
        );
        let e = WeightBucket {
            total_bytes: WEIGHT_VERSION_BYTES + 1,
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().starts_with("total_bytes:"), "{e}");
        let e = WeightBucket {
            dtype: "float32-but-long".into(),
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().starts_with("dtype:"), "{e}");
    }
}
