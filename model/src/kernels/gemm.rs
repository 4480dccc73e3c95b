//! The strided matrix product of the segment-attention kernels
//! ([`super::segment_attention`]), on the `gemm` crate candle itself uses, with every
//! index checked once per call:
//!
//!   dst (m × n) = (dst if `accumulate`) + alpha · A (m × k) · B (k × n)
//!
//! A and B are strided views into slices ([`Mat`]). dst is rows of a slice borrowed
//! exclusively ([`gemm`]) or a block of a buffer that parallel tasks share
//! ([`Blocks`], whose one accessor is an `unsafe fn` naming the disjointness it relies
//! on; no task ever holds a reference to the whole buffer). Before the product runs,
//! the last element of every view is computed with checked arithmetic and compared with
//! its buffer's length: a shape or offset that a crafted input produces is an error,
//! never a read or a write out of bounds.

use std::marker::PhantomData;

use crate::ops::Elem;

/// A strided matrix view into `data`: element (i, j) at `data[offset + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    offset: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major rows of `ld` elements starting at `data[offset]`.
    pub fn rows(data: &'a [T], offset: usize, ld: usize) -> Self {
        Mat {
            data,
            offset,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of [`Mat::rows`]: element (i, j) is row j, column i.
    pub fn cols(data: &'a [T], offset: usize, ld: usize) -> Self {
        Mat {
            data,
            offset,
            rs: 1,
            cs: ld,
        }
    }

    /// A pointer to element (0, 0) and the strides as `isize`, once the whole
    /// `rows × cols` block (both at least 1) is known to lie inside `data`.
    fn checked(
        &self,
        rows: usize,
        cols: usize,
        what: &str,
    ) -> candle_core::Result<(*const T, isize, isize)> {
        let (rs, cs) = check_block(
            self.data.len(),
            self.offset,
            (self.rs, self.cs),
            (rows, cols),
            what,
        )?;
        // `offset` is at most the block's last index, which is below the length.
        Ok((self.data[self.offset..].as_ptr(), rs, cs))
    }
}

/// Checks that the `rows × cols` block (both at least 1) with element (i, j) at
/// `offset + i·rs + j·cs` lies inside a buffer of `len`: its last index
/// `offset + (rows − 1)·rs + (cols − 1)·cs`, computed with checked arithmetic, is below
/// `len` (every other index is smaller, the strides being non-negative), and both strides
/// fit in `isize`. Returns the strides as `isize`.
fn check_block(
    len: usize,
    offset: usize,
    (rs, cs): (usize, usize),
    (rows, cols): (usize, usize),
    what: &str,
) -> candle_core::Result<(isize, isize)> {
    let last = (rows - 1)
        .checked_mul(rs)
        .zip((cols - 1).checked_mul(cs))
        .and_then(|(r, c)| r.checked_add(c))
        .and_then(|x| x.checked_add(offset));
    match (last, isize::try_from(rs), isize::try_from(cs)) {
        (Some(last), Ok(rs), Ok(cs)) if last < len => Ok((rs, cs)),
        _ => candle_core::bail!(
            "gemm: {what} ({rows} × {cols} from offset {offset}, strides {rs} and {cs}) \
             does not lie inside its buffer of {len} elements; the shapes or offsets \
             passed to the kernel are inconsistent"
        ),
    }
}

/// dst (m × n, row-major rows of `dst_ld` from `dst[dst_offset]`) = (dst if
/// `accumulate`) + alpha · A (m × k) · B (k × n), on the calling thread. An error, and
/// nothing written, when a view does not lie inside its buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Elem>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    dst_offset: usize,
    dst_ld: usize,
    a: Mat<T>,
    b: Mat<T>,
    alpha: T,
    accumulate: bool,
) -> candle_core::Result<()> {
    let (ptr, len) = (dst.as_mut_ptr(), dst.len());
    // SAFETY: `dst` is borrowed exclusively for the call: `ptr` is valid for reads and
    // writes of `len` elements and nothing else reads or writes them meanwhile; A and B
    // borrow their buffers shared, so the borrow checker keeps them off `dst`.
    unsafe {
        gemm_raw(
            dims,
            (ptr, len),
            dst_offset,
            dst_ld,
            a,
            b,
            alpha,
            accumulate,
        )
    }
}

