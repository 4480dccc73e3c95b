//! Per-token logprobs and entropies of given completions (`tandem score`).
//!
//! Input lines: `{"prompt_ids": [...], "completion_ids": [...]}` or
//! `{"prompt": "...", "completion": "..."}`, every one checked before any is scored
//! (errors name the file, the line and the field). Output lines, same order:
//! `{"logprobs": [...], "entropy": [...]}`, one value per completion token, where
//! logprob = log softmax(logits / T) at the position that predicts that token. The
//! output is written beside its path as `.jsonl.partial` and renamed at the end: a
//! failure leaves no partial file.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::{Pretrained, Tokenizer};

/// One input record, as token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// Reads every record of the JSONL file at `path` (blank lines skipped), text encoded
/// with `tok`, every id checked against `vocab`; an error for the first bad line, or
/// for a file without records.
pub fn read_records(path: &Path, tok: &Tokenizer, vocab: usize) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        let line = line.map_err(|e| Error::invalid(format!("{at}: reading: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_line(&line, &at, tok, vocab)?);
    }
    if out.is_empty() {
        return Err(Error::format(path, "no records"));
    }
    Ok(out)
}

/// One record from its JSON line; `at` ("file:line") starts every error.
pub fn parse_line(line: &str, at: &str, tok: &Tokenizer, vocab: usize) -> Result<Record> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| Error::invalid(format!("{at}: not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::invalid(format!(
            "{at}: each line must be a JSON object"
        )));
    }
    let ids = |ids_key: &str, text_key: &str| -> Result<Vec<u32>> {
        if let Some(ids) = ids_field(&v, ids_key, at)? {
            return Ok(ids);
        }
        match v.get(text_key) {
            None | Some(Value::Null) => Err(Error::invalid(format!(
                "{at}: missing `{ids_key}` (or `{text_key}`)"
            ))),
            Some(Value::String(s)) => tok.encode(s),
            Some(other) => Err(Error::invalid(format!(
                "{at}: `{text_key}` must be a string, got {other}"
            ))),
        }
    };
    let prompt = ids("prompt_ids", "prompt")?;
    let completion = ids("completion_ids", "completion")?;
    if prompt.is_empty() {
        return Err(Error::invalid(format!(
            "{at}: the prompt is empty; at least one prompt token must precede the completion"
        )));
    }
    if completion.is_empty() {
        return Err(Error::invalid(format!(
            "{at}: the completion is empty; there is nothing to score"
        )));
    }
    for (field, ids) in [("prompt_ids", &prompt), ("completion_ids", &completion)] {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "{at}: `{field}[{i}]` = {id} is not below the vocabulary size {vocab}"
            )));
        }
    }
    Ok(Record { prompt, completion })
}

/// The token ids at `key`: `None` when absent or null, an error naming `key[i]` for a
/// value that is not a token id.
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
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "{at}: `{key}[{i}]` must be a non-negative integer token id, got {x}"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(Error::invalid(format!(
            "{at}: `{key}` must be an array of token ids, got {other}"
        ))),
    }
}

