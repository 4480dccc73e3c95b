//! Where the trainer starts: the run's starting model, or the newest checkpoint with
//! `--resume` (its weights, optimizer state, step, version and buffered groups).

use std::path::{Path, PathBuf};

use candle_core::DType;
use tandem_model::{Model, Pretrained, ScalarHead};

use super::buffer::Buffer;
use super::checkpoint;
use super::learner::{Learner, RunShape};
use super::Settings;
use crate::error::{invalid, Context, Result};
use crate::optimizer::Optimizer;
use crate::rl::advantage::Estimator;

/// The models, the optimizer and where the run stands.
pub(super) struct Start {
    pub policy: Pretrained,
    /// The KL reference: always the run's starting model.
    pub reference: Option<Model>,
    pub teacher: Option<Model>,
    pub critic: Option<ScalarHead>,
    pub opt: Optimizer,
    pub step: u64,
    pub version: u64,
    /// The groups buffered at the checkpoint (empty for a fresh run).
    pub buffer: Buffer,
    /// The checkpoint resumed from (`None`: a fresh run).
    pub resumed: Option<PathBuf>,
    /// The dtype `final/` is saved in.
    pub save_dtype: DType,
}

impl Start {
    /// Loads the policy from the run's model, or from the newest checkpoint when
    /// `resume`; with a checkpoint, its optimizer state and trainer state too, and the
    /// metric lines of the steps after it go (those steps are done again).
    pub fn load(s: &Settings, resume: bool) -> Result<Self> {
        let run_dir = &s.run_dir;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let resumed = if resume {
            Some(checkpoint::latest(run_dir)?.ok_or_else(|| {
                invalid(format!(
                    "--resume: no checkpoint in {}",
                    run_dir.join("checkpoints").display()
                ))
            })?)
        } else {
            None
        };
        let start_path = match &resumed {
            Some(d) => d
                .to_str()
                .ok_or_else(|| invalid(format!("{} is not UTF-8", d.display())))?
                .to_string(),
            None => s.model.clone(),
        };
        if let Some(dir) = &resumed {
            check_lora_matches(s, dir)?;
        }
        let mut start = Start::models(s, &start_path, resumed.as_deref())?;
        if let Some(dir) = &resumed {
            start
                .opt
                .load(dir)
                .with_context(|| format!("optimizer state in {}", dir.display()))?;
            let st = checkpoint::load_state(dir)?;
            tracing::info!(checkpoint = %dir.display(), step = st.step, version = st.version, buffered = st.buffer.len(), "resuming");
            (start.step, start.version, start.buffer) = (st.step, st.version, st.buffer);
            // The checkpoint holds the weights as trained; `final/` keeps the dtype the
            // run's starting model came in (or `[model] save_dtype`).
            if let (None, Some(d)) = (s.save_dtype, st.save_dtype.as_deref()) {
                start.save_dtype = tandem_model::checkpoint::parse_dtype(d).ok_or_else(|| {
                    invalid(format!(
                        "{}: save_dtype {d:?} is not f32, bf16 or f16",
                        dir.join("trainer.json").display()
                    ))
                })?;
            }
            // Steps after the checkpoint are done again; their old lines go.
            truncate_metrics(&run_dir.join("metrics.jsonl"), start.step)?;
            truncate_metrics(&run_dir.join("eval.jsonl"), start.step)?;
            truncate_metrics(&run_dir.join(tandem_report::samples::FILE), start.step)?;
        }
        start.resumed = resumed;
        Ok(start)
    }

