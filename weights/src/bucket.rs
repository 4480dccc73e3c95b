//! Weight buckets: a policy version's parameters (a full model's, or a LoRA adapter's A
//! and B with the base they apply to), concatenated in the model's stable parameter
//! order, travel as a sequence of checksummed slices. The receiver checks every slice
//! (its limits, version, kind, position, CRC-32) and only a complete, verified sequence
//! becomes new weights.

use bytes::Bytes;

use tandem_proto::limits::{Check, WEIGHT_VERSION_BYTES};
use tandem_proto::v1::WeightBucket;

/// How many buckets `total` bytes make (at least one, even when empty).
pub fn count(total: usize, bucket_bytes: usize) -> usize {
    total.div_ceil(bucket_bytes.max(1)).max(1)
}

/// The CRC-32 of every bucket of `bytes`, in order: computed once per version and
/// shared by every receiver.
pub fn checksums(bytes: &[u8], bucket_bytes: usize) -> Vec<u32> {
    let bucket_bytes = bucket_bytes.max(1);
    (0..count(bytes.len(), bucket_bytes))
        .map(|i| {
            let start = (i * bucket_bytes).min(bytes.len());
            crc32fast::hash(&bytes[start..(start + bucket_bytes).min(bytes.len())])
        })
        .collect()
}

/// Bucket `index` of `bytes` for version `version` (its payload shares `bytes`' memory),
/// an adapter of base `base` when given (`Snapshot::base`); `crc32` is that bucket's
/// entry of [`checksums`].
pub fn bucket(
    version: u64,
    dtype: &str,
    base: Option<u64>,
    bytes: &Bytes,
    bucket_bytes: usize,
    index: usize,
    crc32: u32,
) -> WeightBucket {
    let bucket_bytes = bucket_bytes.max(1);
    let start = (index * bucket_bytes).min(bytes.len());
    let data = bytes.slice(start..(start + bucket_bytes).min(bytes.len()));
    WeightBucket {
        version,
        index: index as u32,
        count: count(bytes.len(), bucket_bytes) as u32,
        offset: start as u64,
        total_bytes: bytes.len() as u64,
        dtype: dtype.to_string(),
        crc32,
        data,
        adapter: base.is_some(),
        base_fingerprint: base.unwrap_or(0),
    }
}

/// The base a bucket's version is an adapter of (`None`: a full model's parameters).
pub fn base_of(b: &WeightBucket) -> Option<u64> {
    b.adapter.then_some(b.base_fingerprint)
}

/// A version assembled from its buckets.
#[derive(Debug)]
pub struct Assembled {
    pub version: u64,
    pub dtype: String,
    /// The base it is an adapter of (`None`: a full model's parameters).
    pub base: Option<u64>,
    /// The verified payloads, in order.
    pub chunks: Vec<Bytes>,
}

/// Reassembles one version; every error names what did not match. Built with
/// [`Assembler::expecting`], it takes only a version of exactly the model's size.
#[derive(Default)]
pub struct Assembler {
    /// The receiving model's parameter count, when known: the first bucket must
    /// announce exactly that many elements of a known dtype.
    expect_elements: Option<u64>,
    /// The verified payloads, in order (they share the received buffers: no copy).
    chunks: Vec<Bytes>,
    received: u64,
    version: u64,
    dtype: String,
    base: Option<u64>,
    count: u32,
    next: u32,
    total: u64,
}

impl Assembler {
    /// The largest concatenation accepted (refuses a bucket header that would allocate
    /// more): `tandem_proto::limits::WEIGHT_VERSION_BYTES`.
    pub const MAX_TOTAL_BYTES: u64 = WEIGHT_VERSION_BYTES;

    /// An assembler for a model of `elements` parameters.
    pub fn expecting(elements: u64) -> Self {
        Assembler {
            expect_elements: Some(elements),
            ..Assembler::default()
        }
    }

    /// Takes the next bucket: checked against its limits, the first bucket's header
    /// (version, count, size, dtype, kind) and its position, and its CRC-32.
    pub fn push(&mut self, b: WeightBucket) -> Result<(), String> {
        b.check()
            .map_err(|e| format!("weights v{} bucket {}/{}: {e}", b.version, b.index, b.count))?;
        if self.next == 0 {
            if b.index != 0 {
                return Err(format!(
                    "weights: first bucket has index {}, expected 0",
                    b.index
                ));
            }
            if b.count == 0
                || b.total_bytes > Self::MAX_TOTAL_BYTES
                || u64::from(b.count) > b.total_bytes.max(1)
            {
                return Err(format!(
                    "weights: bucket header says {} buckets of {} bytes in all",
                    b.count, b.total_bytes
                ));
            }
            if let Some(elements) = self.expect_elements {
                let size = match b.dtype.as_str() {
                    "f32" => 4,
                    "bf16" | "f16" => 2,
                    _ => {
                        return Err(format!(
                            "weights: dtype {:?} is not f32, bf16 or f16",
                            tandem_proto::limits::printable(&b.dtype)
                        ))
                    }
                };
                let want = elements.saturating_mul(size);
                if b.total_bytes != want {
                    return Err(format!(
                        "weights: the buckets announce {} bytes, this model's {elements} parameters in {} are {want}",
                        b.total_bytes, b.dtype
                    ));
                }
            }
            self.version = b.version;
            self.dtype = b.dtype.clone();
            self.base = base_of(&b);
            self.count = b.count;
            self.total = b.total_bytes;
            // Grown as buckets arrive, not reserved from a count a peer sent.
            self.chunks = Vec::with_capacity((b.count as usize).min(1024));
            self.received = 0;
        }
        let at = format!("weights v{} bucket {}/{}", b.version, b.index, b.count);
        if b.version != self.version
            || b.count != self.count
            || b.total_bytes != self.total
            || b.dtype != self.dtype
            || base_of(&b) != self.base
        {
            return Err(format!("{at}: header differs from the first bucket's"));
        }
        if b.index != self.next || b.offset != self.received {
            return Err(format!(
                "{at}: out of order (expected bucket {} at byte {})",
                self.next, self.received
            ));
        }
        if self.received + b.data.len() as u64 > self.total {
            return Err(format!(
                "{at}: more bytes than the announced {}",
                self.total
            ));
        }
        let crc = crc32fast::hash(&b.data);
        if crc != b.crc32 {
            return Err(format!(
                "{at}: checksum {crc:08x} ≠ announced {:08x}",
                b.crc32
            ));
        }
        self.received += b.data.len() as u64;
        self.chunks.push(b.data);
        self.next += 1;
        Ok(())
    }

