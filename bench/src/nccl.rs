//! `tandem bench nccl` (feature `nccl`): a world-size-1 NCCL broadcast of a model's
//! weight bytes beside a device-to-device copy of the same bytes.
//!
//! World-size-1 NCCL: rank 0 broadcasts to itself, so the figure is NCCL's own cost
//! (launch, protocol, the local copy) on this GPU, next to `cuMemcpyDtoD` of the same
//! bytes. Four shapes: one flat buffer, one call per parameter tensor (the sizes of
//! the model's tensors, as slices of that buffer), the device copy, and the weight
//! broadcast's data plane as it runs (`tandem_weights::nccl`: host bytes staged to the
//! GPU, a non-blocking communicator polled to completion).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
use clap::Args;
use serde_json::json;

use crate::error::{bail, invalid, Context, Error, Result};
use crate::timing::timed;

fn cuda_err(e: impl std::fmt::Debug) -> Error {
    invalid(format!("CUDA: {e:?}"))
}

#[derive(Args)]
pub struct NcclBench {
    /// Model whose parameters give the sizes (total bytes and each tensor's share).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Timed repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Write the JSON here too (it is always printed).
    #[arg(long)]
    json: Option<PathBuf>,
}

fn nccl_err(e: impl std::fmt::Debug) -> Error {
    invalid(format!("NCCL: {e:?}"))
}

/// Median seconds of `f` followed by a stream synchronisation.
fn timed_on(
    stream: &Arc<CudaStream>,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    timed(reps, || {
        f()?;
        stream.synchronize().map_err(cuda_err)?;
        Ok(())
    })
}

/// Runs the benchmark and prints (and with `--json` writes) its figures.
pub fn run(a: NcclBench) -> Result<()> {
    let p = tandem_model::load_model(&a.model)?;
    let device = p.model.device().clone();
    let candle_core::Device::Cuda(cuda) = &device else {
        bail!("tandem bench nccl needs a CUDA device (TANDEM_DEVICE=cuda)");
    };
    let elem = p.model.dtype().size_in_bytes();
    let sizes: Vec<usize> = p
        .model
        .params()
        .vars()
        .iter()
        .map(|v| v.elem_count() * elem)
        .collect();
    let total: usize = sizes.iter().sum();
    drop(p);
    let stream = cuda.cuda_stream();
    let src = stream.alloc_zeros::<u8>(total).map_err(cuda_err)?;
    let mut dst = stream.alloc_zeros::<u8>(total).map_err(cuda_err)?;
    let t = Instant::now();
    let comm =
        Comm::from_rank(stream.clone(), 0, 1, Id::new().map_err(nccl_err)?).map_err(nccl_err)?;
    let init_seconds = t.elapsed().as_secs_f64();

    let flat = timed_on(&stream, a.reps, || {
        comm.broadcast(Some(&src), &mut dst, 0).map_err(nccl_err)?;
        Ok(())
    })?;
    let per_tensor = timed_on(&stream, a.reps, || {
        let mut at = 0;
        for &n in &sizes {
            let s = src.slice(at..at + n);
            let mut d = dst.slice_mut(at..at + n);
            comm.broadcast(Some(&s), &mut d, 0).map_err(nccl_err)?;
            at += n;
        }
        Ok(())
    })?;
    let dtod = timed_on(&stream, a.reps, || {
        stream.memcpy_dtod(&src, &mut dst).map_err(cuda_err)?;
        Ok(())
    })?;
    // The weight broadcast's own path (tandem_weights::nccl): a non-blocking
    // communicator, the host bytes staged to the GPU, the broadcast polled to the end.
    use tandem_weights::collective::Backend;
    let backend = tandem_weights::nccl::NcclBackend::new(&device).map_err(invalid)?;
    let id = backend.new_id().map_err(invalid)?;
    let mut comm = backend.join(&id, 0, 1).map_err(invalid)?;
    let host = vec![7u8; total];
    let deadline = || Instant::now() + std::time::Duration::from_secs(60);
    let plane = timed(a.reps, || comm.send(&host, deadline()).map_err(invalid))?;
    let gbs = |s: f64| total as f64 / s / 1e9;
    let out = json!({
        "model": a.model,
        "cpu": crate::timing::cpu(),
        "bytes": total,
        "tensors": sizes.len(),
        "world_size": 1,
        "comm_init_seconds": init_seconds,
        "broadcast_flat_seconds": flat,
        "broadcast_flat_gb_per_s": gbs(flat),
        "broadcast_per_tensor_seconds": per_tensor,
        "broadcast_per_tensor_gb_per_s": gbs(per_tensor),
        "dtod_copy_seconds": dtod,
        "dtod_copy_gb_per_s": gbs(dtod),
        "broadcast_plane_seconds": plane,
        "broadcast_plane_gb_per_s": gbs(plane),
        "reps": a.reps,
    });
    println!("{out}");
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
