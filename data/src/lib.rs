//! `tandem-data`: the datasets every stage reads. The coordinator hands out prompts
//! from them; the offline stages (SFT, reward models, DPO, rejection sampling) train on
//! their records. It depends on no other Tandem crate.
//!
//! - [`config`] — the `[data]` section
//! - [`prompt`] — a prompt (text or conversation, reference answer) and [`Dataset`],
//!   the configured prompts as a stream indexed from 0 (a file repeats in a new order
//!   each epoch)
//! - [`arithmetic`] — the built-in synthetic task
//! - [`file`] — JSONL and Parquet records with TRL's fields, checked as they are read;
//!   a record's `info` and its extra fields (the info services and agents read), the
//!   file's own names through `[data] columns`
//! - [`template_kwargs`] — `[data] chat_template_kwargs`, the chat template's extra
//!   variables
//! - [`permutation`] — a keyed random permutation evaluated one position at a time
//!   (each epoch's order of a file, O(1) per prompt)
//! - [`split`] — `[data] eval_fraction`: a file's records held out for evaluation by a
//!   keyed hash of their index, disjoint from the training stream by construction
#![forbid(unsafe_code)]

pub mod arithmetic;
pub mod config;
pub mod error;
pub mod file;
pub mod permutation;
pub mod prompt;
pub mod split;
pub mod template_kwargs;

pub use arithmetic::Arithmetic;
pub use config::{Columns, DataConfig, DataKind, Split};
pub use error::{Error, Result};
pub use file::{read_prompts, read_prompts_with, read_records, read_rows, Row, INFO_BYTES};
pub use prompt::{Dataset, Message, Prompt, PromptBody};
pub use template_kwargs::{TemplateKwargs, TemplateValue};
