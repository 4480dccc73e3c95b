//! The run config: one TOML file, a section per part, every key optional with a
//! documented default (docs/config.md), unknown keys refused by name. `--set a.b=v`
//! overrides a key from the command line.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tandem_coordinator::config::{CoordinatorConfig, RunSection};
use tandem_data::DataConfig;
use tandem_env::EnvConfig;
use tandem_generator::config::GeneratorConfig;
use tandem_generator::eval::EvalSection;
use tandem_generator::reward::RewardConfig;
use tandem_model::ModelSection;
use tandem_trainer::config::{AlgorithmConfig, OptimizerConfig, TrainerConfig};
use tandem_trainer::rl::advantage::Estimator;

use tandem_launch::config_file::{parse_with_overrides, read_config};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataConfig,
    pub coordinator: CoordinatorConfig,
    pub trainer: TrainerConfig,
    pub generator: GeneratorConfig,
    pub reward: RewardConfig,
    pub eval: EvalSection,
    pub env: EnvConfig,
    pub algorithm: AlgorithmConfig,
    pub optimizer: OptimizerConfig,
    /// `[lora]`: train LoRA adapters on a frozen base (present = on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<tandem_model::LoraSection>,
    /// `[tls]`: TLS / mTLS on every gRPC endpoint.
    pub tls: tandem_proto::tls::TlsFiles,
}

impl RunConfig {
    /// Parses TOML text with `overrides` (`section.key=value`, the value in TOML syntax,
    /// or a bare string) applied, then validates every section.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let cfg: RunConfig = parse_with_overrides(text, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, overrides and validates the config file at `path`.
    pub fn read(path: &std::path::Path, overrides: &[String]) -> Result<Self> {
        let cfg: RunConfig = read_config(path, overrides)?;
        cfg.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.run.validate()?;
        self.model.validate()?;
        self.data.validate()?;
        self.coordinator.validate()?;
        self.trainer.validate()?;
        self.generator.validate()?;
        self.reward.validate_for(
            self.algorithm.teacher.is_some()
                || self.env.service.is_some()
                || !self.env.agent.is_empty(),
        )?;
        self.algorithm.validate()?;
        self.optimizer.validate()?;
        self.eval.validate()?;
        self.env.validate()?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if self.eval.every > 0
            && self.eval.path.is_none()
            && self.data.kind != tandem_data::DataKind::Arithmetic
            && self.data.eval_fraction == 0.0
        {
            bail!(
                "[eval] every: {}",
                tandem_generator::eval::NO_TRAINING_PROMPTS
            );
        }
        if self.eval.every > 0 && !self.env.agent.is_empty() {
            bail!(
                "[eval] every: the held-out evaluation runs the built-in episodes and starts no [env] agent program; set eval.every = 0 (or evaluate with `tandem eval` on a config without the agent)"
            );
        }
        if (self.algorithm.temperature - self.generator.temperature).abs() > 1e-12 {
            bail!(
                "[algorithm] temperature ({}) must equal [generator] temperature ({}): the trainer scores tokens under the distribution they were sampled from",
                self.algorithm.temperature,
                self.generator.temperature
            );
        }
        if matches!(
            self.algorithm.advantage,
            Estimator::Rloo | Estimator::Grpo | Estimator::Drgrpo | Estimator::ReinforcePp
        ) && self.run.group_size < 2
        {
            bail!(
                "[run] group_size: {:?} compares completions of a prompt, so it needs ≥ 2",
                self.algorithm.advantage
            );
        }
        if self.model.path.trim().is_empty() {
            bail!(
                "[model] path: give an HF folder, a .gguf file, a fetchable model ({}) or `preset:tiny`",
                tandem_model::fetch::known_names()
            );
        }
        Ok(())
    }

