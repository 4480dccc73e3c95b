//! Held-out evaluation: `k` samples of each held-out prompt at the evaluation
//! temperature, scored by `[reward]`, summarised as
//!
//!   accuracy     = mean reward over every sample
//!   pass@k       = mean over prompts of 1 − C(n − c, k) / C(n, k)   (Chen et al. 2021,
//!                  unbiased; n samples of which c correct, reward ≥ `correct_at`)
//!   maj@n        = share of prompts whose most frequent final answer is right
//!                  (answer-extracting rewards: `[reward] math`)
//!   mean_length  = mean completion tokens
//!
//! `tandem eval` runs it on a model; `tandem run` runs it on the trainer's weights
//! every `[eval] every` steps (and before the first step and after the last). With
//! `[reward] service` the held-out samples are scored by that service too, one `Score`
//! call per prompt as in training ([`Evaluation::with_reward_service`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tandem_data::{DataConfig, DataKind, Dataset, Prompt, Split};
use tandem_model::{Pretrained, RewardModel, SamplingParams};

use crate::error::{bail, Result};
use crate::offline::{render_all, OfflineSampler, Scored};
use crate::reward::{final_answer, math_correct, RewardConfig};
use crate::reward_service::RewardService;

/// `[eval]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// `tandem run`: evaluate every this many steps (and before the first step and
    /// after the last); 0 = off.
    pub every: u64,
    /// Held-out prompts: the first this many of `path`, of `[data] eval_fraction`'s
    /// held-out records, or of the synthetic task.
    pub prompts: usize,
    /// Samples per prompt (n of pass@k and maj@n).
    pub samples: usize,
    /// Sampling temperature of the evaluation (0 = greedy).
    pub temperature: f64,
    /// Longest completion (unset = `[generator] max_new_tokens`).
    pub max_new_tokens: Option<usize>,
    /// A held-out prompt file (JSONL or Parquet, as `[data] path`); unset = the records
    /// `[data] eval_fraction` holds out of a file dataset, or `[data]`'s synthetic task
    /// drawn with `seed`.
    pub path: Option<PathBuf>,
    /// Seed of the synthetic held-out prompts and of sampling.
    pub seed: u64,
    /// A sample is correct (pass@k) when its reward is at least this.
    pub correct_at: f64,
    /// Prompts sampled together.
    pub batch_prompts: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 0,
            prompts: 100,
            samples: 1,
            temperature: 0.7,
            max_new_tokens: None,
            path: None,
            seed: 7919,
            correct_at: 1.0,
            batch_prompts: 32,
        }
    }
}

impl EvalSection {
    pub fn validate(&self) -> Result<()> {
        if self.prompts == 0 || self.samples == 0 || self.batch_prompts == 0 {
            bail!("[eval] prompts, samples and batch_prompts must be ≥ 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("[eval] temperature: must be ≥ 0 (0 = greedy)");
        }
        if self.max_new_tokens == Some(0) {
            bail!("[eval] max_new_tokens: must be ≥ 1 (or left out)");
        }
        if !self.correct_at.is_finite() {
            bail!("[eval] correct_at: must be a number");
        }
        if let Some(p) = &self.path {
            if data_kind(p).is_none() {
                bail!(
                    "[eval] path: `{}` must end in .jsonl or .parquet",
                    p.display()
                );
            }
        }
        Ok(())
    }

    /// The held-out prompts' data config: `path` with `data`'s rendering (and
    /// columns), the held-out side of `data`'s file under `[data] eval_fraction`, or
    /// `data`'s synthetic task with this section's seed. A file dataset without either
    /// is refused: the evaluation would read the training prompts.
    pub fn data(&self, data: &DataConfig) -> Result<DataConfig> {
        Ok(match (&self.path, data.kind) {
            (Some(p), _) => DataConfig {
                kind: data_kind(p).unwrap_or(DataKind::Jsonl),
                path: Some(p.clone()),
                shuffle: false,
                eval_fraction: 0.0,
                split: Split::Train,
                ..data.clone()
            },
            (None, DataKind::Arithmetic) => DataConfig {
                seed: self.seed,
                ..data.clone()
            },
            (None, _) if data.eval_fraction > 0.0 => DataConfig {
                shuffle: false,
                split: Split::HeldOut,
                ..data.clone()
            },
            (None, _) => bail!("[eval]: {NO_TRAINING_PROMPTS}"),
        })
    }
}

/// The refusal of an evaluation that would read the training file.
pub const NO_TRAINING_PROMPTS: &str = "without [eval] path the evaluation of a file dataset would read the prompts it trains on; set [data] eval_fraction = 0.05 or [eval] path";

fn data_kind(p: &std::path::Path) -> Option<DataKind> {
    match p.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => Some(DataKind::Jsonl),
        Some("parquet") => Some(DataKind::Parquet),
        _ => None,
    }
}

