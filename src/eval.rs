//! `tandem eval`: a model on the held-out set of a config's `[eval]` section —
//! accuracy, pass@k, maj@k and mean length, as a table and as JSON. Also the evaluator
//! the trainer of `tandem run` calls between steps.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_generator::eval::{EvalReport, Evaluation};
use tandem_model::Pretrained;

use crate::run_config::RunConfig;

#[derive(Args)]
pub struct EvalArgs {
    /// The model to evaluate (HF folder, .gguf, a fetchable name or `preset:NAME`;
    /// default: the config's `[model] path`, with its `[lora]` adapter when it has one).
    #[arg(long)]
    model: Option<String>,
    /// A run config: its `[eval]` (held-out prompts, samples, temperature), `[data]`
    /// (rendering, the synthetic task), `[generator] max_new_tokens` and `[reward]`.
    #[arg(long)]
    config: PathBuf,
    /// Override a key: `section.key=value` (repeatable), e.g. `--set eval.samples=8`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write every scored sample here (JSONL: prompt, prompt_text, sample, text,
    /// tokens, reward).
    #[arg(long)]
    samples: Option<PathBuf>,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let cfg = RunConfig::read(&a.config, &a.set)?;
    let spec = a.model.clone().unwrap_or_else(|| cfg.model.path.clone());
    let mut p = tandem_model::load_model(&tandem_model::materialize(&spec)?)
        .with_context(|| format!("--model {spec}"))?;
    // The run's policy: the base with the run's adapter (a `--model` is taken as is).
    if let (None, Some(lora)) = (&a.model, &cfg.lora) {
        p.model = lora
            .attach(p.model)
            .with_context(|| format!("[lora]: attaching the adapter to {spec}"))?;
    }
    // `[reward] service` scores the held-out samples too: the calls need a runtime and
    // the config's TLS material (the service's own token comes from the environment or
    // `[reward] service_token`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let tls = cfg.tls.load().map_err(anyhow::Error::msg)?;
    let evaluation = Evaluation::new(
        &p,
        &cfg.eval,
        &cfg.data,
        &cfg.reward,
        &cfg.env,
        cfg.generator.max_new_tokens,
    )?
    .with_reward_service(&tls, rt.handle().clone())?;
    let bar = ProgressBar::new(evaluation.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] prompt {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (report, groups) = evaluation.run(&p, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    if let Some(path) = &a.samples {
        tandem_model::write_atomic(path, evaluation.samples_jsonl(&p, &groups))?;
    }
    print_table(&spec, &report);
    if let Some(path) = &a.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = spec.clone().into();
        v["metrics"] = serde_json::to_value(report.metrics())?;
        tandem_model::write_atomic(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn print_table(model: &str, r: &EvalReport) {
    println!(
        "{model}: {} held-out prompts × {} samples at T = {}",
        r.prompts, r.samples, r.temperature
    );
    if let Some(n) = r.held_out {
        println!("(the first {} of {n} held-out records)", r.prompts);
    }
    println!("| metric | value |\n|---|---|");
    println!("| accuracy (mean reward) | {:.4} |", r.accuracy);
    for (k, v) in &r.pass_at {
        println!("| pass@{k} | {v:.4} |");
    }
    if let Some(m) = r.maj {
        println!("| maj@{} | {m:.4} |", r.samples);
    }
    println!("| mean length (tokens) | {:.1} |", r.mean_length);
    println!("| seconds | {:.1} |", r.seconds);
}

/// The trainer's evaluator in `tandem run`: the held-out set of the run's config,
/// rendered on first use with the trainer's tokenizer, sampled with its current weights
/// and scored as the generators score (`[reward] service` reached with `tls` on `rt`).
pub struct RunEvaluator {
    cfg: RunConfig,
    evaluation: Option<Evaluation>,
    tls: tandem_proto::tls::Tls,
    rt: tokio::runtime::Handle,
}

impl RunEvaluator {
    pub fn new(cfg: &RunConfig, tls: &tandem_proto::tls::Tls, rt: tokio::runtime::Handle) -> Self {
        RunEvaluator {
            cfg: cfg.clone(),
            evaluation: None,
            tls: tls.clone(),
            rt,
        }
    }
}

impl tandem_trainer::node::evaluate::Evaluator for RunEvaluator {
    fn evaluate(&mut self, policy: &Pretrained) -> tandem_trainer::Result<BTreeMap<String, f64>> {
        let err =
            |e: tandem_generator::Error| tandem_trainer::Error::Invalid(format!("[eval]: {e}"));
        if self.evaluation.is_none() {
            let c = &self.cfg;
            self.evaluation = Some(
                Evaluation::new(
                    policy,
                    &c.eval,
                    &c.data,
                    &c.reward,
                    &c.env,
                    c.generator.max_new_tokens,
                )
                .and_then(|e| e.with_reward_service(&self.tls, self.rt.clone()))
                .map_err(err)?,
            );
        }
        let e = self.evaluation.as_ref().expect("set above");
        Ok(e.run(policy, |_| {}).map_err(err)?.0.metrics())
    }
}
