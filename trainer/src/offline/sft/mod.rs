//! Supervised fine-tuning (instruction tuning): [`data`] turns a record into token ids
//! and the positions the loss trains (the assistant's tokens only), [`loss`] is the
//! negative log-likelihood of those tokens, and the stage `tandem sft` runs it over a
//! dataset.

pub mod data;
pub mod loss;
mod stage;

pub use data::{Example, Masking, Render, Tokenized};
pub use loss::{eval_nll, loss, masked_nll, step, StepMetrics};
pub use stage::{examples, run, run_with, SftConfig, SftSection, Transcript};
