//! `tandem sft`: supervised fine-tuning on a JSONL / Parquet file with TRL's
//! fields, or on the synthetic arithmetic task; loss on assistant tokens only, a
//! held-out validation loss, a metrics log, checkpoints and the final model as HF
//! folders. Every record is read and checked before anything is written.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tandem_data::{DataConfig, DataKind};
use tandem_model::ChatMessage;
use tandem_model::ModelSection;

use super::data::{Example, Masking, Render, Tokenized};
use super::loss;
use crate::config::OptimizerConfig;
use crate::error::{bail, Context, Result};
use crate::offline::{save_model, Stage, TrainSection};
use crate::optimizer::Optimizer;

/// `[sft]` (docs/pipeline.md); the schedule is `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftSection {
    /// `all_assistant` or `last_turn`.
    pub masking: Masking,
    /// Records drawn from the synthetic task ([data] kind = "arithmetic").
    pub examples: usize,
    /// Tool-use transcripts instead of bare answers (synthetic task, chat): each record
    /// is the question, the model's call of this tool, the tool's answer and the final
    /// answer, the tools announced in the system turn as `[env] tools` announces them.
    pub tools: Vec<String>,
}

impl Default for SftSection {
    fn default() -> Self {
        SftSection {
            masking: Masking::AllAssistant,
            examples: 2000,
            tools: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainSection,
    pub sft: SftSection,
    pub optimizer: OptimizerConfig,
    /// `[lora]`: train adapters on the frozen model (`None`: every parameter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<tandem_model::LoraSection>,
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        self.data.validate()?;
        self.optimizer.validate()?;
        self.train.validate()?;
        if self.data.kind == DataKind::Arithmetic && self.sft.examples == 0 {
            bail!("[sft] examples: the synthetic task needs ≥ 1");
        }
        if !self.sft.tools.is_empty() && (self.data.kind != DataKind::Arithmetic || !self.data.chat)
        {
            bail!("[sft] tools: transcripts are drawn from the synthetic task with the chat template ([data] kind = \"arithmetic\", chat = true)");
        }
        Ok(())
    }
}

/// A tool-use transcript of a synthetic problem: the turns after the question (the
/// model's call, the tool's answer, the final answer), from the question ("47 * 86")
/// and its answer. The binary provides it (the call convention is the generator's).
pub type Transcript<'a> = &'a dyn Fn(&str, &str) -> Vec<ChatMessage>;

/// The records of the configured data, checked; errors name the file, line and field.
/// With `transcript`, each synthetic record is the question and its transcript.
pub fn examples(
    cfg: &DataConfig,
    synthetic: usize,
    transcript: Option<Transcript<'_>>,
) -> Result<Vec<Example>> {
    if let (Some(t), DataKind::Arithmetic) = (transcript, &cfg.kind) {
        return Ok(tandem_data::Arithmetic::new(cfg)?
            .problems(synthetic)
            .into_iter()
            .map(|(question, prompt, answer)| {
                let mut turns = vec![ChatMessage::user(prompt)];
                turns.extend(t(&question, &answer));
                Example::Conversation(turns)
            })
            .collect());
    }
    match cfg.kind {
        DataKind::Arithmetic => Ok(tandem_data::Arithmetic::new(cfg)?
            .pairs(synthetic)
            .into_iter()
            .map(|(q, a)| {
                if cfg.chat {
                    Example::Conversation(vec![
                        ChatMessage::user(q),
                        ChatMessage {
                            role: "assistant".into(),
                            content: a,
                        },
                    ])
                } else {
                    Example::Text {
                        prompt: q,
                        completion: format!(" {a}"),
                    }
                }
            })
            .collect()),
        DataKind::Jsonl | DataKind::Parquet => {
            let rows = tandem_data::read_records(cfg)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let ex = Example::from_row(&r.value, &r.at)?;
                if matches!(ex, Example::Text { .. }) && cfg.chat {
                    // String prompt and completion under a chat model: one exchange.
                    let Example::Text { prompt, completion } = ex else {
                        unreachable!()
                    };
                    out.push(Example::Conversation(vec![
                        ChatMessage::user(prompt),
                        ChatMessage {
                            role: "assistant".into(),
                            content: completion,
                        },
                    ]));
                } else if matches!(ex, Example::Conversation(_)) && !cfg.chat {
                    bail!(
                        "{}: a conversation needs the chat template: set [data] chat = true",
                        r.at
                    );
                } else {
                    out.push(ex);
                }
            }
            Ok(out)
        }
    }
}

struct Sft {
    p: tandem_model::Pretrained,
    /// `[model] save_dtype`, else the dtype the weights came in.
    save_dtype: candle_core::DType,
    /// `[model] path`: under LoRA the saved adapter's base.
    base: String,
    opt: Optimizer,
    opt_cfg: OptimizerConfig,
}

impl Stage for Sft {
    type Item = Tokenized;

    fn step(&mut self, batch: &[Tokenized], step: u64) -> Result<Value> {
        let m = loss::step(&self.p.model, &mut self.opt, &self.opt_cfg, batch, step)?;
        Ok(serde_json::to_value(m)?)
    }

    fn evaluate(&mut self, items: &[Tokenized]) -> Result<Map<String, Value>> {
        let model = &self.p.model;
        let w = model.inference_weights();
        let (mut nll, mut n) = (0.0, 0usize);
        for chunk in items.chunks(16) {
            let (l, k) = loss::eval_nll(model, &w, chunk)?;
            nll += l;
            n += k;
        }
        let mut m = Map::new();
        m.insert("loss".into(), (nll / n as f64).into());
        Ok(m)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_model(&self.p, dir, self.save_dtype, &self.base)
    }
}

/// Trains `cfg` (validated here); returns the summary that is also written to
/// `[train] out_dir/summary.json`.
pub fn run(cfg: &SftConfig) -> Result<Value> {
    run_with(cfg, None)
}

/// [`run`], with synthetic records as tool-use transcripts (`[sft] tools`).
pub fn run_with(cfg: &SftConfig, transcript: Option<Transcript<'_>>) -> Result<Value> {
    cfg.validate()?;
    if !cfg.sft.tools.is_empty() && transcript.is_none() {
        bail!("[sft] tools: this build has no transcript for them");
    }
    let p = crate::offline::load_policy(&cfg.model, &cfg.data, cfg.lora.as_ref())?;
    let save_dtype = cfg.model.save_dtype_or(p.trained_dtype())?;

    // Read, check and tokenize everything before writing anything.
    let records = examples(&cfg.data, cfg.sft.examples, transcript)?;
    let render = Render::for_model(
        &p,
        cfg.data.system.as_deref(),
        cfg.sft.masking,
        cfg.train.max_len,
    );
    let mut data = Vec::with_capacity(records.len());
    let mut skipped = 0usize;
    for (i, ex) in records.iter().enumerate() {
        match render
            .tokenize(ex)
            .with_context(|| format!("record {}", i + 1))?
        {
            Some(t) => data.push(t),
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            max_len = cfg.train.max_len,
            "records with no trained token left after truncation were skipped"
        );
    }
    let opt = Optimizer::new(&cfg.optimizer, &p.model, Vec::new())?;
    let mut stage = Sft {
        p,
        save_dtype,
        base: cfg.model.path.clone(),
        opt,
        opt_cfg: cfg.optimizer.clone(),
    };
    crate::offline::train(&mut stage, data, &cfg.train, "sft")
}
