//! `tandem score`: per-token logprobs and entropies of given completions.
//!
//! Input lines: `{"prompt_ids": [...], "completion_ids": [...]}` or
//! `{"prompt": "...", "completion": "..."}`. Output lines, same order:
//! `{"logprobs": [...], "entropy": [...]}`, one value per completion token, where
//! logprob = log softmax(logits / T) at the position that predicts that token.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub struct ScoreArgs {
    /// HF model folder, .gguf file, or `smollm2`.
    #[arg(long)]
    model: String,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

/// One input record, as token ids.
struct Record {
    prompt: Vec<u32>,
    completion: Vec<u32>,
}

fn ids_field(v: &Value, key: &str, at: &str) -> Result<Option<Vec<u32>>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&n| n <= u32::MAX as u64)
                    .map(|n| n as u32)
                    .with_context(|| {
                        format!(
                            "{at}: `{key}[{i}]` must be a non-negative integer token id, got {x}"
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => bail!("{at}: `{key}` must be an array of token ids, got {other}"),
    }
}

fn parse_line(line: &str, at: &str, tok: &tandem_model::Tokenizer, vocab: usize) -> Result<Record> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("{at}: not valid JSON"))?;
    if !v.is_object() {
        bail!("{at}: each line must be a JSON object");
    }
    let text = |key: &str| -> Result<Option<Vec<u32>>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(tok.encode(s)?)),
            Some(other) => bail!("{at}: `{key}` must be a string, got {other}"),
        }
    };
    let prompt = match ids_field(&v, "prompt_ids", at)? {
        Some(p) => p,
        None => {
            text("prompt")?.with_context(|| format!("{at}: missing `prompt_ids` (or `prompt`)"))?
        }
    };
    let completion = match ids_field(&v, "completion_ids", at)? {
        Some(c) => c,
        None => text("completion")?
            .with_context(|| format!("{at}: missing `completion_ids` (or `completion`)"))?,
    };
    if prompt.is_empty() {
        bail!("{at}: the prompt is empty; at least one prompt token must precede the completion");
    }
    if completion.is_empty() {
        bail!("{at}: the completion is empty; there is nothing to score");
    }
    for (field, ids) in [("prompt_ids", &prompt), ("completion_ids", &completion)] {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            bail!("{at}: `{field}[{i}]` = {id} is not below the vocabulary size {vocab}");
        }
    }
    Ok(Record { prompt, completion })
}

fn read_records(path: &Path, tok: &tandem_model::Tokenizer, vocab: usize) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        let line = line.with_context(|| format!("{at}: reading"))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(&line, &at, tok, vocab)?);
    }
    if out.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(out)
}

pub fn run(a: ScoreArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be positive, got {}", a.temperature);
    }
    let p = tandem_model::load_model(&a.model)?;
    let records = read_records(&a.input, &p.tokenizer, p.model.config().vocab_size)?;
    let bar = indicatif::ProgressBar::new(records.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sequences {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Written beside the output and renamed at the end: a failure leaves no partial file.
    let tmp = a.output.with_extension("jsonl.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = BufWriter::new(file);
    let weights = p.model.inference_weights();
    for chunk in records.chunks(a.batch_size) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|r| [r.prompt.as_slice(), r.completion.as_slice()].concat())
            .collect();
        let starts: Vec<usize> = chunk.iter().map(|r| r.prompt.len()).collect();
        let out = p
            .model
            .completion_logprobs(&weights, &seqs, &starts, a.temperature)?;
        for (lp, ent) in out
            .split(&out.logprobs)?
            .into_iter()
            .zip(out.split(&out.entropy)?)
        {
            serde_json::to_writer(&mut w, &serde_json::json!({"logprobs": lp, "entropy": ent}))?;
            w.write_all(b"\n")?;
        }
        bar.inc(chunk.len() as u64);
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, &a.output).with_context(|| format!("writing {}", a.output.display()))?;
    bar.finish_and_clear();
    tracing::info!(records = records.len(), output = %a.output.display(), "scored");
    Ok(())
}
