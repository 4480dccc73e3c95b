//! `[lora]`: which projections get an adapter, its rank, its scale and its start.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A projection of the decoder block an adapter can target, by its Hugging Face module
/// name (what PEFT's `target_modules` lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// Every target, in the block's order (the adapter's parameter order within a layer).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module's name (`q_proj` …).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj` …).
    pub fn path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// The target named `name` (a module name as PEFT writes it).
    pub fn parse(name: &str) -> Result<Target> {
        Target::ALL
            .into_iter()
            .find(|t| t.module() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "[lora] target_modules: unknown module {name:?}; the decoder's projections are {} (or \"all-linear\" for every one)",
                    Target::ALL.map(Target::module).join(", ")
                ))
            })
    }
}

/// How the adapter's matrices start (PEFT's `init_lora_weights`); B is zero in both,
/// so step 0 is the base model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// A ~ U(−1/√in, 1/√in): PyTorch's Kaiming-uniform with a = √5, PEFT's default.
    #[default]
    Kaiming,
    /// A ~ N(0, 1/r) (PEFT's `"gaussian"`).
    Gaussian,
}

/// `[lora]`: train low-rank adapters ΔW = s·B·A on the targeted projections of a
/// frozen base (its presence in the config turns LoRA on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// The rank r of each adapter: A is (r, in), B is (out, r).
    pub rank: usize,
    /// α in the scale s = α / r (or α / √r with `rslora`).
    pub alpha: f64,
    /// The projections that get an adapter: module names (`q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`, `gate_proj`, `up_proj`, `down_proj`) or `all-linear`.
    pub target_modules: Vec<String>,
    /// Rank-stabilised scaling s = α / √r.
    pub rslora: bool,
    /// How A starts (B starts at zero).
    pub init: LoraInit,
    /// The seed of A's initialisation.
    pub seed: u64,
    /// Start from this PEFT adapter folder (`adapter_config.json`,
    /// `adapter_model.safetensors`) instead of a fresh one; its rank, α, targets and
    /// scaling replace the ones above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            rank: 16,
            alpha: 32.0,
            target_modules: vec!["all-linear".into()],
            rslora: false,
            init: LoraInit::Kaiming,
            seed: 0,
            from: None,
        }
    }
}

/// What an adapter is: rank, α, scaling and targets (from `[lora]` or a PEFT folder).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// Sorted, without repeats.
    pub targets: Vec<Target>,
}

impl LoraSpec {
    /// The scale s of ΔW = s·B·A: α / r, or α / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Checks rank, α and targets; `what` names where they came from in an error.
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.rank == 0 || self.rank > 4096 {
            return Err(Error::invalid(format!(
                "{what} rank = {}: must be between 1 and 4096 (16 is a common choice)",
                self.rank
            )));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::invalid(format!(
                "{what} alpha = {}: must be a positive number (often twice the rank)",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::invalid(format!(
                "{what} target_modules is empty: name at least one projection (or \"all-linear\")"
            )));
        }
        Ok(())
    }
}

/// Module names to targets (`all-linear` = every projection), sorted, repeats refused.
pub fn parse_targets(names: &[String]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for n in names {
        if n == "all-linear" {
            out.extend(Target::ALL);
            continue;
        }
        let t = Target::parse(n)?;
        if out.contains(&t) {
            return Err(Error::invalid(format!(
                "[lora] target_modules names {n:?} twice: list each projection once"
            )));
        }
        out.push(t);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl LoraSection {
    /// The adapter this section asks for (a `from` folder's own spec is read at load).
    pub fn spec(&self) -> Result<LoraSpec> {
        let spec = LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            targets: parse_targets(&self.target_modules)?,
        };
        spec.validate("[lora]")?;
        Ok(spec)
    }

    /// `model` with this section's adapter: the PEFT adapter in `from`, else a fresh one
    /// (step 0 is the base). Trainer, generators and the offline stages all start here,
    /// so they hold the same adapter at version 0.
    pub fn attach(&self, model: crate::Model) -> Result<crate::Model> {
        let adapter = match &self.from {
            Some(dir) => crate::lora::load_peft(
                std::path::Path::new(dir),
                model.config(),
                model.dtype(),
                model.device(),
            )
            .map_err(|e| Error::invalid(format!("[lora] from = {dir:?}: {e}")))?,
            None => crate::lora::Adapter::init(
                model.config(),
                self.spec()?,
                self.init,
                self.seed,
                model.dtype(),
                model.device(),
            )?,
        };
        model.with_adapter(adapter)
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.spec()?;
        if let Some(from) = &self.from {
            if from.trim().is_empty() {
                return Err(Error::invalid(
                    "[lora] from is empty: name a PEFT adapter folder, or leave it out to start a fresh adapter",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_refuse_by_name() {
        let all = parse_targets(&["all-linear".into()]).unwrap();
        assert_eq!(all, Target::ALL.to_vec());
        let some = parse_targets(&["v_proj".into(), "q_proj".into()]).unwrap();
        assert_eq!(some, vec![Target::Q, Target::V]);
        let e = parse_targets(&["qkv_proj".into()]).unwrap_err().to_string();
        assert!(e.contains("qkv_proj") && e.contains("gate_proj"), "{e}");
        let e = parse_targets(&["q_proj".into(), "q_proj".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn scale_is_alpha_over_rank_or_its_root() {
        let mut s = LoraSection::default().spec().unwrap();
        assert_eq!(s.scale(), 2.0);
        s.rslora = true;
        assert_eq!(s.scale(), 8.0);
    }

    #[test]
    fn bad_fields_are_named() {
        for (set, field) in [
            (
                LoraSection {
                    rank: 0,
                    ..Default::default()
                },
                "rank",
            ),
            (
                LoraSection {
                    alpha: -1.0,
                    ..Default::default()
                },
                "alpha",
            ),
            (
                LoraSection {
                    target_modules: vec![],
                    ..Default::default()
                },
                "target_modules",
            ),
            (
                LoraSection {
                    from: Some(" ".into()),
                    ..Default::default()
                },
                "from",
            ),
        ] {
            let e = set.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