/// [`gemm`] into a raw destination of `len` elements at `dst`; the block is checked
/// against `len` first (and must not have rows that overlap: `dst_ld ≥ n` when m > 1).
///
/// # Safety
/// `dst` must be valid for reads and writes of `len` elements (one allocation), and
/// while the call runs nothing else may read or write the elements of the block it
/// writes, `dst_offset + i·dst_ld + j` for i < m, j < n (A's and B's buffers included).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: Elem>(
    (m, n, k): (usize, usize, usize),
    (dst, len): (*mut T, usize),
    dst_offset: usize,
    dst_ld: usize,
    a: Mat<T>,
    b: Mat<T>,
    alpha: T,
    accumulate: bool,
) -> candle_core::Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (dst_rs, _) = check_block(len, dst_offset, (dst_ld, 1), (m, n), "dst")?;
    if m > 1 && dst_ld < n {
        candle_core::bail!(
            "gemm: dst rows of {n} elements overlap at a leading dimension of {dst_ld}"
        )
    }
    // SAFETY: `dst_offset` is at most the block's last index, below `len` (checked).
    let d = unsafe { dst.add(dst_offset) };
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of the block, n elements from i·dst_ld, lies inside the
                // checked block, which the caller lets this call alone touch.
                unsafe { std::slice::from_raw_parts_mut(d.add(i * dst_ld), n) }.fill(T::zero());
            }
        }
        return Ok(());
    }
    let (ap, a_rs, a_cs) = a.checked(m, k, "A")?;
    let (bp, b_rs, b_cs) = b.checked(k, n, "B")?;
    // SAFETY: every element gemm reads of A (m × k) and B (k × n) and reads or writes of
    // dst (m × n) lies inside its buffer (checked above); A and B are shared borrows that
    // the caller keeps off the dst block, and no one else touches the block meanwhile.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            d,
            1,
            dst_rs,
            accumulate,
            ap,
            a_cs,
            a_rs,
            bp,
            b_cs,
            b_rs,
            T::one(),
            alpha,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        )
    };
    Ok(())
}

/// An output buffer that parallel tasks write in disjoint blocks: it holds the buffer's
/// exclusive borrow for `'a` and hands out no reference to it; its one accessor,
/// [`Blocks::gemm`], writes a block whose disjointness from every concurrent call's the
/// caller guarantees.
pub(crate) struct Blocks<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: PhantomData<&'a mut [T]>,
}

// SAFETY: a `Blocks` is an exclusive borrow of `[T]` (Send when T is) that only
// `Blocks::gemm` writes through.
unsafe impl<T: Send> Send for Blocks<'_, T> {}
// SAFETY: shared across threads, a `Blocks` is written only by `Blocks::gemm`, whose
// contract makes concurrent calls touch disjoint elements (T: Send, as each element is
// written from one thread at a time).
unsafe impl<T: Send> Sync for Blocks<'_, T> {}

