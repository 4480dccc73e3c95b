//! `tandem rejection-sample`: N completions per prompt from a policy, scored by
//! the verifiers and / or a reward model of `[reward]`; the best per prompt (or the
//! top K overall) become an SFT dataset that `tandem sft` reads (`[rejection] sft`
//! names the SFT config the binary runs next).

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tandem_data::{DataConfig, Dataset, Prompt, PromptBody};
use tandem_model::{LoraSection, ModelSection, RewardModel, SamplingParams};

use crate::config::GeneratorConfig;
use crate::error::{bail, Context, Result};
use crate::offline::{render_all, OfflineSampler};
use crate::reward::RewardConfig;

/// What is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// The highest-scoring completion of each prompt (the first on ties).
    #[default]
    Best,
    /// The `top_k` highest-scoring completions over all prompts.
    TopK,
}

/// `[rejection]` (docs/pipeline.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RejectionSection {
    /// Completions sampled per prompt.
    pub n: usize,
    /// Prompts used: the first of the file (at most all), or this many synthetic ones.
    pub prompts: usize,
    /// Prompts sampled together (each with `n` completions).
    pub batch_prompts: usize,
    /// `best` (per prompt) or `top_k` (overall).
    pub keep: Keep,
    /// With `keep = "top_k"`: how many.
    pub top_k: usize,
    /// Keep only completions scoring at least this (unset = no threshold).
    pub min_reward: Option<f64>,
    /// The SFT dataset written (JSONL; `messages` with `chat`, else `prompt` /
    /// `completion`), with `OUT.summary.json` beside it.
    pub out: PathBuf,
    /// Seed of sampling.
    pub seed: u64,
    /// Then run `tandem sft` with this config on the written dataset (its `[data] path`
    /// is set to `out`; unset = stop after writing).
    pub sft: Option<PathBuf>,
}