/// What one evaluation measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub prompts: usize,
    pub samples: usize,
    pub temperature: f64,
    /// Mean reward over every sample.
    pub accuracy: f64,
    /// (k, pass@k) for k = 1 and k = samples.
    pub pass_at: Vec<(usize, f64)>,
    /// maj@samples, for answer-extracting rewards (`[reward] math`).
    pub maj: Option<f64>,
    /// Mean completion length, tokens.
    pub mean_length: f64,
    pub seconds: f64,
    /// Records of the held-out set the prompts are the first of (`[data]
    /// eval_fraction`'s held-out side, or `[eval] path`'s records); `None` for the
    /// synthetic task.
    pub held_out: Option<usize>,
}

impl EvalReport {
    /// The report as `eval_*` metrics: `eval_accuracy`, `eval_pass_at_K`,
    /// `eval_maj_at_N`, `eval_mean_length`, `eval_prompts` (prompts evaluated) and
    /// `eval_held_out` (records of the held-out set, when it is a file's).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        m.insert("eval_prompts".into(), self.prompts as f64);
        if let Some(n) = self.held_out {
            m.insert("eval_held_out".into(), n as f64);
        }
        m.insert("eval_accuracy".into(), self.accuracy);
        for (k, v) in &self.pass_at {
            m.insert(format!("eval_pass_at_{k}"), *v);
        }
        if let Some(v) = self.maj {
            m.insert(format!("eval_maj_at_{}", self.samples), v);
        }
        m.insert("eval_mean_length".into(), self.mean_length);
        m
    }
}

/// The unbiased pass@k of one prompt with `n` samples of which `c` are correct:
/// 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n−c+1}^{n} (1 − k/i) (Chen et al. 2021).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n < k || c > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

/// Whether the most frequent final answer of `texts` (ties: the one seen first) is
/// `reference`.
pub fn majority_correct(texts: &[&str], reference: &str) -> bool {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for t in texts {
        if let Some(a) = final_answer(t) {
            match counts.iter_mut().find(|(x, _)| *x == a) {
                Some((_, c)) => *c += 1,
                None => counts.push((a, 1)),
            }
        }
    }
    let mut best: Option<&(String, usize)> = None;
    for e in &counts {
        if best.is_none_or(|b| e.1 > b.1) {
            best = Some(e);
        }
    }
    best.is_some_and(|(a, _)| math_correct(a, reference))
}

/// Summarises scored samples of `prompts` (same order) into a report.
pub fn summarise(
    section: &EvalSection,
    reward: &RewardConfig,
    prompts: &[Prompt],
    groups: &[Vec<Scored>],
    seconds: f64,
) -> EvalReport {
    let n = section.samples;
    let all: Vec<&Scored> = groups.iter().flatten().collect();
    let count = all.len().max(1) as f64;
    let mut ks = vec![1, n];
    ks.dedup();
    let pass_at = ks
        .iter()
        .map(|&k| {
            let mean = groups
                .iter()
                .map(|g| {
                    let c = g.iter().filter(|s| s.reward >= section.correct_at).count();
                    pass_at_k(g.len(), c, k)
                })
                .sum::<f64>()
                / groups.len().max(1) as f64;
            (k, mean)
        })
        .collect();
    let answers = prompts.iter().all(|p| p.answer.is_some());
    let maj = (reward.math != 0.0 && answers).then(|| {
        groups
            .iter()
            .zip(prompts)
            .filter(|(g, p)| {
                let texts: Vec<&str> = g.iter().map(|s| s.text.as_str()).collect();
                majority_correct(&texts, p.answer.as_deref().unwrap_or_default())
            })
            .count() as f64
            / groups.len().max(1) as f64
    });
    EvalReport {
        prompts: groups.len(),
        samples: n,
        temperature: section.temperature,
        accuracy: all.iter().map(|s| s.reward).sum::<f64>() / count,
        pass_at,
        maj,
        mean_length: all.iter().map(|s| s.tokens.len() as f64).sum::<f64>() / count,
        seconds,
        held_out: None,
    }
}