impl<'a, T: Elem> Blocks<'a, T> {
    pub fn new(buf: &'a mut [T]) -> Self {
        Blocks {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// [`gemm`] into the block `dst_offset + i·dst_ld + j` (i < m, j < n) of the buffer;
    /// an error, and nothing written, when the block or a view does not lie inside its
    /// buffer.
    ///
    /// # Safety
    /// No other call may read or write an element of this block while this one runs:
    /// the blocks of concurrent calls are disjoint.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        dims: (usize, usize, usize),
        dst_offset: usize,
        dst_ld: usize,
        a: Mat<T>,
        b: Mat<T>,
        alpha: T,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        // SAFETY: `ptr` and `len` come from the `&'a mut [T]` this value holds, so they
        // are valid for reads and writes while it lives and no reference to the buffer
        // exists outside it (A and B included); the caller makes the block disjoint from
        // every concurrent call's.
        unsafe {
            gemm_raw(
                dims,
                (self.ptr, self.len),
                dst_offset,
                dst_ld,
                a,
                b,
                alpha,
                accumulate,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 × 3 times 3 × 2 product, plain and accumulated, against the formula.
    #[test]
    fn multiplies_strided_views() {
        let a = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0f64, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut dst = vec![9.0f64; 6];
        gemm(
            (2, 2, 3),
            &mut dst,
            1,
            3,
            Mat::rows(&a, 0, 3),
            Mat::rows(&b, 0, 2),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(dst, [9.0, 4.0, 5.0, 9.0, 10.0, 11.0]);
        // Accumulated with alpha 2: dst = 1 + 2 · A·B.
        let mut acc = vec![1.0f64; 4];
        gemm(
            (2, 2, 3),
            &mut acc,
            0,
            2,
            Mat::rows(&a, 0, 3),
            Mat::rows(&b, 0, 2),
            2.0,
            true,
        )
        .unwrap();
        assert_eq!(acc, [9.0, 11.0, 21.0, 23.0]);
        let mut t = vec![0.0f64; 4];
        // (Aᵀ)ᵀ = A read through its transpose view of a 3 × 2 layout.
        let at = [1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0];
        gemm(
            (2, 2, 3),
            &mut t,
            0,
            2,
            Mat::cols(&at, 0, 2),
            Mat::rows(&b, 0, 2),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(t, [4.0, 5.0, 10.0, 11.0]);
    }

    /// A refused product: what is wrong, (m, n, k), dst offset and leading dimension, A, B.
    type Case<'a> = (
        &'a str,
        (usize, usize, usize),
        usize,
        usize,
        Mat<'a, f32>,
        Mat<'a, f32>,
    );

    /// Views past their buffers, strides or offsets whose products overflow, and
    /// overlapping dst rows are errors, and dst is left untouched.
    #[test]
    fn refuses_views_outside_their_buffers() {
        let a = [1.0f32; 6];
        let b = [1.0f32; 6];
        let huge = usize::MAX / 2 + 1;
        let cases: [Case; 8] = [
            (
                "dst past its end",
                (2, 2, 3),
                3,
                2,
                Mat::rows(&a, 0, 3),
                Mat::rows(&b, 0, 2),
            ),
            (
                "dst offset near usize::MAX",
                (1, 1, 1),
                usize::MAX,
                1,
                Mat::rows(&a, 0, 1),
                Mat::rows(&b, 0, 1),
            ),
            (
                "dst stride overflows",
                (3, 2, 1),
                0,
                huge,
                Mat::rows(&a, 0, 1),
                Mat::rows(&b, 0, 2),
            ),
            (
                "dst rows overlap",
                (2, 2, 1),
                0,
                1,
                Mat::rows(&a, 0, 1),
                Mat::rows(&b, 0, 2),
            ),
            (
                "A past its end",
                (2, 2, 3),
                0,
                2,
                Mat::rows(&a, 1, 3),
                Mat::rows(&b, 0, 2),
            ),
            (
                "A stride overflows",
                (2, 2, 3),
                0,
                2,
                Mat::cols(&a, 0, huge),
                Mat::rows(&b, 0, 2),
            ),
            (
                "B offset near usize::MAX",
                (2, 2, 3),
                0,
                2,
                Mat::rows(&a, 0, 3),
                Mat::rows(&b, usize::MAX - 1, 2),
            ),
            (
                "B stride past isize::MAX",
                (2, 1, 1),
                0,
                1,
                Mat::rows(&a, 0, 1),
                Mat::rows(&b, 0, huge),
            ),
        ];
        for (what, dims, off, ld, am, bm) in cases {
            let mut dst = vec![7.0f32; 4];
            let r = gemm(dims, &mut dst, off, ld, am, bm, 1.0, false);
            assert!(r.is_err(), "{what}: accepted");
            assert_eq!(dst, [7.0; 4], "{what}: dst written");
        }
    }

    /// Zero rows, columns or depth: nothing to read; k = 0 zero-fills dst unless it
    /// accumulates.
    #[test]
    fn empty_products() {
        let a = [1.0f32; 4];
        let mut dst = vec![3.0f32; 4];
        gemm(
            (0, 2, 2),
            &mut dst,
            0,
            2,
            Mat::rows(&a, 0, 2),
            Mat::rows(&a, 0, 2),
            1.0,
            false,
        )
        .unwrap();
        gemm(
            (2, 0, 2),
            &mut dst,
            0,
            2,
            Mat::rows(&a, 0, 2),
            Mat::rows(&a, 0, 2),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(dst, [3.0; 4]);
        let empty: [f32; 0] = [];
        gemm(
            (2, 2, 0),
            &mut dst,
            0,
            2,
            Mat::rows(&empty, 0, 0),
            Mat::rows(&empty, 0, 2),
            1.0,
            true,
        )
        .unwrap();
        assert_eq!(dst, [3.0; 4]);
        gemm(
            (2, 2, 0),
            &mut dst,
            0,
            2,
            Mat::rows(&empty, 0, 0),
            Mat::rows(&empty, 0, 2),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(dst, [0.0; 4]);
    }
}
