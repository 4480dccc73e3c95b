//! `[trainer] broadcast`: how new versions reach generators beside the gRPC fetch, and
//! the collective backend a process runs for it.

use serde::{Deserialize, Serialize};

use crate::collective::SharedBackend;
use crate::error::{invalid, Result};

/// `[trainer] broadcast`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BroadcastPlane {
    /// Every generator fetches each version over gRPC.
    Off,
    /// The trainer pushes each version to every generator of the broadcast group over
    /// one TCP connection each (acknowledged, checksummed).
    Tcp,
    /// As `tcp` for the header and the acknowledgements, with the bytes sent by one
    /// NCCL broadcast from the trainer's GPU to the generators' (needs a build with
    /// `--features nccl` and CUDA devices; an epoch with a member that cannot join
    /// NCCL goes over TCP).
    Nccl,
}

const NO_NCCL: &str =
    "this build has no NCCL: build it with scripts/build-cuda.sh --nccl, or set broadcast = \"tcp\"";

/// The collective backend `plane` asks for (`None` for "tcp"). A trainer that cannot
/// run it (`strict`) stops with the fix; a generator warns and joins over TCP, which
/// sends its epochs over TCP.
pub fn collective_backend(plane: BroadcastPlane, strict: bool) -> Result<Option<SharedBackend>> {
    if plane != BroadcastPlane::Nccl {
        return Ok(None);
    }
    match nccl_backend() {
        Ok(b) => Ok(Some(b)),
        Err(why) if strict => Err(invalid(format!("[trainer] broadcast = \"nccl\": {why}"))),
        Err(why) => {
            tracing::warn!(
                "[trainer] broadcast = \"nccl\": {why}; this generator receives over TCP"
            );
            Ok(None)
        }
    }
}

/// Why this build cannot run `plane`, if it cannot (checked by `tandem run` before it
/// starts anything).
pub fn unsupported(plane: BroadcastPlane) -> Option<String> {
    (plane == BroadcastPlane::Nccl && !cfg!(feature = "nccl"))
        .then(|| format!("[trainer] broadcast = \"nccl\": {NO_NCCL}"))
}

#[cfg(feature = "nccl")]
fn nccl_backend() -> std::result::Result<SharedBackend, String> {
    let device = tandem_model::process_device().map_err(|e| e.to_string())?;
    Ok(std::sync::Arc::new(crate::nccl::NcclBackend::new(&device)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_backend() -> std::result::Result<SharedBackend, String> {
    Err(NO_NCCL.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_without_the_feature_stops_the_trainer_and_lets_a_generator_use_tcp() {
        assert!(collective_backend(BroadcastPlane::Tcp, true)
            .unwrap()
            .is_none());
        if cfg!(feature = "nccl") {
            return;
        }
        assert!(unsupported(BroadcastPlane::Nccl).is_some());
        let e = collective_backend(BroadcastPlane::Nccl, true)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("scripts/build-cuda.sh --nccl"),
            "{e}"
        );
        assert!(collective_backend(BroadcastPlane::Nccl, false)
            .unwrap()
            .is_none());
    }
}
