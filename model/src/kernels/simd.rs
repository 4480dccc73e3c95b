//! Vector helpers of the inference kernels: whether the CPU has AVX2 + FMA ([`Avx2Fma`],
//! the token every `avx2,fma` kernel is called with), and e^x eight lanes at a time.

/// e^x for eight lanes (Cephes' single-precision exp: x = n·ln2 + r, |r| ≤ ln2/2,
/// e^r by a degree-6 polynomial, 2ⁿ through the exponent bits; relative error about
/// 2e-7). Inputs below −87.3 give about 1e-38 instead of 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_mul_ps(y, pow2)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_in_place_avx2(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let body = xs.len() - xs.len() % 8;
    let (head, tail) = xs.split_at_mut(body);
    for c in head.chunks_exact_mut(8) {
        // SAFETY: `c` holds eight f32, the eight lanes loaded and stored.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
    }
    for x in tail {
        *x = x.exp();
    }
}

/// Proof that this CPU runs AVX2 and FMA: only [`Avx2Fma::detect`] makes one, so code
/// holding one may call the `#[target_feature(enable = "avx2,fma")]` kernels (decode,
/// packed and paged attention kernels, `exp_in_place`).
#[derive(Clone, Copy, Debug)]
pub struct Avx2Fma(());

impl Avx2Fma {
    /// The token when the CPU reports AVX2 and FMA (cached by the standard library).
    pub fn detect() -> Option<Self> {
        avx2_fma().then_some(Avx2Fma(()))
    }
}

/// Whether this CPU runs the AVX2 + FMA kernels; the answer is cached by the standard
/// library.
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// xs[i] ← e^{xs[i]}: eight lanes at a time with AVX2 and FMA (relative error about
/// 2e-7), `f32::exp` otherwise.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(_cpu) = Avx2Fma::detect() {
        // SAFETY: an `Avx2Fma` exists: the CPU reports AVX2 and FMA.
        return unsafe { exp_in_place_avx2(xs) };
    }
    for x in xs {
        *x = x.exp();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut xs: Vec<f32> = (0..32003).map(|i| -80.0 + i as f32 * 0.0026).collect();
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64).exp()).collect();
        exp_in_place(&mut xs);
        let worst = xs
            .iter()
            .zip(&want)
            .map(|(&y, &e)| ((y as f64) - e).abs() / e)
            .fold(0f64, f64::max);
        assert!(worst < 5e-7, "relative error {worst}");
    }
}
