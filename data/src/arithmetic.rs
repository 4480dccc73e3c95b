//! The built-in synthetic task: arithmetic on numbers of a given number of digits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::DataConfig;
use crate::error::Result;
use crate::prompt::{Prompt, PromptBody};

/// Synthetic arithmetic: prompt i is drawn from a stream seeded by (seed, i), so the
/// same index always gives the same problem, whichever generator asks.
pub struct Arithmetic {
    digits: u32,
    operators: Vec<String>,
    template: String,
    seed: u64,
}

impl Arithmetic {
    /// The task `cfg` describes (its `digits`, `operators`, `template` and `seed`).
    pub fn new(cfg: &DataConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Arithmetic {
            digits: cfg.digits,
            operators: cfg.operators.clone(),
            template: cfg.template.clone(),
            seed: cfg.seed,
        })
    }

    /// Prompt `index` as a text prompt with its answer.
    pub fn get(&self, index: u64) -> Prompt {
        let (question, answer) = self.draw(index);
        Prompt {
            body: PromptBody::Text(self.template.replace("{question}", &question)),
            answer: Some(answer),
            info: None,
        }
    }

    /// The first `n` (prompt text, answer) pairs: what the offline stages train on.
    pub fn pairs(&self, n: usize) -> Vec<(String, String)> {
        self.problems(n)
            .into_iter()
            .map(|(_, prompt, answer)| (prompt, answer))
            .collect()
    }

    /// The first `n` problems as (question "a op b", prompt text, answer): the same
    /// draws as [`Arithmetic::pairs`], with the bare question (tool-use transcripts).
    pub fn problems(&self, n: usize) -> Vec<(String, String, String)> {
        (0..n as u64)
            .map(|i| {
                let (question, answer) = self.draw(i);
                let prompt = self.template.replace("{question}", &question);
                (question, prompt, answer)
            })
            .collect()
    }

    /// Operands uniform over the numbers with `digits` digits (0..=9 for one digit);
    /// for "-" the larger comes first, so answers are never negative.
    fn draw(&self, index: u64) -> (String, String) {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ index);
        let lo = if self.digits == 1 {
            0
        } else {
            10i64.pow(self.digits - 1)
        };
        let hi = 10i64.pow(self.digits) - 1;
        let mut a = rng.random_range(lo..=hi);
        let mut b = rng.random_range(lo..=hi);
        let op = &self.operators[rng.random_range(0..self.operators.len())];
        let answer = match op.as_str() {
            "+" => a + b,
            "-" => {
                if a < b {
                    std::mem::swap(&mut a, &mut b);
                }
                a - b
            }
            _ => a * b,
        };
        (format!("{a} {op} {b}"), answer.to_string())
    }
}
