//! The plots of a report: which a run gets ([`plots`]: reward, staleness, throughput,
//! losses; turns and tool calls for a multi-turn run; the held-out curve when it was
//! evaluated) and each drawn as an SVG line chart over steps.

use std::path::Path;

use plotters::prelude::*;

use crate::log::{Points, RunLog};
use crate::{Error, Result};

/// One chart: its file name, its title and its named series.
#[derive(Clone, Debug, PartialEq)]
pub struct Plot {
    pub file: &'static str,
    pub title: &'static str,
    pub series: Vec<(String, Points)>,
}

/// The plots `run` gets, in the report's order.
pub fn plots(run: &RunLog) -> Vec<Plot> {
    let named = |pairs: &[(&str, &str)]| -> Vec<(String, Points)> {
        pairs
            .iter()
            .map(|(name, key)| (name.to_string(), run.series(key)))
            .collect()
    };
    let mut out = vec![
        Plot {
            file: "reward.svg",
            title: "reward (mean over the step's samples)",
            series: named(&[("reward_mean", "reward_mean")]),
        },
        Plot {
            file: "staleness.svg",
            title: "staleness (versions behind the policy)",
            series: named(&[("mean", "staleness_mean"), ("max", "staleness_max")]),
        },
        Plot {
            file: "throughput.svg",
            title: "trained completion tokens / s",
            series: vec![("tokens/s".into(), run.throughput())],
        },
        Plot {
            file: "loss.svg",
            title: "loss, KL to the reference, mismatch KL",
            series: named(&[
                ("loss", "loss"),
                ("kl", "kl"),
                ("mismatch_kl", "mismatch_kl"),
            ]),
        },
    ];
    if run.multi_turn() {
        out.push(Plot {
            file: "episodes.svg",
            title: "turns and tool calls per episode, failed calls per step",
            series: named(&[
                ("turns", "turns_per_episode"),
                ("tool calls", "tool_calls_per_episode"),
                ("tool errors", "tool_errors"),
            ]),
        });
    }
    if !run.evals.is_empty() {
        let mut series = vec![("accuracy".to_string(), run.eval_series("eval_accuracy"))];
        if let Some(k) = run.pass_at_k_key() {
            series.push((k["eval_".len()..].to_string(), run.eval_series(k)));
        }
        out.push(Plot {
            file: "eval.svg",
            title: "held-out evaluation",
            series,
        });
    }
    out
}

/// The axes' ranges: x over the points' steps (at least 1 wide), y over their values
/// padded by 5 % (at least 1e-6); (0, 1) for an axis without a finite point.
pub fn ranges(series: &[(String, Points)]) -> ((f64, f64), (f64, f64)) {
    let all = || series.iter().flat_map(|s| s.1.iter());
    let span = |v: &mut dyn Iterator<Item = f64>| {
        v.filter(|x| x.is_finite())
            .fold(None, |acc: Option<(f64, f64)>, x| {
                Some(acc.map_or((x, x), |(a, b)| (a.min(x), b.max(x))))
            })
    };
    let x = span(&mut all().map(|p| p.0)).map_or((0.0, 1.0), |(a, b)| (a, b.max(a + 1.0)));
    let y = span(&mut all().map(|p| p.1)).map_or((0.0, 1.0), |(a, b)| {
        let pad = ((b - a) * 0.05).max(1e-6);
        (a - pad, b + pad)
    });
    (x, y)
}

impl Plot {
    /// Draws the chart into `path` as an 800 × 450 SVG, one coloured line per series
    /// with a legend.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        self.draw(path).map_err(|msg| Error::Plot {
            path: path.to_path_buf(),
            msg,
        })
    }

    fn draw(&self, path: &Path) -> std::result::Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let ((x0, x1), (y0, y1)) = ranges(&self.series);
        let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, ("sans-serif", 20))
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
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let c = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_single_turn_run_without_evaluations_gets_the_four_plots() {
        let run = RunLog {
            rows: vec![json!({"step": 1, "reward_mean": 0.5, "turns_per_episode": 1.0})],
            evals: vec![],
        };
        let files: Vec<&str> = plots(&run).iter().map(|p| p.file).collect();
        assert_eq!(
            files,
            ["reward.svg", "staleness.svg", "throughput.svg", "loss.svg"]
        );
        let run = RunLog {
            evals: vec![json!({"step": 0, "eval_accuracy": 0.5, "eval_pass_at_4": 0.7})],
            ..run
        };
        let eval = plots(&run).pop().unwrap();
        assert_eq!(eval.file, "eval.svg");
        let names: Vec<&str> = eval.series.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, ["accuracy", "pass_at_4"]);
    }

    #[test]
    fn ranges_cover_the_points_and_survive_none() {
        let s = |pts: Points| vec![("a".to_string(), pts)];
        assert_eq!(ranges(&s(vec![])), ((0.0, 1.0), (0.0, 1.0)));
        let ((x0, x1), (y0, y1)) = ranges(&s(vec![(2.0, 1.0), (4.0, 3.0), (3.0, f64::NAN)]));
        assert_eq!((x0, x1), (2.0, 4.0));
        assert!(
            (y0 - 0.9).abs() < 1e-12 && (y1 - 3.1).abs() < 1e-12,
            "{y0} {y1}"
        );
        // One point: a step wide, the value padded.
        let ((x0, x1), (y0, y1)) = ranges(&s(vec![(5.0, 2.0)]));
        assert_eq!((x0, x1), (5.0, 6.0));
        assert!(y0 < 2.0 && y1 > 2.0);
    }

    #[test]
    fn an_unwritable_plot_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/reward.svg");
        let run = RunLog {
            rows: vec![json!({"step": 1, "reward_mean": 0.5})],
            evals: vec![],
        };
        let e = plots(&run)[0].write_svg(&path).unwrap_err().to_string();
        assert!(
            e.contains("plotting") && e.contains("missing/reward.svg"),
            "{e}"
        );
    }
}
