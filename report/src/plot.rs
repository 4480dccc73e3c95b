//! The plots of a report: which a run gets ([`plots`]: reward, staleness, throughput,
//! the loss and each KL on a panel of its own; turns and tool calls for a multi-turn
//! run; the held-out curve when it was evaluated) and each drawn as an SVG line chart
//! over steps: both axes labelled with their units, integer step ticks, each series
//! faint as logged with its exponential moving average ([`ema`], α = [`EMA_ALPHA`])
//! bold over it, and the legend in a strip right of the data area.

use std::path::Path;

use plotters::prelude::*;

use crate::log::{Points, RunLog};
use crate::{Error, Result};

/// The weight of the newest value in the smoothed line: `s₀ = x₀`,
/// `sᵢ = α·xᵢ + (1 − α)·sᵢ₋₁`.
pub const EMA_ALPHA: f64 = 0.2;

/// The SVG's size in pixels, and the width of the legend strip at its right.
pub const SIZE: (u32, u32) = (960, 450);
pub const LEGEND_WIDTH: u32 = 230;

/// One chart: its file name, its title, its y axis's label (with the unit), whether
/// its series get a smoothed line, and its named series.
#[derive(Clone, Debug, PartialEq)]
pub struct Plot {
    pub file: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    /// Draw each series' EMA bold over its faint raw values (false for the few
    /// held-out evaluations, drawn as points joined by a line).
    pub smooth: bool,
    pub series: Vec<(String, Points)>,
}

/// The x axis's label.
pub const X_LABEL: &str = "step (optimizer steps)";

/// The exponential moving average of `points` with weight `alpha` on the newest value
/// (`s₀ = x₀`, `sᵢ = α·xᵢ + (1 − α)·sᵢ₋₁`); a point that is not finite is left out and
/// does not move the average.
pub fn ema(points: &[(f64, f64)], alpha: f64) -> Points {
    let mut s: Option<f64> = None;
    points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| {
            let v = s.map_or(y, |prev| alpha * y + (1.0 - alpha) * prev);
            s = Some(v);
            (x, v)
        })
        .collect()
}

/// A step tick's label: the integer, or nothing for a tick between two steps.
pub fn step_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