    /// The config as TOML (what the coordinator hands to workers).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[data] chat_template_kwargs`: read in order, set by `--set`, written back to the
    /// TOML workers receive unchanged; reserved names and dates refused by key.
    #[test]
    fn chat_template_kwargs_are_read_checked_and_handed_on() {
        let text = "[data]\nchat_template_kwargs = { enable_thinking = false, tools = [{ name = \"f\", b = 1 }] }\n";
        let set = "data.chat_template_kwargs.documents=[{ title = \"t\", text = \"x\" }]";
        let c = RunConfig::parse(text, &[set.into()]).unwrap();
        let k = c.data.chat_template_kwargs.as_ref().unwrap();
        let names: Vec<&str> = k.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["enable_thinking", "tools", "documents"]);
        let tool = format!("{:?}", k.0[1].1);
        assert!(
            tool.find("name") < tool.find("\"b\""),
            "a table's keys in order: {tool}"
        );
        assert_eq!(
            RunConfig::parse(&c.to_toml().unwrap(), &[]).unwrap(),
            c,
            "the workers' copy"
        );
        let e = RunConfig::parse("[data]\nchat_template_kwargs = { messages = [] }\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[data] chat_template_kwargs.messages") && e.contains("reserved"),
            "{e}"
        );
        let e = RunConfig::parse(
            "",
            &["data.chat_template_kwargs.add_generation_prompt=true".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("chat_template_kwargs.add_generation_prompt"),
            "{e}"
        );
        let c =
            RunConfig::parse("[data]\nchat_template_kwargs = { day = 2024-01-01 }\n", &[]).unwrap();
        let day = &c.data.chat_template_kwargs.unwrap().0[0].1;
        assert_eq!(
            day,
            &tandem_data::TemplateValue::String("2024-01-01".into())
        );
    }

    #[test]
    fn overrides_and_errors() {
        let c = RunConfig::parse(
            "[run]\nsteps = 3\n",
            &[
                "run.steps=7".into(),
                "model.path=smollm2".into(),
                "generator.temperature=0.7".into(),
                "algorithm.temperature=0.7".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.run.steps, 7);
        assert_eq!(c.model.path, "smollm2");
        let e = RunConfig::parse("[run]\nstep = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
        let e = RunConfig::parse("[generator]\ntemperature = 0.7\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("[algorithm] temperature"), "{e}");
        let e = RunConfig::parse("", &["steps=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("dotted"), "{e}");
        let e = RunConfig::parse("[run]\ngroup_size = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_size"), "{e}");
        let e = RunConfig::parse("[model]\nsave_dtype = \"fp8\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[model] save_dtype") && e.contains("bf16"),
            "{e}"
        );
        let c = RunConfig::parse("", &["model.save_dtype=bf16".into()]).unwrap();
        assert_eq!(c.model.save_dtype.as_deref(), Some("bf16"));
        let agent = "[env]\nagent = [\"python3\", \"agent.py\"]\nmax_turns = 2\n";
        let c = RunConfig::parse(agent, &[]).unwrap();
        assert_eq!(c.env.samples_per_episode(), 2);
        let e = RunConfig::parse(agent, &["eval.every=5".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("[eval] every") && e.contains("agent"), "{e}");
        let defaults = RunConfig::default();
        assert_eq!(
            RunConfig::parse(&defaults.to_toml().unwrap(), &[]).unwrap(),
            defaults
        );
    }
}

/// docs/config.md documents exactly the keys the config accepts, with their defaults.
#[cfg(test)]
mod doc {
    use std::collections::BTreeMap;

    use super::RunConfig;

    fn documented() -> BTreeMap<String, BTreeMap<String, String>> {
        let text = include_str!("../docs/config.md");
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines() {
            if let Some(s) = line
                .strip_prefix("## `[")
                .or_else(|| line.strip_prefix("### `["))
                .and_then(|s| s.strip_suffix("]`"))
            {
                section = s.to_string();
            } else if let Some(row) = line.strip_prefix("| `") {
                let cells: Vec<&str> = row.split(" | ").collect();
                let key = cells[0].trim_end_matches('`').to_string();
                let default = cells[1].trim().trim_matches('`').to_string();
                out.entry(section.clone()).or_default().insert(key, default);
            }
        }
        out
    }

    /// The default config's sections, a nested table (`[env.python]`) as its own.
    fn sections() -> BTreeMap<String, toml::Table> {
        // `[lora]` is off unless present: its keys' defaults are those of an empty one.
        let defaults = toml::Value::try_from(RunConfig {
            lora: Some(Default::default()),
            ..Default::default()
        })
        .unwrap();
        let mut out = BTreeMap::new();
        for (section, table) in defaults.as_table().unwrap() {
            let mut top = toml::Table::new();
            for (k, v) in table.as_table().unwrap() {
                match v {
                    toml::Value::Table(t) => {
                        out.insert(format!("{section}.{k}"), t.clone());
                    }
                    v => {
                        top.insert(k.clone(), v.clone());
                    }
                }
            }
            out.insert(section.clone(), top);
        }
        out
    }

    #[test]
    fn every_key_is_documented_with_its_default() {
        let defaults = sections();
        let doc = documented();
        assert_eq!(
            doc.keys().collect::<Vec<_>>(),
            defaults.keys().collect::<Vec<_>>(),
            "sections in docs/config.md vs the code"
        );
        for (section, table) in &defaults {
            let documented = &doc[section];
            let mut code: Vec<&String> = table.keys().collect();
            code.sort();
            // Optional keys without a default are documented as "unset".
            let mut expected: Vec<&String> = documented
                .keys()
                .filter(|k| documented[*k] != "unset")
                .collect();
            expected.sort();
            assert_eq!(code, expected, "[{section}] keys in code vs docs/config.md");
            for (key, value) in table {
                let shown = match value {
                    toml::Value::String(s) => format!("{s:?}"),
                    other => other.to_string(),
                };
                let doc_value = &documented[key];
                let same = match (doc_value.parse::<f64>(), shown.parse::<f64>()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => doc_value.replace(' ', "") == shown.replace(' ', ""),
                };
                assert!(
                    same,
                    "[{section}] {key}: docs say {doc_value}, code says {shown}"
                );
            }
        }
        // Every "unset" key is accepted when set.
        let mut set = Vec::new();
        for (section, keys) in &doc {
            for (key, v) in keys {
                if v == "unset" {
                    let value = match (section.as_str(), key.as_str()) {
                        ("algorithm", "clip_c") => "3.0".to_string(),
                        ("eval", "max_new_tokens") => "8".to_string(),
                        ("eval", "path") => "\"x.jsonl\"".to_string(),
                        ("model", "save_dtype") => "\"bf16\"".to_string(),
                        ("data", "chat_template_kwargs") => {
                            "{ enable_thinking = false }".to_string()
                        }
                        ("data", "columns") => {
                            "{ prompt = \"question\", answer = \"reward_model.ground_truth\" }"
                                .to_string()
                        }
                        ("env", "service") => "\"127.0.0.1:9\"".to_string(),
                        ("data", "path")
                        | ("data", "system")
                        | ("run", "token")
                        | ("reward", "service")
                        | ("reward", "service_token")
                        | ("env", "service_token")
                        | ("reward", "model")
                        | ("reward", "judge")
                        | ("algorithm", "teacher")
                        | ("tls", "ca")
                        | ("tls", "cert")
                        | ("tls", "key")
                        | ("lora", "from") => "\"x\"".into(),
                        other => panic!("a new optional key {other:?}: add it here"),
                    };
                    set.push(format!("{section}.{key}={value}"));
                }
            }
        }
        let text = "[data]\nkind = \"arithmetic\"\n";
        let c = RunConfig::parse(text, &set).unwrap();
        assert_eq!(c.algorithm.clip_c, Some(3.0));
        assert_eq!(c.run.token.as_deref(), Some("x"));
        assert_eq!(c.lora.unwrap().from.as_deref(), Some("x"));
        assert_eq!(
            c.data.columns.unwrap().answer.as_deref(),
            Some("reward_model.ground_truth")
        );
    }

    /// `[eval] every` on a file dataset needs a held-out set that is not the training
    /// file: `[data] eval_fraction` or `[eval] path`; `[data] columns` reaches the
    /// workers' copy of the config.
    #[test]
    fn a_file_dataset_is_never_evaluated_on_its_training_prompts() {
        let text = "[data]\nkind = \"jsonl\"\npath = \"p.jsonl\"\n[eval]\nevery = 5\n";
        let e = format!("{:#}", RunConfig::parse(text, &[]).unwrap_err());
        assert!(
            e.contains("[eval] every")
                && e.contains("set [data] eval_fraction = 0.05 or [eval] path"),
            "{e}"
        );
        RunConfig::parse(text, &["data.eval_fraction=0.05".into()]).unwrap();
        RunConfig::parse(text, &["eval.path=\"held.jsonl\"".into()]).unwrap();
        RunConfig::parse(text, &["eval.every=0".into()]).unwrap();
        let e = format!(
            "{:#}",
            RunConfig::parse(text, &["data.eval_fraction=1.5".into()]).unwrap_err()
        );
        assert!(e.contains("[data] eval_fraction"), "{e}");
        let c = RunConfig::parse(
            text,
            &[
                "data.eval_fraction=0.1".into(),
                "data.columns={ prompt = \"question\", info = \"extra_info\" }".into(),
            ],
        )
        .unwrap();
        let back = RunConfig::parse(&c.to_toml().unwrap(), &[]).unwrap();
        assert_eq!(back.data, c.data);
        let e = format!(
            "{:#}",
            RunConfig::parse(text, &["data.columns={ question = \"q\" }".into()]).unwrap_err()
        );
        assert!(e.contains("question"), "{e}");
    }
}
