//! Reading candle CPU storages inside custom ops: the one place that turns a
//! storage and its layout into a typed slice.

use candle_core::{CpuStorage, Layout, WithDType};

/// The elements a contiguous `layout` covers in `storage`, as `T`; `op` names the
/// custom op in errors.
pub(crate) fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}
