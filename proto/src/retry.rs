//! Calls that outlive a peer's restart. A call that failed for a transient reason (the
//! peer unreachable, restarting, or late) is made again after an exponential backoff
//! with jitter, until the peer has been away for the process's patience
//! (`[coordinator] reconnect_timeout_s`); then the error says what it waited for.
//! Only calls that are safe to repeat go through here: reads, and writes that carry a
//! `request_id` or are idempotent by their nature.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::{Code, Status};

/// How long a peer may stay away, in milliseconds (120 s until the config is known).
static PATIENCE_MS: AtomicU64 = AtomicU64::new(120_000);

/// Sets how long every later [`retry`] of this process waits for a peer that is away.
pub fn set_patience(d: Duration) {
    PATIENCE_MS.store(
        d.as_millis().clamp(1, u64::MAX as u128) as u64,
        Ordering::Relaxed,
    );
}

/// How long a peer may stay away before a [`retry`] gives up.
pub fn patience() -> Duration {
    Duration::from_millis(PATIENCE_MS.load(Ordering::Relaxed))
}

/// Whether a call that failed this way may succeed if made again: the peer could not be
/// reached or went away mid-call (`UNAVAILABLE`, and `UNKNOWN` for a connection reset
/// under a call), or the call ran out of time (`DEADLINE_EXCEEDED`, or `CANCELLED` for
/// the client's own deadline).
pub fn is_transient(e: &Status) -> bool {
    matches!(
        e.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// The pause before attempt `n + 1` (n ≥ 0):
///
///   pause = min(0.1 s · 2ⁿ, 5 s) · (0.75 + 0.5·u),  u uniform in [0, 1)
///
/// so many workers that lost one peer do not all return at the same instant.
pub fn backoff(n: u32) -> Duration {
    let base = (0.1 * 2f64.powi(n.min(16) as i32)).min(5.0);
    Duration::from_secs_f64(base * (0.75 + 0.5 * unit_noise()))
}

/// Makes `call` until it succeeds, fails for a reason that is not transient, or the
/// peer has been away for [`patience`] since the first failure; `what` names the call
/// in the log and in the final error ("leasing prompts from the coordinator").
pub async fn retry<T, F, Fut>(what: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut first_failure: Option<Instant> = None;
    let mut n = 0u32;
    loop {
        match call().await {
            Ok(t) => {
                if let Some(t0) = first_failure {
                    tracing::info!(
                        "{what}: back after {:.1} s and {n} retries",
                        t0.elapsed().as_secs_f64()
                    );
                }
                return Ok(t);
            }
            Err(e) if !is_transient(&e) => return Err(e),
            Err(e) => {
                let t0 = *first_failure.get_or_insert_with(Instant::now);
                let waited = t0.elapsed();
                if waited >= patience() {
                    return Err(Status::new(
                        e.code(),
                        format!(
                            "{what}: the peer stayed away for {:.0} s (reconnect_timeout_s), last error: {}",
                            waited.as_secs_f64(),
                            crate::client::describe(&e)
                        ),
                    ));
                }
                if n == 0 || n.is_multiple_of(10) {
                    tracing::warn!(
                        "{what}: {} (retrying for up to {:.0} s)",
                        crate::client::describe(&e),
                        patience().as_secs_f64()
                    );
                }
                let pause = backoff(n).min(patience().saturating_sub(waited));
                tokio::time::sleep(pause.max(Duration::from_millis(1))).await;
                n += 1;
            }
        }
    }
}

/// A number in [0, 1) that differs between calls and processes (backoff jitter).
pub fn unit_noise() -> f64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut z = u64::from(nanos)
        ^ u64::from(std::process::id()).rotate_left(32)
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A fresh id for a request that may be retried (`request_id` fields): never 0.
pub fn request_id() -> u64 {
    (((unit_noise() * 2f64.powi(53)) as u64) << 11) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        for n in 0..30 {
            let b = backoff(n).as_secs_f64();
            let base = (0.1 * 2f64.powi(n.min(16) as i32)).min(5.0);
            assert!(b >= 0.75 * base && b < 1.25 * base, "{n}: {b}");
        }
        assert!(request_id() != 0 && request_id() != request_id());
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_others_are_not() {
        let mut calls = 0;
        let r: Result<u32, Status> = retry("test", || {
            calls += 1;
            let c = calls;
            async move {
                if c < 3 {
                    Err(Status::unavailable("down"))
                } else {
                    Ok(c)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        let mut calls = 0;
        let r: Result<u32, Status> = retry("test", || {
            calls += 1;
            async { Err(Status::permission_denied("no")) }
        })
        .await;
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(calls, 1);
        set_patience(Duration::from_millis(300));
        let t0 = Instant::now();
        let e = retry("leasing", || async {
            Err::<(), _>(Status::unavailable("down"))
        })
        .await
        .unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert!(e.message().contains("leasing") && e.message().contains("stayed away"));
    }
}