    /// The policy (and value head) from `start_path`, the frozen models the algorithm
    /// asks for, and a fresh optimizer; at step 0, version 0. Under `[lora]` the policy
    /// is the run's base with the adapter of the checkpoint `resumed` (else the
    /// section's), and the KL reference is that base itself (no second copy).
    fn models(s: &Settings, start_path: &str, resumed: Option<&Path>) -> Result<Self> {
        let policy = match &s.lora {
            Some(l) => tandem_model::load_policy(&s.model, Some(l), resumed)?,
            None => tandem_model::load_model(start_path)?,
        };
        let reference = crate::rl::kl::reference(&policy.model, &s.model, s.algorithm.kl_coef)?;
        let teacher = match &s.algorithm.teacher {
            Some(path) => Some(crate::rl::distill::load_teacher(path, &policy)?.model),
            None => None,
        };
        // The value head beside what the policy starts from (under `[lora] from`, the
        // adapter's folder).
        let from = s.lora.as_ref().and_then(|l| l.from.as_deref());
        let beside = match (resumed, from) {
            (None, Some(dir)) => Path::new(dir),
            _ => Path::new(start_path),
        };
        let critic = if s.algorithm.advantage == Estimator::Gae {
            Some(ScalarHead::load_or_zeros(
                beside,
                tandem_model::VALUE_HEAD_FILE,
                &policy.model,
            )?)
        } else {
            None
        };
        let extra = critic.as_ref().map(|c| c.named_vars()).unwrap_or_default();
        let opt = Optimizer::new(&s.optimizer, &policy.model, extra)?;
        let save_dtype = s.save_dtype.unwrap_or(policy.trained_dtype());
        Ok(Start {
            policy,
            reference,
            teacher,
            critic,
            opt,
            step: 0,
            version: 0,
            buffer: Buffer::default(),
            resumed: None,
            save_dtype,
        })
    }

    /// The learner that goes on from here (the buffer is the service's by now).
    pub fn into_learner(self, s: &Settings) -> Learner {
        Learner {
            policy: self.policy,
            reference: self.reference,
            teacher: self.teacher,
            critic: self.critic,
            opt: self.opt,
            algorithm: s.algorithm.clone(),
            optimizer: s.optimizer.clone(),
            plan: RunShape {
                steps: s.steps,
                batch_groups: s.batch_groups as usize,
                max_staleness: s.max_staleness,
                run_dir: s.run_dir.clone(),
                dump_batches: s.trainer.dump_batches,
                log_samples: s.log_samples,
                mock_train_ms: s.trainer.mock_train_ms,
                compute: s.trainer.compute(),
            },
            step: self.step,
            version: self.version,
            save_dtype: self.save_dtype,
            base: s.model.clone(),
        }
    }
}

