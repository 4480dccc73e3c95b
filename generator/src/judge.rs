//! The LLM judge (`[reward] judge`): a model of its own reads a template filled with the
//! prompt, the completion and the reference answer and answers greedily; the last
//! number of its verdict, scaled, is the score. It runs in the scorer stage, on its own
//! weights, never on the engine's.

use crate::error::Result;
use crate::reward::{last_number, RewardConfig};

/// An LLM judge on the generator (`[reward] judge`).
pub struct Judge {
    model: tandem_model::Pretrained,
    template: String,
    chat: bool,
    max_new_tokens: usize,
    scale: f64,
}

impl Judge {
    /// Loads the judge model (a folder, a .gguf file, a fetchable name or `preset:NAME`)
    /// as `policy` is loaded: on its device, in its dtype (presets are f32).
    pub fn load(cfg: &RewardConfig, policy: &tandem_model::Model) -> Result<Option<Self>> {
        let Some(spec) = &cfg.judge else {
            return Ok(None);
        };
        let model = tandem_model::load(spec, policy.dtype(), policy.device())?;
        Ok(Some(Judge {
            model,
            template: cfg.judge_template.clone(),
            chat: cfg.judge_chat,
            max_new_tokens: cfg.judge_max_new_tokens,
            scale: cfg.judge_scale,
        }))
    }

    /// The judge's prompt for one completion.
    pub fn prompt(&self, prompt: &str, completion: &str, answer: Option<&str>) -> String {
        self.template
            .replace("{prompt}", prompt)
            .replace("{answer}", answer.unwrap_or(""))
            .replace("{completion}", completion)
    }

    /// Scores: the last number of each greedy verdict / scale (0 when it has none).
    pub fn score(
        &self,
        prompt: &str,
        completions: &[String],
        answer: Option<&str>,
    ) -> Result<Vec<f64>> {
        let tok = &self.model.tokenizer;
        let rows = completions
            .iter()
            .map(|c| {
                let text = self.prompt(prompt, c, answer);
                crate::render::prompt_ids(
                    tok,
                    crate::render::PromptInput::Text(&text),
                    self.chat,
                    None,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let params = tandem_model::SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: self.max_new_tokens,
            stop_token_ids: self.model.stop_token_ids(),
            seed: 0,
        };
        let out = tandem_model::generate(&self.model.model, rows, params)?;
        out.iter()
            .map(|c| {
                let verdict = tok.decode(&c.tokens, true)?;
                Ok(verdict_score(&verdict, self.scale))
            })
            .collect()
    }
}

/// The last number of a judge's verdict divided by `scale`; 0 when it holds none.
pub fn verdict_score(verdict: &str, scale: f64) -> f64 {
    last_number(verdict)
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|x| x.is_finite())
        .map_or(0.0, |x| x / scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_verdicts_and_prompts() {
        assert_eq!(verdict_score("Score: 7", 10.0), 0.7);
        assert_eq!(verdict_score("8/10 then 9", 10.0), 0.9);
        assert_eq!(verdict_score("no idea", 10.0), 0.0);
        assert_eq!(verdict_score("-2", 1.0), -2.0);
        let cfg = RewardConfig {
            judge: Some("preset:tiny".into()),
            judge_chat: false,
            judge_template: "Q {prompt} A {completion} R {answer}".into(),
            ..Default::default()
        };
        cfg.validate().unwrap();
        let policy = tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu)
            .unwrap()
            .model;
        let j = Judge::load(&cfg, &policy).unwrap().unwrap();
        assert_eq!(j.prompt("1+1", "2", Some("2")), "Q 1+1 A 2 R 2");
        let c = vec!["2".to_string(), "3".to_string()];
        let a = j.score("1+1", &c, Some("2")).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(
            a,
            j.score("1+1", &c, Some("2")).unwrap(),
            "greedy verdicts repeat"
        );
        // The score is the parsed greedy verdict of the filled-in template.
        let tok = &j.model.tokenizer;
        let ids = crate::render::prompt_ids(
            tok,
            crate::render::PromptInput::Text("Q 1+1 A 3 R 2"),
            false,
            None,
        )
        .unwrap();
        let out = tandem_model::generate(
            &j.model.model,
            vec![ids],
            tandem_model::SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: cfg.judge_max_new_tokens,
                stop_token_ids: j.model.stop_token_ids(),
                seed: 0,
            },
        )
        .unwrap();
        let verdict = tok.decode(&out[0].tokens, true).unwrap();
        assert_eq!(a[1], verdict_score(&verdict, 10.0));
        for (bad, needle) in [
            (
                RewardConfig {
                    judge_template: "no slot".into(),
                    ..cfg.clone()
                },
                "judge_template",
            ),
            (
                RewardConfig {
                    judge_scale: 0.0,
                    ..cfg.clone()
                },
                "judge_scale",
            ),
            (
                RewardConfig {
                    judge_max_new_tokens: 0,
                    ..cfg.clone()
                },
                "judge_max_new_tokens",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