    /// The version, dtype, kind and the payloads in order, once every bucket has
    /// arrived.
    pub fn finish(self) -> Result<Assembled, String> {
        if self.next == 0 || self.next != self.count || self.received != self.total {
            return Err(format!(
                "weights v{}: stream ended after {} of {} buckets ({} of {} bytes)",
                self.version, self.next, self.count, self.received, self.total
            ));
        }
        Ok(Assembled {
            version: self.version,
            dtype: self.dtype,
            base: self.base,
            chunks: self.chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let bytes: Bytes = (0..1000u32)
            .map(|i| (i * 7) as u8)
            .collect::<Vec<u8>>()
            .into();
        let parts: Vec<WeightBucket> = (0..count(bytes.len(), 300))
            .zip(checksums(&bytes, 300))
            .map(|(i, crc)| bucket(3, "f32", None, &bytes, 300, i, crc))
            .collect();
        assert_eq!(parts.len(), 4);
        let mut a = Assembler::default();
        for p in parts.clone() {
            a.push(p).unwrap();
        }
        let done = a.finish().unwrap();
        assert_eq!(
            (done.version, done.dtype.as_str(), done.base),
            (3, "f32", None)
        );
        assert_eq!(done.chunks.concat(), bytes.to_vec());

        let mut bad = parts.clone();
        let mut corrupt = bad[2].data.to_vec();
        corrupt[5] ^= 1;
        bad[2].data = corrupt.into();
        let mut a = Assembler::default();
        let e = bad
            .into_iter()
            .map(|p| a.push(p))
            .find_map(|r| r.err())
            .unwrap();
        assert!(e.contains("bucket 2/4") && e.contains("checksum"), "{e}");

        let mut a = Assembler::default();
        a.push(parts[0].clone()).unwrap();
        assert!(a
            .push(parts[2].clone())
            .unwrap_err()
            .contains("out of order"));
        let mut a = Assembler::default();
        a.push(parts[0].clone()).unwrap();
        assert!(a.finish().unwrap_err().contains("1 of 4"));

        // For a model of 250 parameters: exactly 1000 bytes of f32.
        let mut a = Assembler::expecting(250);
        for p in parts.clone() {
            a.push(p).unwrap();
        }
        assert!(a.finish().is_ok());
        let e = Assembler::expecting(100)
            .push(parts[0].clone())
            .unwrap_err();
        assert!(
            e.contains("announce 1000 bytes") && e.contains("are 400"),
            "{e}"
        );
        let huge = WeightBucket {
            total_bytes: 1 << 40,
            count: u32::MAX,
            ..parts[0].clone()
        };
        assert!(Assembler::expecting(250).push(huge.clone()).is_err());
        assert!(Assembler::default().push(huge).is_err());
        let odd = WeightBucket {
            dtype: "f64".into(),
            ..parts[0].clone()
        };
        assert!(Assembler::expecting(250)
            .push(odd)
            .unwrap_err()
            .contains("\"f64\" is not"));
    }

    /// An adapter version's buckets keep its kind and base end to end; a bucket that
    /// changes them mid-version, or names a base without being an adapter's, is refused.
    #[test]
    fn an_adapter_version_keeps_its_base_and_may_not_change_it() {
        let bytes: Bytes = (0..1000u32).map(|i| i as u8).collect::<Vec<u8>>().into();
        let base = Some(0x1234_5678_9abc_def0);
        let parts: Vec<WeightBucket> = (0..count(bytes.len(), 300))
            .zip(checksums(&bytes, 300))
            .map(|(i, crc)| bucket(9, "f32", base, &bytes, 300, i, crc))
            .collect();
        assert!(parts.iter().all(|p| p.adapter && base_of(p) == base));
        let mut a = Assembler::expecting(250);
        for p in parts.clone() {
            a.push(p).unwrap();
        }
        let done = a.finish().unwrap();
        assert_eq!((done.version, done.base), (9, base));
        assert_eq!(done.chunks.concat(), bytes.to_vec());

        for (i, forged) in [
            WeightBucket {
                base_fingerprint: 1,
                ..parts[1].clone()
            },
            WeightBucket {
                adapter: false,
                base_fingerprint: 0,
                ..parts[1].clone()
            },
        ]
        .into_iter()
        .enumerate()
        {
            let mut a = Assembler::expecting(250);
            a.push(parts[0].clone()).unwrap();
            let e = a.push(forged).unwrap_err();
            assert!(e.contains("header differs"), "{i}: {e}");
        }
        let e = Assembler::expecting(250)
            .push(WeightBucket {
                adapter: false,
                ..parts[0].clone()
            })
            .unwrap_err();
        assert!(e.contains("base_fingerprint"), "{e}");
    }
}
