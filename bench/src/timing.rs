//! Measuring: the median of timed repetitions after a warm-up, the process's peak
//! resident memory (Linux), and a measurement run in a child process.

use std::time::Instant;

use crate::error::{Context, Result};

/// The machine a figure was measured on, as every bench JSON records it (`cpu`): the
/// CPU's model name, its vector features and the kernel build in use
/// (`TANDEM_CPU_KERNELS` picks a lower one).
pub fn cpu() -> serde_json::Value {
    use tandem_model::simd;
    serde_json::json!({
        "model": simd::cpu_model(),
        "features": simd::cpu_features(),
        "kernels": simd::isa().name(),
    })
}

/// The median (upper middle for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs `f` once untimed, then `reps` times; the median seconds.
pub fn timed(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Peak resident set size so far (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Resets the peak-RSS watermark (Linux): later peaks exclude the load transient.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs a measurement in its own process (so that its peak RSS is its own) and parses
/// the JSON object its standard output ends with: the last non-empty line, one JSON
/// object on one line (a phase of this binary, or a reference script through
/// tools/bench_protocol.py; pretty-printed JSON is refused). A failure carries its
/// stderr.
pub fn run_child(mut cmd: std::process::Command, what: &str) -> Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        crate::error::bail!(
            "{what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let value: serde_json::Value = serde_json::from_str(last.trim()).with_context(|| {
        format!(
            "{what}: the last line of its output is not one JSON object on one line (the \
             format tools/bench_protocol.py writes): {text}"
        )
    })?;
    if !value.is_object() {
        crate::error::bail!("{what}: its last line is JSON but not an object: {last}");
    }
    Ok(value)
}
