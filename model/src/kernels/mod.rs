//! Every `unsafe` line of the crate: the CPU kernels, each beside the safe wrapper that
//! checks what its contract needs.
//!
//! The crate denies `unsafe_code` and allows it on this module alone; the rest of the
//! crate calls the safe wrappers, which take slices and check every length, offset and
//! index the unsafe code relies on once per call, outside the hot loops (an input that
//! breaks them is an error, never a read or a write out of bounds). Every `unsafe fn`
//! states its contract in a `# Safety` section and every `unsafe` block says, in a
//! `SAFETY:` comment, which check makes it hold. Raw-pointer writers are `unsafe fn`s
//! whose contract is that concurrent callers write disjoint blocks: no `&mut` over a
//! shared buffer is handed to two tasks.
//!
//! - [`simd`] — [`simd::Avx2Fma`], the token only the CPU-feature check makes, which
//!   every AVX2 + FMA kernel takes, and e^x eight lanes at a time.
//! - [`gemm`] — the checked strided product, into a borrowed slice or into disjoint
//!   blocks of a buffer parallel tasks share.
//! - [`segment_attention`] — forward and backward of causal attention over packed
//!   segments (training), on `gemm`.
//! - [`paged_attention`] — an engine step's queries over the paged KV cache.
//! - [`packed_matmul`] — x·Wᵀ over weights packed in 16-column panels (engine batches).
//! - [`decode_matmul`] — x·Wᵀ streaming the weights once (1–16 rows, decode steps).

pub(crate) mod decode_matmul;
pub(crate) mod gemm;
pub(crate) mod packed_matmul;
pub(crate) mod paged_attention;
pub(crate) mod segment_attention;
pub mod simd;
