//! A prompt as a dataset gives it (text or a conversation, with an optional reference
//! answer), and [`Dataset`]: the configured prompts as a stream indexed from 0.

use serde::{Deserialize, Serialize};

use crate::arithmetic::Arithmetic;
use crate::config::{DataConfig, DataKind};
use crate::error::{invalid, Result};
use crate::file::read_prompts;
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
}

/// A prompt stream indexed from 0.
pub enum Dataset {
    Arithmetic(Arithmetic),
    Rows {
        rows: Vec<Prompt>,
        shuffle: bool,
        seed: u64,
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
                Dataset::Rows {
                    rows: read_prompts(path, cfg.kind == DataKind::Parquet)?,
                    shuffle: cfg.shuffle,
                    seed: cfg.seed,
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
}
