//! How `tandem run` shows a run's progress: on a terminal, a live line (step, reward,
//! staleness, tokens per second, version, generators); elsewhere (piped, logged, under
//! a batch system) one line every `[run] log_every` steps, so a log shows progress
//! without a line per poll. Restarts and the stop sequence are lines in both. A value
//! not known yet (the reward before the first step) shows as `–`, never `NaN`.

use std::io::Write;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::supervisor::Event;

/// What `tandem run` prints while it watches.
pub struct View {
    /// The live line (a terminal), or `None`: log lines.
    bar: Option<ProgressBar>,
    steps: u64,
    log_every: u64,
    /// The step of the last log line (0 before any).
    logged: u64,
    out: Box<dyn Write + Send>,
    t0: Instant,
}

impl View {
    /// A live line on a `terminal`, else log lines every `log_every` steps, to stderr.
    pub fn new(steps: u64, log_every: u64, terminal: bool) -> Self {
        let mut v = View::log_to(Box::new(std::io::stderr()), steps, log_every);
        if terminal {
            let bar = ProgressBar::new(steps);
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            v.bar = Some(bar);
        }
        v
    }

    /// Log lines every `log_every` steps (at least 1) to `out`.
    pub fn log_to(out: Box<dyn Write + Send>, steps: u64, log_every: u64) -> Self {
        View {
            bar: None,
            steps,
            log_every: log_every.max(1),
            logged: 0,
            out,
            t0: Instant::now(),
        }
    }

    /// Shows `event`: the live line moves, or a log line is written when the step
    /// crossed a multiple of `log_every` since the last line, and for the run's last
    /// step; restarts and stops are lines of their own.
    pub fn show(&mut self, event: Event<'_>) {
        match event {
            Event::Progress(p) => {
                if let Some(bar) = &self.bar {
                    bar.set_position(p.step);
                    bar.set_message(p.message());
                    return;
                }
                let crossed = p.step / self.log_every > self.logged / self.log_every;
                if crossed || (p.finished && p.step > self.logged) {
                    self.logged = p.step;
                    let line = format!(
                        "step {}/{} | {} | {:.0} s",
                        p.step,
                        self.steps,
                        p.message(),
                        self.t0.elapsed().as_secs_f64()
                    );
                    self.line(&line);
                }
            }
            Event::Restarting(r) => self.line(&r.to_string()),
            Event::Stopping => self.line(
                "stopping: the trainer finishes its step and writes a checkpoint, the generators give their leases back, then the coordinator stops (Ctrl-C again kills every process now; the steps since the newest checkpoint are then done again on --resume)",
            ),
            Event::Killing => self.line("a second stop request: killing every process now"),
        }
    }

    /// A line above the live line (or in the log).
    fn line(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{text}")),
            None => {
                let _ = writeln!(self.out, "{text}");
            }
        }
    }

    /// Ends the live line: left complete when the run finished, as it was otherwise.
    pub fn finish(&self, finished: bool) {
        if let Some(bar) = &self.bar {
            if finished {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::status::Progress;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn progress(step: u64, reward: f64) -> Progress {
        Progress {
            step,
            reward_mean: reward,
            max_staleness: 1,
            tokens_per_second: 100.0,
            policy_version: step,
            generators: 2,
            finished: false,
        }
    }

    #[test]
    fn without_a_terminal_a_line_every_log_every_steps_and_no_nan() {
        let out = Shared::default();
        let mut v = View::log_to(Box::new(out.clone()), 30, 10);
        for (step, reward) in [(0, f64::NAN), (0, f64::NAN), (4, 0.5), (9, 0.5), (12, 0.25)] {
            v.show(Event::Progress(&progress(step, reward)));
        }
        v.show(Event::Progress(&progress(19, 0.5)));
        v.show(Event::Progress(&progress(23, 0.75)));
        v.show(Event::Stopping);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with(
                "step 12/30 | reward 0.250 | staleness ≤1 | 100 tok/s | v12 | 2 generators | "
            ),
            "{text}"
        );
        assert!(lines[1].starts_with("step 23/30 | reward 0.750"), "{text}");
        assert!(lines[2].starts_with("stopping: the trainer"), "{text}");
        // The last step always has its line.
        let mut done = progress(30, 0.5);
        done.finished = true;
        v.show(Event::Progress(&done));
        v.show(Event::Progress(&done));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("step 30/30 | ").count(), 1, "{text}");
        // Before the first step, `–`.
        let out = Shared::default();
        let mut v = View::log_to(Box::new(out.clone()), 30, 1);
        v.show(Event::Progress(&progress(0, f64::NAN)));
        v.show(Event::Progress(&progress(1, f64::NAN)));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.starts_with("step 1/30 | reward – |") && !text.contains("NaN"),
            "{text}"
        );
    }
}
