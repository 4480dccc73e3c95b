//! A prompt as a dataset gives it (text or a conversation, with an optional reference
//! answer and info), and [`Dataset`]: the configured prompts as a stream indexed from
//! 0 (with `[data] eval_fraction`, a file's training side or its held-out side).

use serde::{Deserialize, Serialize};

use crate::arithmetic::Arithmetic;
use crate::config::{DataConfig, DataKind, Split};
use crate::error::{invalid, Result};
use crate::file::read_prompts_with;
use crate::permutation::Permutation;

/// One turn of a prompt conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt as the dataset gives it.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptBody {
    Text(String),
    Messages(Vec<Message>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub body: PromptBody,
    /// Reference answer for verifiers.
    pub answer: Option<String>,
    /// The record's info (its `info` object and its extra fields) as the compact JSON
    /// text of one object, at most [`crate::file::INFO_BYTES`]; `None` when it has none.
    /// What reward services, environments and agents read beside the prompt.
    pub info: Option<String>,
}

/// A prompt stream indexed from 0.
pub enum Dataset {
    Arithmetic(Arithmetic),
    Rows {
        /// The records of the side loaded ([`Split`]), in file order.
        rows: Vec<Prompt>,
        shuffle: bool,
        seed: u64,
        /// Records of the file held out for evaluation (0 without a split).
        held_out: usize,
    },
}

impl Dataset {
    /// Builds the configured dataset; a file is read and checked line by line now.
    pub fn load(cfg: &DataConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(match cfg.kind {
            DataKind::Arithmetic => Dataset::Arithmetic(Arithmetic::new(cfg)?),
            DataKind::Jsonl | DataKind::Parquet => {
                let path = cfg.path.as_deref().ok_or_else(|| {
                    invalid("[data] path: required with kind = \"jsonl\" or \"parquet\"")
                })?;
                let all =
                    read_prompts_with(path, cfg.kind == DataKind::Parquet, cfg.columns.as_ref())?;
                let (rows, held_out) = split(all, cfg, path)?;
                Dataset::Rows {
                    rows,
                    shuffle: cfg.shuffle,
                    seed: cfg.seed,
                    held_out,
                }
            }
        })
    }

    /// The prompt at stream position `index` (files wrap around, one epoch per pass).
    pub fn get(&self, index: u64) -> Prompt {
        match self {
            Dataset::Arithmetic(a) => a.get(index),
            Dataset::Rows {
                rows,
                shuffle,
                seed,
                ..
            } => {
                let n = rows.len() as u64;
                let (epoch, pos) = (index / n, (index % n) as usize);
                if !shuffle {
                    return rows[pos].clone();
                }
                // Each epoch its own order, one position at a time: O(1) per lease
                // whatever the file's size.
                let order = Permutation::new(n, seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                rows[order.at(pos as u64) as usize].clone()
            }
        }
    }

    /// Rows in one epoch (None: endless).
    pub fn epoch_len(&self) -> Option<usize> {
        match self {
            Dataset::Arithmetic(_) => None,
            Dataset::Rows { rows, .. } => Some(rows.len()),
        }
    }

    /// Records of the file held out for evaluation by `[data] eval_fraction` (0: no
    /// split), whichever side was loaded.
    pub fn held_out(&self) -> usize {
        match self {
            Dataset::Arithmetic(_) => 0,
            Dataset::Rows { held_out, .. } => *held_out,
        }
    }
}

/// `cfg.split`'s side of `records` under `[data] eval_fraction` ([`crate::split`]) and
/// the number held out; a split that leaves either side empty is refused.
fn split(
    records: Vec<Prompt>,
    cfg: &DataConfig,
    path: &std::path::Path,
) -> Result<(Vec<Prompt>, usize)> {
    let f = cfg.eval_fraction;
    let n = records.len();
    if f <= 0.0 {
        return match cfg.split {
            Split::Train => Ok((records, 0)),
            Split::HeldOut => Err(invalid(
                "[data] eval_fraction is 0: no record of the file is held out; set [data] eval_fraction = 0.05 or [eval] path",
            )),
        };
    }
    let (mut held, mut train) = (Vec::new(), Vec::new());
    for (i, p) in records.into_iter().enumerate() {
        match crate::split::held_out(i as u64, f) {
            true => held.push(p),
            false => train.push(p),
        }
    }
    let file = path.display();
    if held.is_empty() {
        return Err(invalid(format!(
            "[data] eval_fraction = {f} holds out none of the {n} records of {file}; raise it, or set it to 0 and give [eval] path"
        )));
    }
    if train.is_empty() {
        return Err(invalid(format!(
            "[data] eval_fraction = {f} holds out all {n} records of {file}, leaving none to train on; lower it"
        )));
    }
    let held_out = held.len();
    let side = match cfg.split {
        Split::Train => train,
        Split::HeldOut => held,
    };
    Ok((side, held_out))
}
