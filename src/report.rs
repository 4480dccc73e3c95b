//! `tandem report RUN_DIR`: plots of a run (reward, staleness, throughput over steps)
//! as SVG, and a summary, from `RUN_DIR/metrics.jsonl`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Args)]
pub struct ReportArgs {
    /// The run's folder (holds metrics.jsonl).
    run_dir: PathBuf,
    /// Where the plots and summary go (default: RUN_DIR/report).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The summary's `time_to_target`: when the mean reward of 5 consecutive steps
    /// first reaches this value.
    #[arg(long, default_value_t = 0.9)]
    reward_target: f64,
}

/// One plotted series: name and (step, value) points.
type Series = (String, Vec<(f64, f64)>);

pub fn run(a: ReportArgs) -> Result<()> {
    let path = a.run_dir.join("metrics.jsonl");
    // A torn last line (a crash mid-write) is skipped.
    let rows = tandem_model::durable::read_jsonl(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    if rows.is_empty() {
        bail!("{}: no steps yet", path.display());
    }
    let out = a.out.unwrap_or_else(|| a.run_dir.join("report"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let get = |r: &Value, k: &str| r[k].as_f64();
    let series = |k: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((get(r, "step")?, get(r, k)?)))
            .collect()
    };
    // Throughput: completion tokens trained per wall second between consecutive steps.
    let mut throughput = Vec::new();
    for w in rows.windows(2) {
        if let (Some(s), Some(t0), Some(t1), Some(n)) = (
            get(&w[1], "step"),
            get(&w[0], "unix_time"),
            get(&w[1], "unix_time"),
            get(&w[1], "tokens"),
        ) {
            if t1 > t0 {
                throughput.push((s, n / (t1 - t0)));
            }
        }
    }
    // The held-out evaluations (`eval.jsonl`, step 0 included), when the run had them.
    let evals: Vec<Value> =
        tandem_model::durable::read_jsonl(&a.run_dir.join("eval.jsonl")).unwrap_or_default();
    let eval_series = |k: &str| -> Vec<(f64, f64)> {
        evals
            .iter()
            .filter_map(|r| Some((get(r, "step")?, get(r, k)?)))
            .collect()
    };
    let mut plots: Vec<(&str, &str, Vec<Series>)> = vec![
        (
            "reward.svg",
            "reward (mean over the step's samples)",
            vec![("reward_mean".into(), series("reward_mean"))],
        ),
        (
            "staleness.svg",
            "staleness (versions behind the policy)",
            vec![
                ("mean".into(), series("staleness_mean")),
                ("max".into(), series("staleness_max")),
            ],
        ),
        (
            "throughput.svg",
            "trained completion tokens / s",
            vec![("tokens/s".into(), throughput.clone())],
        ),
        (
            "loss.svg",
            "loss, KL to the reference, mismatch KL",
            vec![
                ("loss".into(), series("loss")),
                ("kl".into(), series("kl")),
                ("mismatch_kl".into(), series("mismatch_kl")),
            ],
        ),
    ];
    // Multi-turn runs: turns and tool calls per episode.
    if rows
        .iter()
        .any(|r| get(r, "turns_per_episode").is_some_and(|t| t > 1.0))
    {
        plots.push((
            "episodes.svg",
            "turns and tool calls per episode, failed calls per step",
            vec![
                ("turns".into(), series("turns_per_episode")),
                ("tool calls".into(), series("tool_calls_per_episode")),
                ("tool errors".into(), series("tool_errors")),
            ],
        ));
    }
    if !evals.is_empty() {
        let mut s: Vec<Series> = vec![("accuracy".into(), eval_series("eval_accuracy"))];
        if let Some(k) = evals[0].as_object().and_then(|o| {
            o.keys()
                .find(|k| k.starts_with("eval_pass_at_") && *k != "eval_pass_at_1")
        }) {
            s.push((k["eval_".len()..].into(), eval_series(k)));
        }
        plots.push(("eval.svg", "held-out evaluation", s));
    }
    for (file, title, s) in &plots {
        plot(&out.join(file), title, s)?;
    }
    let first = &rows[0];
    let last = &rows[rows.len() - 1];
    let mean_of = |k: &str, xs: &[Value]| {
        xs.iter().filter_map(|r| get(r, k)).sum::<f64>() / xs.len().max(1) as f64
    };
    let n = rows.len().min(5);
    let duration = get(last, "unix_time").unwrap_or(0.0) - get(first, "unix_time").unwrap_or(0.0)
        + get(first, "step_seconds").unwrap_or(0.0);
    let start = get(first, "unix_time").unwrap_or(0.0) - get(first, "step_seconds").unwrap_or(0.0);
    let target = time_to_target(&rows, a.reward_target, 5).map(|(step, t)| {
        serde_json::json!({"reward_target": a.reward_target, "window": 5, "step": step, "seconds": t - start})
    });
    let step_secs: Vec<f64> = rows.iter().filter_map(|r| get(r, "step_seconds")).collect();
    let per_completion: Vec<f64> = rows
        .iter()
        .filter_map(|r| Some(get(r, "step_seconds")? / get(r, "sequences")?.max(1.0)))
        .collect();
    let summary = serde_json::json!({
        "steps": get(last, "step"),
        "wall_seconds": duration,
        "median_step_seconds": median(step_secs),
        "median_step_seconds_per_completion": median(per_completion),
        "time_to_target": target,
        "reward_first_5": mean_of("reward_mean", &rows[..n]),
        "reward_last_5": mean_of("reward_mean", &rows[rows.len() - n..]),
        "staleness_max": rows.iter().filter_map(|r| get(r, "staleness_max")).fold(0.0, f64::max),
        "mismatch_kl_max": rows.iter().filter_map(|r| get(r, "mismatch_kl")).fold(0.0, f64::max),
        "tokens_per_second_mean": throughput.iter().map(|p| p.1).sum::<f64>() / throughput.len().max(1) as f64,
        "eval_accuracy_first": evals.first().and_then(|r| get(r, "eval_accuracy")),
        "eval_accuracy_last": evals.last().and_then(|r| get(r, "eval_accuracy")),
        "plots": plots.iter().map(|p| p.0).collect::<Vec<_>>(),
    });
    let sp = out.join("summary.json");
    std::fs::write(&sp, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", sp.display()))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("plots and summary in {}", out.display());
    Ok(())
}

/// The median of `xs` (None when empty).
fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

/// The first step (and its `unix_time`) at which the mean `reward_mean` of the last
/// `window` steps reaches `target`.
fn time_to_target(rows: &[Value], target: f64, window: usize) -> Option<(f64, f64)> {
    let rewards: Vec<f64> = rows
        .iter()
        .map(|r| r["reward_mean"].as_f64().unwrap_or(f64::NAN))
        .collect();
    (window..=rows.len()).find_map(|end| {
        let mean = rewards[end - window..end].iter().sum::<f64>() / window as f64;
        (mean >= target).then(|| {
            let r = &rows[end - 1];
            Some((r["step"].as_f64()?, r["unix_time"].as_f64()?))
        })?
    })
}

fn plot(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let all: Vec<&(f64, f64)> = series.iter().flat_map(|s| s.1.iter()).collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y0, y1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let (x0, x1) = if x0.is_finite() {
        (x0, x1.max(x0 + 1.0))
    } else {
        (0.0, 1.0)
    };
    let (y0, y1) = if y0.is_finite() {
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        (y0 - pad, y1 + pad)
    } else {
        (0.0, 1.0)
    };
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting {}: {e}", path.display());
    let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| err(&e))?;
    let colours = [BLUE, RED, GREEN, MAGENTA];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_target_is_the_first_full_window_at_the_target() {
        let rows: Vec<Value> = [0.2, 0.9, 1.0, 0.9, 0.8, 0.9, 1.0, 1.0]
            .iter()
            .enumerate()
            .map(|(i, r)| serde_json::json!({"step": i + 1, "unix_time": 100.0 + 10.0 * i as f64, "reward_mean": r}))
            .collect();
        // Windows of 3: means 0.7, 0.93 → steps 2..4 reach 0.9 first, at step 4.
        assert_eq!(time_to_target(&rows, 0.9, 3), Some((4.0, 130.0)));
        assert_eq!(time_to_target(&rows, 1.1, 3), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
