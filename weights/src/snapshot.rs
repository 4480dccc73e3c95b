//! A published policy version as the bytes that travel: the parameters concatenated in
//! the model's stable order, shared by every receiver without a copy.

use tandem_model::Model;

use crate::error::Result;

/// One published policy version.
pub struct Snapshot {
    pub version: u64,
    pub dtype: &'static str,
    /// Shared by every bucket sent (no copy per receiver).
    pub bytes: bytes::Bytes,
    /// The buckets' CRC-32s, computed once (by the learner at publish, else by the
    /// first fetch) for every receiver.
    checksums: std::sync::OnceLock<Vec<u32>>,
}

impl Snapshot {
    pub fn new(version: u64, dtype: &'static str, bytes: bytes::Bytes) -> Self {
        Snapshot {
            version,
            dtype,
            bytes,
            checksums: Default::default(),
        }
    }

    /// `model`'s parameters as version `version`.
    pub fn of(model: &Model, version: u64) -> Result<Self> {
        let (bytes, dtype) = model.params().to_bytes()?;
        Ok(Snapshot::new(version, dtype, bytes.into()))
    }

    /// The CRC-32 of each bucket of `bucket_bytes`, computed on first use.
    pub fn checksums(&self, bucket_bytes: usize) -> &[u32] {
        self.checksums
            .get_or_init(|| crate::bucket::checksums(&self.bytes, bucket_bytes))
    }
}
