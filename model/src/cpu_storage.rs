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

/// The elements of a contiguous CPU tensor, as `T` (a guard-free borrow is impossible
/// across candle's storage lock, so this holds the lock while the slice lives).
pub(crate) fn cpu_slice<'a, T: WithDType>(
    t: &'a candle_core::Tensor,
    op: &str,
) -> candle_core::Result<CpuSlice<'a, T>> {
    let (guard, layout) = t.storage_and_layout();
    let range = match layout.contiguous_offsets() {
        Some(r) => r,
        None => candle_core::bail!("{op}: input must be contiguous"),
    };
    match &*guard {
        candle_core::Storage::Cpu(s) => {
            s.as_slice::<T>()?;
        }
        _ => candle_core::bail!("{op}: CPU tensors only"),
    }
    Ok(CpuSlice {
        guard,
        range,
        _t: std::marker::PhantomData,
    })
}

/// A borrowed CPU storage slice; derefs to `[T]`.
pub(crate) struct CpuSlice<'a, T> {
    guard: candle_core::StorageRef<'a>,
    range: (usize, usize),
    _t: std::marker::PhantomData<T>,
}

impl<T: WithDType> std::ops::Deref for CpuSlice<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &*self.guard {
            candle_core::Storage::Cpu(s) => match s.as_slice::<T>() {
                Ok(data) => &data[self.range.0..self.range.1],
                // Checked when the slice was made.
                Err(_) => &[],
            },
            _ => &[],
        }
    }
}