/// A y tick's label with the decimals that ticks a fifth of `span` apart need (no
/// trailing zeros; scientific for tiny spans).
pub fn value_label(y: f64, span: f64) -> String {
    if y == 0.0 {
        return "0".into();
    }
    let step = (span / 5.0).abs().max(f64::MIN_POSITIVE);
    let decimals = (1.0 - step.log10().floor()).max(0.0) as usize;
    if decimals > 5 {
        return format!("{y:.1e}");
    }
    let s = format!("{y:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The plots `run` gets, in the report's order.
pub fn plots(run: &RunLog) -> Vec<Plot> {
    let named = |pairs: &[(&str, &str)]| -> Vec<(String, Points)> {
        pairs
            .iter()
            .map(|(name, key)| (name.to_string(), run.series(key)))
            .collect()
    };
    let panel = |file, title, y_label, series| Plot {
        file,
        title,
        y_label,
        smooth: true,
        series,
    };
    let mut out = vec![
        panel(
            "reward.svg",
            "reward (mean over the step's samples)",
            "reward (per sample)",
            named(&[("reward_mean", "reward_mean")]),
        ),
        panel(
            "staleness.svg",
            "staleness of the step's samples",
            "staleness (policy versions)",
            named(&[("mean", "staleness_mean"), ("max", "staleness_max")]),
        ),
        panel(
            "throughput.svg",
            "trained completion tokens per wall second",
            "throughput (tokens / s)",
            vec![("tokens/s".into(), run.throughput())],
        ),
        panel(
            "loss.svg",
            "training loss",
            "loss (per token)",
            named(&[("loss", "loss")]),
        ),
        panel(
            "kl.svg",
            "KL of the policy to the reference model",
            "KL (nats / token)",
            named(&[("kl", "kl")]),
        ),
        panel(
            "mismatch_kl.svg",
            "mismatch KL: trainer vs generator logprobs",
            "KL (nats / token)",
            named(&[("mismatch_kl", "mismatch_kl")]),
        ),
    ];
    if run.multi_turn() {
        out.push(panel(
            "episodes.svg",
            "turns and tool calls per episode",
            "count (per episode)",
            named(&[
                ("turns", "turns_per_episode"),
                ("tool calls", "tool_calls_per_episode"),
            ]),
        ));
        out.push(panel(
            "tool_errors.svg",
            "failed tool calls per step",
            "failed calls (per step)",
            named(&[("tool errors", "tool_errors")]),
        ));
    }
    if !run.evals.is_empty() {
        let mut series = vec![("accuracy".to_string(), run.eval_series("eval_accuracy"))];
        if let Some(k) = run.pass_at_k_key() {
            series.push((k["eval_".len()..].to_string(), run.eval_series(k)));
        }
        out.push(Plot {
            file: "eval.svg",
            title: "held-out evaluation",
            y_label: "accuracy (fraction of problems)",
            smooth: false,
            series,
        });
    }
    out
}

/// The axes' ranges: x over the points' steps, widened to whole steps (at least 1
/// wide), y over their values padded by 5 % (at least 1e-6); (0, 1) for an axis
/// without a finite point.
pub fn ranges(series: &[(String, Points)]) -> ((f64, f64), (f64, f64)) {
    let all = || series.iter().flat_map(|s| s.1.iter());
    let span = |v: &mut dyn Iterator<Item = f64>| {
        v.filter(|x| x.is_finite())
            .fold(None, |acc: Option<(f64, f64)>, x| {
                Some(acc.map_or((x, x), |(a, b)| (a.min(x), b.max(x))))
            })
    };
    let x = span(&mut all().map(|p| p.0)).map_or((0.0, 1.0), |(a, b)| {
        let (a, b) = (a.floor(), b.ceil());
        (a, b.max(a + 1.0))
    });
    let y = span(&mut all().map(|p| p.1)).map_or((0.0, 1.0), |(a, b)| {
        let pad = ((b - a) * 0.05).max(1e-6);
        (a - pad, b + pad)
    });
    (x, y)
}

/// Where a drawn chart's parts landed, in SVG pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    /// The data area: x from `.0.0` to `.0.1`, y from `.1.0` to `.1.1`.
    pub data: ((i32, i32), (i32, i32)),
    /// The left edge of the legend strip.
    pub legend_left: i32,
}

/// The colours of the series, in order.
const COLOURS: [RGBColor; 4] = [BLUE, RED, RGBColor(0, 140, 0), MAGENTA];

impl Plot {
    /// Draws the chart into `path` as an SVG of [`SIZE`]: one colour per series (faint
    /// raw values, the bold EMA over them), the legend in a strip at the right.
    pub fn write_svg(&self, path: &Path) -> Result<Layout> {
        self.draw(path).map_err(|msg| Error::Plot {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// The legend's entries: (label, colour, bold) per line drawn.
    pub fn legend(&self) -> Vec<(String, RGBColor, bool)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.series.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            if self.smooth {
                out.push((format!("{name} (EMA, α = {EMA_ALPHA})"), c, true));
                out.push((format!("{name} (raw, each step)"), c, false));
            } else {
                out.push((name.clone(), c, true));
            }
        }
        out
    }

    fn draw(&self, path: &Path) -> std::result::Result<Layout, String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let ((x0, x1), (y0, y1)) = ranges(&self.series);
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (left, strip) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&left)
            .caption(self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        let ticks = ((x1 - x0) as usize + 1).min(11);
        let y_fmt = |y: &f64| value_label(*y, y1 - y0);
        chart
            .configure_mesh()
            .x_desc(X_LABEL)
            .y_desc(self.y_label)
            .x_labels(ticks)
            .x_label_formatter(&step_label)
            .y_label_formatter(&y_fmt)
            .axis_desc_style(("sans-serif", 15))
            .max_light_lines(1)
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (_, pts)) in self.series.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let finite = || pts.iter().copied().filter(|p| p.1.is_finite());
            if self.smooth {
                chart
                    .draw_series(LineSeries::new(finite(), c.mix(0.3).stroke_width(1)))
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series(LineSeries::new(ema(pts, EMA_ALPHA), c.stroke_width(2)))
                    .map_err(|e| err(&e))?;
            } else {
                chart
                    .draw_series(LineSeries::new(finite(), c.stroke_width(2)))
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series(finite().map(|p| Circle::new(p, 4, c.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let legend_left = strip.get_pixel_range().0.start;
        self.draw_legend(&strip, ys.start).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(Layout {
            data: ((xs.start, xs.end), (ys.start, ys.end)),
            legend_left,
        })
    }

    /// The legend, top-aligned with the data area, in the strip right of the chart.
    fn draw_legend(
        &self,
        strip: &DrawingArea<SVGBackend, plotters::coord::Shift>,
        top: i32,
    ) -> std::result::Result<(), DrawingAreaErrorKind<std::io::Error>> {
        let font = ("sans-serif", 13).into_font().color(&BLACK);
        for (i, (label, c, bold)) in self.legend().into_iter().enumerate() {
            let y = top + 8 + 20 * i as i32;
            let style = if bold {
                c.stroke_width(2)
            } else {
                c.mix(0.3).stroke_width(1)
            };
            strip.draw(&PathElement::new(vec![(4, y), (26, y)], style))?;
            strip.draw(&Text::new(label, (32, y - 7), font.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The `<text>` elements of an SVG: (x, y, content).
    fn texts(svg: &str) -> Vec<(f64, f64, String)> {
        let attr = |tag: &str, name: &str| -> f64 {
            let key = format!(" {name}=\"");
            let at = tag.find(&key).unwrap() + key.len();
            tag[at..].split('"').next().unwrap().parse().unwrap()
        };
        svg.split("<text")
            .skip(1)
            .map(|t| {
                let (tag, rest) = t.split_once('>').unwrap();
                let content = rest.split("</text>").next().unwrap();
                let content = content.trim().replace("&apos;", "'");
                (attr(tag, "x"), attr(tag, "y"), content)
            })
            .collect()
    }

    fn run_of(steps: u32) -> RunLog {
        RunLog {
            rows: (1..=steps)
                .map(|s| {
                    json!({"step": s, "unix_time": 10.0 * s as f64, "tokens": 100.0 + s as f64,
                    "reward_mean": (s % 3) as f64 / 2.0, "loss": 0.5, "kl": 0.01 * s as f64,
                    "mismatch_kl": 1e-4, "staleness_mean": 0.5, "staleness_max": 1.0,
                    "turns_per_episode": 2.0, "tool_calls_per_episode": 1.0, "tool_errors": 0.0})
                })
                .collect(),
            evals: vec![json!({"step": 0, "eval_accuracy": 0.5})],
        }
    }

    #[test]
    fn a_single_turn_run_without_evaluations_gets_a_panel_per_quantity() {
        let run = RunLog {
            rows: vec![json!({"step": 1, "reward_mean": 0.5, "turns_per_episode": 1.0})],
            evals: vec![],
        };
        let files: Vec<&str> = plots(&run).iter().map(|p| p.file).collect();
        assert_eq!(
            files,
            [
                "reward.svg",
                "staleness.svg",
                "throughput.svg",
                "loss.svg",
                "kl.svg",
                "mismatch_kl.svg"
            ]
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
    fn each_kl_has_a_panel_of_its_own_and_every_panel_a_unit() {
        let all = plots(&run_of(4));
        let series_of = |file: &str| -> Vec<String> {
            let p = all.iter().find(|p| p.file == file).unwrap();
            p.series.iter().map(|s| s.0.clone()).collect()
        };
        assert_eq!(series_of("loss.svg"), ["loss"]);
        assert_eq!(series_of("kl.svg"), ["kl"]);
        assert_eq!(series_of("mismatch_kl.svg"), ["mismatch_kl"]);
        assert_eq!(series_of("episodes.svg"), ["turns", "tool calls"]);
        for p in &all {
            assert!(
                p.y_label.contains('(') && p.y_label.ends_with(')'),
                "{}: {}",
                p.file,
                p.y_label
            );
        }
    }

    #[test]
    fn the_ema_follows_its_formula_and_skips_what_is_not_finite() {
        let pts = [(1.0, 1.0), (2.0, 0.0), (3.0, f64::NAN), (4.0, 1.0)];
        let s = ema(&pts, 0.25);
        // s1 = 1; s2 = 0.25·0 + 0.75·1 = 0.75; step 3 is left out;
        // s4 = 0.25·1 + 0.75·0.75 = 0.8125.
        assert_eq!(s, vec![(1.0, 1.0), (2.0, 0.75), (4.0, 0.8125)]);
        assert_eq!(
            ema(&[(1.0, 3.0), (2.0, 5.0)], 1.0),
            vec![(1.0, 3.0), (2.0, 5.0)]
        );
        assert!(ema(&[], 0.5).is_empty());
    }

    #[test]
    fn tick_labels_are_whole_steps_and_readable_values() {
        assert_eq!(step_label(&10.0), "10");
        assert_eq!(step_label(&2.5), "");
        assert_eq!(value_label(0.25, 1.0), "0.25");
        assert_eq!(value_label(120.0, 500.0), "120");
        assert_eq!(value_label(0.5, 1.0), "0.5");
        assert_eq!(value_label(2e-5, 1e-5), "2.0e-5");
    }

    #[test]
    fn a_drawn_panel_has_labelled_axes_integer_steps_and_the_legend_outside() {
        let dir = tempfile::tempdir().unwrap();
        for steps in [3, 10, 37] {
            for p in plots(&run_of(steps)) {
                let path = dir.path().join(p.file);
                let layout = p.write_svg(&path).unwrap();
                let svg = std::fs::read_to_string(&path).unwrap();
                let texts = texts(&svg);
                let has = |s: &str| texts.iter().any(|t| t.2 == s);
                assert!(has(X_LABEL) && has(p.y_label), "{}: {texts:?}", p.file);
                let ((left, right), (_, bottom)) = layout.data;
                assert!(layout.legend_left >= right, "{layout:?}");
                // The step ticks: the labels below the data area, within its width.
                let ticks: Vec<&str> = texts
                    .iter()
                    .filter(|t| t.1 > bottom as f64 && t.2 != X_LABEL)
                    .filter(|t| t.0 >= left as f64 - 20.0 && t.0 <= right as f64 + 20.0)
                    .map(|t| t.2.as_str())
                    .collect();
                assert!(!ticks.is_empty(), "{}: {texts:?}", p.file);
                for t in &ticks {
                    assert!(t.parse::<u64>().is_ok(), "{}: tick {t:?}", p.file);
                }
                // Every legend entry is right of the data area.
                for (label, _, _) in p.legend() {
                    let t = texts.iter().find(|t| t.2 == label);
                    let t = t.unwrap_or_else(|| panic!("{}: no legend {label:?}", p.file));
                    assert!(t.0 >= right as f64, "{}: {label} at {}", p.file, t.0);
                }
                // The raw values faint, their EMA bold.
                if p.smooth {
                    assert!(svg.contains("opacity=\"0.3\""), "{}", p.file);
                    assert!(p.legend()[0].0.contains("EMA, α = 0.2"));
                }
            }
        }
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