/// Scores `records` with `p` at `temperature`, `batch_size` sequences per forward, and
/// writes one output line per record to `output` (renamed into place at the end).
/// `progress` gets the number of records of each batch once it is written.
pub fn score_records(
    p: &Pretrained,
    records: &[Record],
    temperature: f64,
    batch_size: usize,
    output: &Path,
    mut progress: impl FnMut(usize),
) -> Result<()> {
    if batch_size == 0 || !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::invalid(format!(
            "scoring needs a batch size ≥ 1 and a positive temperature, got {batch_size} and {temperature}"
        )));
    }
    let tmp = output.with_extension("jsonl.partial");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::new(file);
    let weights = p.model.inference_weights();
    let write_err = |e: std::io::Error| Error::io(&tmp, e);
    for chunk in records.chunks(batch_size) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|r| [r.prompt.as_slice(), r.completion.as_slice()].concat())
            .collect();
        let starts: Vec<usize> = chunk.iter().map(|r| r.prompt.len()).collect();
        let out = p
            .model
            .completion_logprobs(&weights, &seqs, &starts, temperature)?;
        for (lp, ent) in out
            .split(&out.logprobs)?
            .into_iter()
            .zip(out.split(&out.entropy)?)
        {
            let line = serde_json::json!({"logprobs": lp, "entropy": ent});
            writeln!(w, "{line}").map_err(write_err)?;
        }
        progress(chunk.len());
    }
    w.flush().map_err(write_err)?;
    drop(w);
    std::fs::rename(&tmp, output).map_err(|e| Error::io(output, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Pretrained {
        crate::preset::init("tiny", 0, &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn bad_lines_name_the_line_and_the_field() {
        let p = tiny();
        let vocab = p.model.config().vocab_size;
        let err = |line: &str| {
            parse_line(line, "in.jsonl:3", &p.tokenizer, vocab)
                .unwrap_err()
                .to_string()
        };
        for (line, needles) in [
            (
                r#"{"prompt_ids": [1], "completion_ids": [2, 99999]}"#,
                &["completion_ids[1]", "vocabulary"][..],
            ),
            (
                r#"{"prompt_ids": [1, -4], "completion_ids": [3]}"#,
                &["prompt_ids[1]", "token id"],
            ),
            (
                r#"{"prompt_ids": 1, "completion_ids": [3]}"#,
                &["`prompt_ids` must be an array"],
            ),
            (
                r#"{"completion_ids": [3]}"#,
                &["missing `prompt_ids` (or `prompt`)"],
            ),
            (
                r#"{"prompt": 5, "completion_ids": [3]}"#,
                &["`prompt` must be a string"],
            ),
            (
                r#"{"prompt_ids": [], "completion_ids": [3]}"#,
                &["prompt is empty"],
            ),
            (
                r#"{"prompt_ids": [1], "completion": ""}"#,
                &["completion is empty"],
            ),
            ("[1, 2]", &["JSON object"]),
            ("{not json", &["not valid JSON"]),
        ] {
            let e = err(line);
            assert!(e.starts_with("in.jsonl:3: "), "{line}: {e}");
            for n in needles {
                assert!(e.contains(n), "{line}: {e}");
            }
        }
        // Text is encoded with the model's tokenizer; ids win over text.
        let r = parse_line(
            r#"{"prompt": "1+1=", "completion": "2", "prompt_ids": [5]}"#,
            "x",
            &p.tokenizer,
            vocab,
        )
        .unwrap();
        assert_eq!(r.prompt, vec![5]);
        assert_eq!(r.completion, p.tokenizer.encode("2").unwrap());
    }

    #[test]
    fn every_completion_token_gets_a_logprob_whatever_the_batch() {
        let p = tiny();
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(
            &input,
            "{\"prompt_ids\": [1, 2], \"completion_ids\": [3, 4, 5]}\n\n{\"prompt_ids\": [7], \"completion_ids\": [8]}\n{\"prompt_ids\": [9, 10, 11], \"completion_ids\": [12, 13]}\n",
        )
        .unwrap();
        let records = read_records(&input, &p.tokenizer, p.model.config().vocab_size).unwrap();
        assert_eq!(records.len(), 3);
        let run = |batch: usize| {
            let out = dir.path().join(format!("out-{batch}.jsonl"));
            let mut seen = 0;
            score_records(&p, &records, 1.0, batch, &out, |n| seen += n).unwrap();
            assert_eq!(seen, 3);
            assert!(!out.with_extension("jsonl.partial").exists());
            let text = std::fs::read_to_string(out).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        };
        let one = run(1);
        let lens: Vec<usize> = one
            .iter()
            .map(|l| l["logprobs"].as_array().unwrap().len())
            .collect();
        assert_eq!(lens, [3, 1, 2]);
        for l in &one {
            assert_eq!(
                l["entropy"].as_array().unwrap().len(),
                l["logprobs"].as_array().unwrap().len()
            );
            assert!(l["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|x| x.as_f64().unwrap() <= 0.0));
        }
        // Batched: the same numbers (to f32 rounding).
        for (a, b) in one.iter().zip(run(2)) {
            for (x, y) in a["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(b["logprobs"].as_array().unwrap())
            {
                assert!(
                    (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4,
                    "{x} vs {y}"
                );
            }
        }
        let e =
            score_records(&p, &records, 0.0, 1, &dir.path().join("o.jsonl"), |_| {}).unwrap_err();
        assert!(e.to_string().contains("positive temperature"), "{e}");
        std::fs::write(&input, "\n").unwrap();
        let e = read_records(&input, &p.tokenizer, 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in.jsonl") && e.contains("no records"), "{e}");
    }
}