/// A held-out set, rendered once, evaluated on any weights of its model family.
pub struct Evaluation {
    section: EvalSection,
    reward: RewardConfig,
    prompts: Vec<Prompt>,
    /// Records of the held-out set (`None`: the synthetic task).
    held_out: Option<usize>,
    ids: Vec<Vec<u32>>,
    params: SamplingParams,
    rm: Option<RewardModel>,
    /// Multi-turn episodes with tools (`[env]`), when the run has them.
    env: Option<tandem_env::Env>,
    /// `[reward] service`'s client, once connected ([`Self::with_reward_service`]).
    service: Option<std::sync::Mutex<RewardService>>,
}

impl Evaluation {
    /// The held-out prompts of `section` (with `data`'s rendering), rendered with `p`'s
    /// tokenizer; `max_new_tokens` is the generator's, used when the section sets none.
    pub fn new(
        p: &Pretrained,
        section: &EvalSection,
        data: &DataConfig,
        reward: &RewardConfig,
        env: &tandem_env::EnvConfig,
        max_new_tokens: usize,
    ) -> Result<Self> {
        section.validate()?;
        if !env.agent.is_empty() {
            bail!("[eval]: the evaluation runs episodes with tools only; [env] agent programs are not started (set eval.every = 0)");
        }
        if env.service.is_some() {
            bail!("[eval]: the evaluation runs episodes with tools only; an [env] service is not called (set eval.every = 0, or evaluate with `tandem eval` on a config without it)");
        }
        // The policy's tokenizer with the run's template variables (the trainer hands its
        // own policy in).
        let mut tokenizer = p.tokenizer.clone();
        crate::render::set_template_kwargs(&mut tokenizer, data)?;
        let env = if env.multi_turn() {
            Some(tandem_env::Env::new(
                env.clone(),
                &tokenizer,
                data.chat,
                &p.stop_token_ids(),
            )?)
        } else {
            None
        };
        if reward.judge.is_some() {
            bail!("[eval]: the evaluation scores with the verifiers, the [reward] model and the reward service; a judge is not called");
        }
        let data = section.data(data)?;
        let set = Dataset::load(&data)?;
        let held_out = set.epoch_len();
        let count = held_out.map_or(section.prompts, |n| n.min(section.prompts));
        let prompts: Vec<Prompt> = (0..count as u64).map(|i| set.get(i)).collect();
        match (held_out, &section.path) {
            (Some(n), None) => tracing::info!(
                prompts = count,
                held_out = n,
                "held-out evaluation: the first {count} of the {n} records [data] eval_fraction = {} holds out of {} (never trained on)",
                data.eval_fraction,
                data.path.as_deref().unwrap_or(std::path::Path::new("?")).display()
            ),
            (Some(n), Some(file)) => tracing::info!(
                prompts = count,
                held_out = n,
                "held-out evaluation: the first {count} of the {n} records of {}",
                file.display()
            ),
            (None, _) => {}
        }
        // The tools are announced as the generators announce them.
        let system = match &env {
            Some(e) if data.chat && !e.config.tools.is_empty() => Some(
                tandem_env::tool_call::system_prompt(data.system.as_deref(), &e.config.tools)?,
            ),
            _ => data.system.clone(),
        };
        let ids = render_all(&tokenizer, &prompts, data.chat, system.as_deref())?;
        let rm = match &reward.model {
            Some(dir) => Some(RewardModel::load(dir, &p.model)?),
            None => None,
        };
        Ok(Evaluation {
            section: section.clone(),
            reward: reward.clone(),
            prompts,
            held_out,
            ids,
            params: SamplingParams {
                temperature: section.temperature,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: section.max_new_tokens.unwrap_or(max_new_tokens),
                stop_token_ids: p.stop_token_ids(),
                seed: section.seed,
            },
            rm,
            env,
            service: None,
        })
    }

    /// Connects `[reward] service` (when the config sets one; its own token,
    /// `TANDEM_REWARD_TOKEN` or `[reward] service_token`, and the process's TLS
    /// material `tls`): [`Self::run`] then adds `service_weight` × its score to each
    /// sample's reward, as the generators do. Without it, a config with a service is
    /// refused by `run`.
    pub fn with_reward_service(
        mut self,
        tls: &tandem_proto::tls::Tls,
        rt: tokio::runtime::Handle,
    ) -> Result<Self> {
        self.service = RewardService::connect(&self.reward, tls, rt)?.map(std::sync::Mutex::new);
        Ok(self)
    }