/// A checkpoint holds an adapter exactly when the run trains one: resuming a LoRA
/// checkpoint without `[lora]` (or the reverse) is refused with the fix.
fn check_lora_matches(s: &Settings, dir: &Path) -> Result<()> {
    let has_adapter = dir.join(tandem_model::lora::ADAPTER_CONFIG_FILE).is_file();
    match (has_adapter, s.lora.is_some()) {
        (true, false) => Err(invalid(format!(
            "--resume: {} holds a LoRA adapter, but the config has no [lora]: resume with the run's config (its [lora] section)",
            dir.display()
        ))),
        (false, true) => Err(invalid(format!(
            "--resume: {} holds a full model, but the config has [lora]: resume with the run's config (without [lora]), or start a new run",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Keeps the lines of `metrics.jsonl` up to step `step`.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    tandem_model::write_atomic(
        path,
        kept.join("\n") + if kept.is_empty() { "" } else { "\n" },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(model: &Path, run_dir: &Path, save_dtype: Option<DType>) -> Settings {
        Settings {
            model: model.to_str().unwrap().to_string(),
            run_dir: run_dir.to_path_buf(),
            steps: 1,
            group_size: 2,
            batch_groups: 1,
            max_staleness: 0,
            filter_zero_std: false,
            log_samples: 0,
            tensorboard: false,
            max_completion_tokens: 8,
            samples_per_episode: 1,
            reward_bound: 1e6,
            heartbeat_interval: Duration::from_secs(1),
            trainer: Default::default(),
            algorithm: Default::default(),
            optimizer: Default::default(),
            save_dtype,
            lora: None,
        }
    }

    /// A bf16 starting model trains in the process's dtype (f32 on the CPU): its
    /// checkpoints hold those weights as they are (so `--resume` goes on from exactly
    /// them), and `final/`'s dtype, bf16 as the model came, or `[model] save_dtype`,
    /// survives the resume through `trainer.json`.
    #[test]
    fn checkpoints_keep_the_trained_weights_and_resume_keeps_the_save_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("start");
        let p = tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu).unwrap();
        tandem_model::save_hf(&p, &model, DType::BF16).unwrap();
        for (explicit, want) in [(None, DType::BF16), (Some(DType::F16), DType::F16)] {
            let run_dir = dir.path().join(format!("run-{want:?}"));
            let s = settings(&model, &run_dir, explicit);
            let start = Start::load(&s, false).unwrap();
            assert_eq!(start.save_dtype, want);
            let learner = start.into_learner(&s);
            assert_eq!(learner.policy.model.dtype(), DType::F32);
            let ckpt = checkpoint::save(&run_dir, &learner, &Buffer::default(), 2).unwrap();
            let config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
            assert_eq!(config["torch_dtype"], "float32", "checkpoints are lossless");
            let resumed = Start::load(&s, true).unwrap();
            assert_eq!(resumed.resumed.as_deref(), Some(ckpt.as_path()));
            assert_eq!(resumed.policy.weights_dtype, DType::F32);
            assert_eq!(
                resumed.save_dtype, want,
                "final/ keeps the dtype it came in"
            );
        }
    }

    /// Under `[lora]` the trainer holds the base once (the KL reference is the same
    /// weights), its optimizer holds the adapter alone, a checkpoint holds the adapter
    /// (PEFT's format) and its moments, and `--resume` goes on from exactly them; a
    /// checkpoint of the other kind is refused with the fix.
    #[test]
    fn lora_checkpoints_hold_the_adapter_and_resume_from_it_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("start");
        let p = tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu).unwrap();
        tandem_model::save_hf(&p, &model, DType::F32).unwrap();
        let run_dir = dir.path().join("run");
        let mut s = settings(&model, &run_dir, None);
        s.algorithm.kl_coef = 0.1;
        s.lora = Some(tandem_model::LoraSection {
            rank: 2,
            target_modules: vec!["q_proj".into(), "up_proj".into()],
            ..Default::default()
        });
        let start = Start::load(&s, false).unwrap();
        let adapter = start.policy.model.adapter().expect("an adapter");
        assert_eq!(adapter.params().len(), 2 * 2 * 2);
        assert!(start.reference.as_ref().unwrap().adapter().is_none());
        let learner = start.into_learner(&s);
        // A trained adapter: B moved off zero.
        let mut moved = std::collections::HashMap::new();
        for (n, v) in learner.policy.model.trainable().iter() {
            moved.insert(n.to_string(), (v.as_tensor() + 0.25).unwrap());
        }
        learner.policy.model.trainable().assign(&moved).unwrap();
        let ckpt = checkpoint::save(&run_dir, &learner, &Buffer::default(), 2).unwrap();
        assert!(ckpt.join(tandem_model::lora::ADAPTER_WEIGHTS_FILE).exists());
        assert!(
            !ckpt.join("model.safetensors").exists(),
            "the base is not copied"
        );
        let resumed = Start::load(&s, true).unwrap();
        let (a, b) = (
            learner.policy.model.trainable().snapshot().unwrap(),
            resumed.policy.model.trainable().snapshot().unwrap(),
        );
        for (n, t) in &a {
            let (x, y) = (
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b[n].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(x == y, "{n} differs after the resume");
        }
        // The other kind of checkpoint is refused by name.
        let mut full = settings(&model, &run_dir, None);
        full.lora = None;
        let e = Start::load(&full, true).err().unwrap().to_string();
        assert!(e.contains("LoRA adapter") && e.contains("[lora]"), "{e}");
    }
}
