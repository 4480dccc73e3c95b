//! A published policy version as the bytes that travel: the trainable parameters
//! concatenated in the model's stable order (every parameter of a full model, or only a
//! LoRA adapter's A and B tensors under `[lora]`), shared by every receiver without a
//! copy, and the base an adapter version applies to.

use tandem_model::Model;

use crate::error::{invalid, Result};

/// One published policy version.
pub struct Snapshot {
    pub version: u64,
    pub dtype: &'static str,
    /// `Some(fingerprint)`: the bytes are a LoRA adapter's A and B tensors (in the
    /// adapter's stable order) for the frozen base of that fingerprint
    /// (`tandem_model::params::ParamStore::fingerprint`); `None`: a full model's
    /// parameters.
    pub base: Option<u64>,
    /// Shared by every bucket sent (no copy per receiver).
    pub bytes: bytes::Bytes,
    /// The buckets' CRC-32s, computed once (by the learner at publish, else by the
    /// first fetch) for every receiver.
    checksums: std::sync::OnceLock<Vec<u32>>,
}

impl Snapshot {
    /// A full model's parameters as version `version` (see [`Snapshot::with_base`] for
    /// an adapter's).
    pub fn new(version: u64, dtype: &'static str, bytes: bytes::Bytes) -> Self {
        Snapshot {
            version,
            dtype,
            base: None,
            bytes,
            checksums: Default::default(),
        }
    }

    /// The same bytes as an adapter of the base `base` (`None`: a full model's).
    pub fn with_base(mut self, base: Option<u64>) -> Self {
        self.base = base;
        self
    }

    /// `model`'s trainable parameters as version `version`: the adapter's A and B with
    /// its base's fingerprint under LoRA, else every parameter.
    pub fn of(model: &Model, version: u64) -> Result<Self> {
        let base = match model.adapter() {
            Some(a) => Some(a.base_fingerprint().ok_or_else(|| {
                invalid(format!(
                    "version {version}: the model's adapter was never attached to a base (no fingerprint)"
                ))
            })?),
            None => None,
        };
        let (bytes, dtype) = model.trainable().to_bytes()?;
        Ok(Snapshot::new(version, dtype, bytes.into()).with_base(base))
    }

    /// The CRC-32 of each bucket of `bucket_bytes`, computed on first use.
    pub fn checksums(&self, bucket_bytes: usize) -> &[u32] {
        self.checksums
            .get_or_init(|| crate::bucket::checksums(&self.bytes, bucket_bytes))
    }
}

/// What a version's bytes are, in words: "a LoRA adapter for base 0x…" or "a full
/// model's parameters".
pub fn describe(base: Option<u64>) -> String {
    match base {
        Some(b) => format!("a LoRA adapter for base {b:#018x}"),
        None => "a full model's parameters".into(),
    }
}

/// A version of one kind offered to a model of another: refused before a byte of it is
/// assigned (see [`check_base`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseMismatch {
    pub version: u64,
    /// The version's base (`None`: a full model's parameters).
    pub sent: Option<u64>,
    /// The receiving model's adapter's base (`None`: it has no adapter).
    pub held: Option<u64>,
}

impl BaseMismatch {
    /// The refusal, naming both sides and the fix; `model` says what the receiver
    /// loaded (its path and dtype), for the operator to compare.
    pub fn message(&self, model: &str) -> String {
        let v = self.version;
        match (self.sent, self.held) {
            (Some(sent), None) => format!(
                "weights v{v} are a LoRA adapter for base {sent:#018x}; this generator's model ({model}) has no adapter: \
                 start every process of the run with the run's config, whose [lora] section the trainer uses"
            ),
            (None, Some(held)) => format!(
                "weights v{v} are a full model's parameters; this generator's model ({model}) carries a LoRA adapter \
                 for base {held:#018x} and takes only adapter versions: start the trainer with the same [lora] section \
                 as the generators (the run's config)"
            ),
            (Some(sent), Some(held)) => format!(
                "weights v{v} are a LoRA adapter for base {sent:#018x}; this generator's base is {held:#018x} ({model}): \
                 start every process of the run with the same [model] path and dtype (TANDEM_DTYPE), so that they load \
                 the same base"
            ),
            (None, None) => format!("weights v{v}: no mismatch"),
        }
    }
}

impl std::fmt::Display for BaseMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message("this member's model"))
    }
}

/// Whether version `version`, of base `sent` (`None`: full), may be assigned to a model
/// whose adapter's base is `held` (`None`: no adapter): only a full version to a model
/// without an adapter, or an adapter version to an adapter on the same base.
pub fn check_base(version: u64, sent: Option<u64>, held: Option<u64>) -> Result<(), BaseMismatch> {
    match sent == held {
        true => Ok(()),
        false => Err(BaseMismatch {
            version,
            sent,
            held,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use tandem_model::preset;

    /// A full model's version carries every parameter and no base; an adapted model's
    /// carries only the adapter's A and B, and its base's fingerprint.
    #[test]
    fn a_snapshot_carries_the_trainable_bytes_and_the_base() {
        let p = preset::init("tiny", 1, &Device::Cpu).unwrap();
        let full = Snapshot::of(&p.model, 3).unwrap();
        assert_eq!(full.base, None);
        assert_eq!(full.bytes.len(), p.model.params().numel() * 4);
        let fingerprint = p.model.params().fingerprint().unwrap();
        let lora = tandem_model::LoraSection {
            rank: 2,
            ..Default::default()
        };
        let adapted = lora.attach(p.model).unwrap();
        let snap = Snapshot::of(&adapted, 4).unwrap();
        assert_eq!(snap.base, Some(fingerprint));
        assert_eq!(snap.bytes.len(), adapted.trainable().numel() * 4);
        assert!(snap.bytes.len() < full.bytes.len() / 4, "adapter bytes");
        assert_eq!(
            snap.bytes.to_vec(),
            adapted.trainable().to_bytes().unwrap().0
        );
    }

    #[test]
    fn each_mismatch_names_both_sides_and_the_fix() {
        assert!(check_base(1, None, None).is_ok());
        assert!(check_base(1, Some(7), Some(7)).is_ok());
        let e = check_base(7, Some(0xab), None)
            .unwrap_err()
            .message("model M, f32");
        assert!(
            e.contains("v7")
                && e.contains("0x00000000000000ab")
                && e.contains("no adapter")
                && e.contains("[lora]"),
            "{e}"
        );
        let e = check_base(7, None, Some(0xcd))
            .unwrap_err()
            .message("model M, f32");
        assert!(
            e.contains("full model") && e.contains("0x00000000000000cd") && e.contains("[lora]"),
            "{e}"
        );
        let e = check_base(7, Some(0xab), Some(0xcd))
            .unwrap_err()
            .message("model M, f32");
        assert!(
            e.contains("0x00000000000000ab")
                && e.contains("0x00000000000000cd")
                && e.contains("model M, f32")
                && e.contains("same [model] path and dtype"),
            "{e}"
        );
    }
}