    /// Samples and scores the held-out set with `p`'s current weights: the report,
    /// and every prompt's scored samples.
    pub fn run(
        &self,
        p: &Pretrained,
        progress: impl FnMut(usize),
    ) -> Result<(EvalReport, Vec<Vec<Scored>>)> {
        let t0 = Instant::now();
        if self.reward.service.is_some() && self.service.is_none() {
            bail!("[eval]: [reward] service is set but not connected (Evaluation::with_reward_service)");
        }
        let answers: Vec<Option<String>> = self.prompts.iter().map(|p| p.answer.clone()).collect();
        let sampler = OfflineSampler {
            model: p,
            reward_model: self.rm.as_ref(),
            samples: self.section.samples,
            batch_prompts: self.section.batch_prompts,
            params: &self.params,
            reward: &self.reward,
            env: self.env.as_ref(),
        };
        let mut groups = sampler.sample(&self.ids, &answers, progress)?;
        self.add_service_scores(&mut groups)?;
        let report = EvalReport {
            held_out: self.held_out,
            ..summarise(
                &self.section,
                &self.reward,
                &self.prompts,
                &groups,
                t0.elapsed().as_secs_f64(),
            )
        };
        Ok((report, groups))
    }

    /// `service_weight` × the reward service's score added to every sample's reward:
    /// one `Score` call per prompt (its text, reference answer and samples), retried as
    /// the generators retry; a prompt the service keeps failing fails the evaluation.
    fn add_service_scores(&self, groups: &mut [Vec<Scored>]) -> Result<()> {
        let Some(service) = &self.service else {
            return Ok(());
        };
        let mut service = service.lock().map_err(|_| {
            crate::error::invalid("[eval]: the reward service's client was poisoned")
        })?;
        for (g, p) in groups.iter_mut().zip(&self.prompts) {
            let req = tandem_proto::v1::ScoreRequest {
                prompt: prompt_text(&p.body),
                answer: p.answer.clone().unwrap_or_default(),
                completions: g.iter().map(|s| s.text.clone()).collect(),
                info_json: p.info.clone().unwrap_or_default(),
            };
            let scores = service
                .score(req)
                .map_err(|why| crate::error::invalid(format!("[eval]: {why}")))?;
            for (s, x) in g.iter_mut().zip(scores) {
                s.reward += self.reward.service_weight * x;
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Every scored sample of [`Self::run`]'s `groups` as a JSONL line: `prompt` (its
    /// index), `prompt_text` (the prompt as the model saw it, rendered, decoded with
    /// `p`'s tokenizer), `sample`, `text`, `tokens`, `reward` (serde escapes the text).
    pub fn samples_jsonl(&self, p: &Pretrained, groups: &[Vec<Scored>]) -> String {
        let mut text = String::new();
        for (i, g) in groups.iter().enumerate() {
            let ids = self.ids.get(i).map(Vec::as_slice).unwrap_or_default();
            let prompt = p
                .tokenizer
                .decode(ids, false)
                .unwrap_or_else(|e| format!("<not decodable: {e}>"));
            for (j, s) in g.iter().enumerate() {
                let line = serde_json::json!({"prompt": i, "prompt_text": prompt, "sample": j, "text": s.text, "tokens": s.tokens.len(), "reward": s.reward});
                text.push_str(&format!("{line}\n"));
            }
        }
        text
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

/// A held-out prompt as text, as the generators send it to the reward service: the
/// text, or a conversation's messages joined by newlines.
fn prompt_text(body: &tandem_data::PromptBody) -> String {
    match body {
        tandem_data::PromptBody::Text(t) => t.clone(),
        tandem_data::PromptBody::Messages(m) => m
            .iter()
            .map(|t| t.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `[eval] path` a file dataset is evaluated on exactly the records
    /// `[data] eval_fraction` holds out (in file order), never on one it trains on; with
    /// neither, the evaluation is refused with the fix; `path` is read whole.
    #[test]
    fn the_held_out_set_is_the_split_s_other_side() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.jsonl");
        let text: String = (0..40)
            .map(|i| format!("{{\"prompt\": \"p{i}\", \"answer\": {i}}}\n"))
            .collect();
        std::fs::write(&file, text).unwrap();
        let data = DataConfig {
            kind: DataKind::Jsonl,
            path: Some(file.clone()),
            eval_fraction: 0.25,
            ..Default::default()
        };
        let section = EvalSection::default();
        let held = Dataset::load(&section.data(&data).unwrap()).unwrap();
        let train = Dataset::load(&data).unwrap();
        let answer = |p: Prompt| p.answer.unwrap().parse::<u64>().unwrap();
        let evaluated: Vec<u64> = (0..held.epoch_len().unwrap() as u64)
            .map(|i| answer(held.get(i)))
            .collect();
        let rule: Vec<u64> = (0..40)
            .filter(|&i| tandem_data::split::held_out(i, 0.25))
            .collect();
        assert_eq!(evaluated, rule);
        let trained: Vec<u64> = (0..train.epoch_len().unwrap() as u64)
            .map(|i| answer(train.get(i)))
            .collect();
        assert!(trained.iter().all(|i| !rule.contains(i)));
        assert_eq!(trained.len() + evaluated.len(), 40);
        // Neither a split nor a path: refused with the fix.
        let whole = DataConfig {
            eval_fraction: 0.0,
            ..data.clone()
        };
        let e = section.data(&whole).unwrap_err().to_string();
        assert!(
            e.contains("set [data] eval_fraction = 0.05 or [eval] path"),
            "{e}"
        );
        // A path is its own held-out set, read whole, whatever the split.
        let own = EvalSection {
            path: Some(file.clone()),
            ..Default::default()
        };
        assert_eq!(
            Dataset::load(&own.data(&data).unwrap())
                .unwrap()
                .epoch_len(),
            Some(40)
        );
        // The synthetic task: drawn with [eval] seed.
        assert_eq!(
            section.data(&DataConfig::default()).unwrap().seed,
            section.seed
        );
    }

    /// pass@k against values computed by hand from the binomial definition.
    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        // n = 5, c = 2, k = 1: 1 − C(3,1)/C(5,1) = 1 − 3/5.
        assert!((pass_at_k(5, 2, 1) - 0.4).abs() < 1e-12);
        // n = 5, c = 2, k = 2: 1 − C(3,2)/C(5,2) = 1 − 3/10.
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        // n = 4, c = 1, k = 3: 1 − C(3,3)/C(4,3) = 1 − 1/4.
        assert!((pass_at_k(4, 1, 3) - 0.75).abs() < 1e-12);
        assert_eq!(pass_at_k(3, 0, 2), 0.0);
        assert_eq!(pass_at_k(3, 2, 2), 1.0);
        assert!(pass_at_k(2, 1, 3).is_nan());
    }

    #[test]
    fn the_majority_answer_decides_maj_at_n() {
        assert!(majority_correct(&["= 7", "it is 7", "9"], "7"));
        assert!(!majority_correct(&["9", "7", "9"], "7"));
        // A tie goes to the answer seen first.
        assert!(majority_correct(&["7", "9"], "7"));
        assert!(!majority_correct(&["no number", "none"], "7"));
    }

    #[test]
    fn a_report_summarises_by_hand() {
        let section = EvalSection {
            samples: 2,
            ..Default::default()
        };
        let s = |text: &str, reward: f64, len: usize| Scored {
            tokens: vec![1; len],
            text: text.into(),
            reward,
        };
        let prompts = vec![
            Prompt {
                body: tandem_data::PromptBody::Text("1 + 1".into()),
                answer: Some("2".into()),
                info: None,
            },
            Prompt {
                body: tandem_data::PromptBody::Text("2 + 2".into()),
                answer: Some("4".into()),
                info: None,
            },
        ];
        let groups = vec![
            vec![s("2", 1.0, 2), s("3", 0.0, 4)],
            vec![s("5", 0.0, 6), s("5", 0.0, 4)],
        ];
        let r = summarise(&section, &RewardConfig::default(), &prompts, &groups, 0.0);
        assert_eq!(r.accuracy, 0.25);
        // pass@1: (1/2 + 0)/2; pass@2: (1 + 0)/2.
        assert_eq!(r.pass_at, vec![(1, 0.25), (2, 0.5)]);
        // Prompt 1 ties 2 against 3: 2 came first.
        assert_eq!(r.maj, Some(0.5));
        assert_eq!(r.mean_length, 4.0);
        let m = r.metrics();
        assert_eq!(m["eval_pass_at_2"], 0.5);
        assert_eq!(m["eval_maj_at_2"], 0.5);
    }
}