impl Default for RejectionSection {
    fn default() -> Self {
        RejectionSection {
            n: 16,
            prompts: 256,
            batch_prompts: 4,
            keep: Keep::Best,
            top_k: 0,
            min_reward: None,
            out: "runs/rejection/sft.jsonl".into(),
            seed: 0,
            sft: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RejectionConfig {
    pub model: ModelSection,
    /// `[lora]`: sample the base of `[model]` with this adapter (its `from` folder, e.g.
    /// a LoRA run's `final/`); absent = the model alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSection>,
    pub data: DataConfig,
    pub generator: GeneratorConfig,
    pub reward: RewardConfig,
    pub rejection: RejectionSection,
}

struct Sample {
    prompt: usize,
    text: String,
    reward: f64,
}

impl RejectionConfig {
    pub fn validate(&self) -> Result<()> {
        let r = &self.rejection;
        self.model.validate()?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        self.data.validate()?;
        self.generator.validate()?;
        self.reward.validate()?;
        if r.n == 0 || r.prompts == 0 || r.batch_prompts == 0 {
            bail!("[rejection] n, prompts and batch_prompts must be ≥ 1");
        }
        if r.keep == Keep::TopK && r.top_k == 0 {
            bail!("[rejection] top_k: keep = \"top_k\" needs top_k ≥ 1");
        }
        if r.min_reward.is_some_and(|m| !m.is_finite()) {
            bail!("[rejection] min_reward: must be finite");
        }
        if self.reward.service.is_some() {
            bail!("[reward] service: rejection sampling scores with the verifiers and [reward] model only");
        }
        Ok(())
    }
}

/// Samples, scores and writes `[rejection] out` (and its summary) for `cfg`
/// (validated here); returns the summary.
pub fn run(cfg: &RejectionConfig) -> Result<serde_json::Value> {
    cfg.validate()?;
    let r = &cfg.rejection;
    let data = Dataset::load(&cfg.data)?;
    let count = data.epoch_len().map_or(r.prompts, |n| n.min(r.prompts));
    let prompts: Vec<_> = (0..count as u64).map(|i| data.get(i)).collect();
    let samples = sample(cfg, &prompts)?;
    let kept = select(r, &samples);
    if kept.is_empty() {
        bail!(
            "no completion was kept ({} sampled; min_reward {:?}): nothing to write",
            samples.len(),
            r.min_reward
        );
    }
    write_kept(&r.out, &kept, &prompts, cfg.data.chat)?;
    let mean = |v: &mut dyn Iterator<Item = f64>| {
        let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        s / n.max(1) as f64
    };
    let summary = json!({
        "prompts": count,
        "samples": samples.len(),
        "kept": kept.len(),
        "mean_reward_sampled": mean(&mut samples.iter().map(|s| s.reward)),
        "mean_reward_kept": mean(&mut kept.iter().map(|s| s.reward)),
        "out": r.out,
    });
    let summary_path = r.out.with_extension("summary.json");
    tandem_model::write_atomic(&summary_path, serde_json::to_string_pretty(&summary)?)?;
    eprintln!(
        "rejection-sample: kept {} of {} samples from {count} prompts (mean reward {:.3} → {:.3}); wrote {}",
        kept.len(),
        samples.len(),
        summary["mean_reward_sampled"].as_f64().unwrap_or(f64::NAN),
        summary["mean_reward_kept"].as_f64().unwrap_or(f64::NAN),
        r.out.display()
    );
    Ok(summary)
}

/// `[rejection] n` scored completions of each prompt, with a progress bar.
fn sample(cfg: &RejectionConfig, prompts: &[Prompt]) -> Result<Vec<Sample>> {
    let r = &cfg.rejection;
    let mut p = tandem_model::load_model(&tandem_model::materialize(&cfg.model.path)?)?;
    if let Some(lora) = &cfg.lora {
        p.model = lora
            .attach(p.model)
            .with_context(|| format!("[lora]: attaching the adapter to {}", cfg.model.path))?;
    }
    crate::render::set_template_kwargs(&mut p.tokenizer, &cfg.data)?;
    let rm = match &cfg.reward.model {
        Some(dir) => Some(RewardModel::load(dir, &p.model)?),
        None => None,
    };
    let ids = render_all(
        &p.tokenizer,
        prompts,
        cfg.data.chat,
        cfg.data.system.as_deref(),
    )?;
    let answers: Vec<Option<String>> = prompts.iter().map(|pr| pr.answer.clone()).collect();
    let bar = ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] prompt {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let g = &cfg.generator;
    let params = SamplingParams {
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        max_new_tokens: g.max_new_tokens,
        stop_token_ids: p.stop_token_ids(),
        seed: r.seed,
    };
    let sampler = OfflineSampler {
        model: &p,
        reward_model: rm.as_ref(),
        samples: r.n,
        batch_prompts: r.batch_prompts,
        params: &params,
        reward: &cfg.reward,
        env: None,
    };
    let groups = sampler.sample(&ids, &answers, |done| bar.set_position(done as u64))?;
    bar.finish();
    Ok(groups
        .into_iter()
        .enumerate()
        .flat_map(|(prompt, group)| {
            group.into_iter().map(move |s| Sample {
                prompt,
                text: s.text,
                reward: s.reward,
            })
        })
        .collect())
}

/// The samples `[rejection] keep` keeps (at least `min_reward`), in prompt order.
fn select<'a>(r: &RejectionSection, samples: &'a [Sample]) -> Vec<&'a Sample> {
    let passes = |s: &&Sample| r.min_reward.is_none_or(|m| s.reward >= m);
    let mut kept: Vec<&Sample> = match r.keep {
        Keep::Best => samples
            .chunk_by(|a, b| a.prompt == b.prompt)
            .filter_map(|g| {
                g.iter()
                    .reduce(|best, s| if s.reward > best.reward { s } else { best })
            })
            .filter(passes)
            .collect(),
        Keep::TopK => {
            let mut all: Vec<&Sample> = samples.iter().filter(passes).collect();
            all.sort_by(|a, b| b.reward.total_cmp(&a.reward));
            all.truncate(r.top_k);
            all
        }
    };
    kept.sort_by_key(|s| s.prompt);
    kept
}

/// Writes the kept samples to `out` as SFT records (`messages` with `chat`, else
/// `prompt` / `completion`): into `OUT.jsonl.partial`, renamed when complete.
fn write_kept(out: &Path, kept: &[&Sample], prompts: &[Prompt], chat: bool) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let partial = out.with_extension("jsonl.partial");
    {
        let mut f = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        for s in kept {
            let pr = &prompts[s.prompt];
            let line = match (&pr.body, chat) {
                (PromptBody::Text(t), false) => json!({"prompt": t, "completion": s.text}),
                (body, _) => {
                    let mut turns: Vec<serde_json::Value> = match body {
                        PromptBody::Text(t) => vec![json!({"role": "user", "content": t})],
                        PromptBody::Messages(m) => m
                            .iter()
                            .map(|t| json!({"role": t.role, "content": t.content}))
                            .collect(),
                    };
                    turns.push(json!({"role": "assistant", "content": s.text}));
                    json!({"messages": turns})
                }
            };
            writeln!(f, "{line}")?;
        }
    }
    std::fs::rename(&partial, out).with_context(|| format!("renaming into {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn config(lora: Option<LoraSection>) -> RejectionConfig {
        let mut cfg = RejectionConfig {
            lora,
            ..Default::default()
        };
        cfg.generator.max_new_tokens = 8;
        cfg.generator.temperature = 1.0;
        cfg.rejection.n = 2;
        cfg
    }

    /// `[lora] from` is the policy rejection sampling draws from: a trained PEFT
    /// adapter changes the samples; a folder that is not one is refused naming `[lora]`.
    #[test]
    fn rejection_sampling_samples_the_lora_adapter_it_is_given() {
        let dir =
            std::env::temp_dir().join(format!("tandem-rejection-lora-{}", std::process::id()));
        let p = tandem_model::preset::init("tiny", 0, &Device::Cpu).unwrap();
        let m = LoraSection {
            rank: 4,
            ..Default::default()
        }
        .attach(p.model)
        .unwrap();
        let mut t = HashMap::new();
        for (name, v) in m.trainable().iter() {
            t.insert(
                name.to_string(),
                Tensor::randn(0f32, 0.3, v.dims(), &Device::Cpu).unwrap(),
            );
        }
        m.trainable().assign(&t).unwrap();
        tandem_model::lora::save_peft(m.adapter().unwrap(), &dir, "preset:tiny", DType::F32)
            .unwrap();

        let data = Dataset::load(&DataConfig::default()).unwrap();
        let prompts: Vec<_> = (0..3).map(|i| data.get(i)).collect();
        let texts = |cfg: &RejectionConfig| -> Vec<String> {
            sample(cfg, &prompts)
                .unwrap()
                .into_iter()
                .map(|s| s.text)
                .collect()
        };
        let base = texts(&config(None));
        let fresh = texts(&config(Some(LoraSection::default())));
        assert_eq!(base, fresh, "a fresh adapter is the base");
        let from = LoraSection {
            from: Some(dir.to_string_lossy().into_owned()),
            ..Default::default()
        };
        assert_ne!(
            base,
            texts(&config(Some(from))),
            "the adapter was not applied"
        );

        let missing = LoraSection {
            from: Some(dir.join("nothing").to_string_lossy().into_owned()),
            ..Default::default()
        };
        let e = match sample(&config(Some(missing)), &prompts) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a missing adapter folder was taken"),
        };
        assert!(e.contains("[lora]"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
