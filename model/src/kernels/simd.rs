//! Which vector kernels this CPU runs ([`Isa`], picked once at start-up: AVX-512F,
//! AVX2 + FMA, or the portable code), the tokens the `target_feature` kernels are
//! called with ([`Avx2Fma`], [`Avx512`]: only the CPU-feature check makes them), and
//! e^x eight lanes at a time.

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
    /// The token when [`isa`] chose AVX2 + FMA or better (it never chooses above what
    /// the CPU reports: [`Isa::best`]).
    pub fn detect() -> Option<Self> {
        (isa() >= Isa::Avx2Fma).then_some(Avx2Fma(()))
    }
}

/// Proof that this CPU runs AVX-512F (with AVX2 and FMA): only [`Avx512::detect`] makes
/// one, so code holding one may call the `#[target_feature(enable = "avx512f")]`
/// kernels (the packed and decode matmuls' 16-lane builds).
#[derive(Clone, Copy, Debug)]
pub struct Avx512(());

impl Avx512 {
    /// The token when [`isa`] chose AVX-512 (the CPU reports AVX-512F, AVX2 and FMA and
    /// `TANDEM_CPU_KERNELS` does not ask for less).
    pub fn detect() -> Option<Self> {
        (isa() == Isa::Avx512).then_some(Avx512(()))
    }
}

/// The kernel build a call runs, with the token that proves the CPU runs it.
#[derive(Clone, Copy, Debug)]
pub enum Simd {
    Portable,
    Avx2(Avx2Fma),
    Avx512(Avx512),
}

impl Simd {
    /// The build [`isa`] chose.
    pub fn detect() -> Simd {
        match (Avx512::detect(), Avx2Fma::detect()) {
            (Some(t), _) => Simd::Avx512(t),
            (None, Some(t)) => Simd::Avx2(t),
            (None, None) => Simd::Portable,
        }
    }

    /// Every build this CPU runs, whatever [`isa`] chose: what the tests compare.
    pub fn available() -> Vec<Simd> {
        let mut out = vec![Simd::Portable];
        let best = Isa::best();
        if best >= Isa::Avx2Fma {
            out.push(Simd::Avx2(Avx2Fma(())));
        }
        if best >= Isa::Avx512 {
            out.push(Simd::Avx512(Avx512(())));
        }
        out
    }

    /// Its kind.
    pub fn isa(self) -> Isa {
        match self {
            Simd::Portable => Isa::Portable,
            Simd::Avx2(_) => Isa::Avx2Fma,
            Simd::Avx512(_) => Isa::Avx512,
        }
    }
}

/// The kernels a CPU runs, best first: each kernel has a build per kind it gains from,
/// and is tested against the portable build wherever the CPU runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust (any CPU).
    Portable,
    /// 8-lane f32 kernels (x86-64 with AVX2 and FMA: Haswell and Zen on).
    Avx2Fma,
    /// 16-lane f32 kernels (AVX-512F: Skylake-SP and Zen 4 on).
    Avx512,
}

impl Isa {
    /// The name logs, bench JSON and `TANDEM_CPU_KERNELS` use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The best kind this CPU runs.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma_reported() {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    /// The kind asked for by `value` (`TANDEM_CPU_KERNELS`): `portable`, `avx2` or
    /// `avx512`, at most `best`; an error naming the variable and the choices
    /// otherwise.
    pub fn choose(value: &str, best: Isa) -> Result<Isa, String> {
        let asked = match value.trim() {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2Fma,
            "avx512" => Isa::Avx512,
            other => {
                return Err(format!(
                    "TANDEM_CPU_KERNELS={other:?}: one of portable, avx2, avx512"
                ))
            }
        };
        if asked > best {
            return Err(format!(
                "TANDEM_CPU_KERNELS={}: this CPU runs at most {}",
                asked.name(),
                best.name()
            ));
        }
        Ok(asked)
    }
}

/// The kernels in use, chosen once: [`Isa::best`], or the lower kind
/// `TANDEM_CPU_KERNELS` names (to measure or test one build on a CPU that runs a
/// better one; a kind the CPU lacks or a misspelling is logged and ignored). Logged
/// once with the CPU's name.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let best = Isa::best();
        let chosen = match std::env::var("TANDEM_CPU_KERNELS") {
            Ok(v) => Isa::choose(&v, best).unwrap_or_else(|why| {
                tracing::warn!("{why}; using {}", best.name());
                best
            }),
            Err(_) => best,
        };
        tracing::info!(
            kernels = chosen.name(),
            cpu = %cpu_model(),
            "CPU kernels: {} (the best this CPU runs: {})",
            chosen.name(),
            best.name()
        );
        chosen
    })
}

/// The CPU's model name (`/proc/cpuinfo`'s first `model name`), or `unknown`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The flags of `/proc/cpuinfo` the kernels care about that this CPU reports, in a
/// fixed order (empty where there is no `/proc/cpuinfo`): what bench JSON records
/// beside [`isa`].
pub fn cpu_features() -> Vec<&'static str> {
    const WATCHED: [&str; 11] = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
    ];
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: std::collections::HashSet<&str> = text
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().collect())
        .unwrap_or_default();
    WATCHED.into_iter().filter(|f| flags.contains(f)).collect()
}

/// Whether the CPU reports AVX2 and FMA; the answer is cached by the standard library.
fn avx2_fma_reported() -> bool {
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
    fn a_kind_is_chosen_by_name_and_never_above_the_cpu() {
        assert_eq!(Isa::choose("avx2", Isa::Avx512), Ok(Isa::Avx2Fma));
        assert_eq!(Isa::choose(" portable ", Isa::Avx2Fma), Ok(Isa::Portable));
        assert_eq!(Isa::choose("avx512", Isa::Avx512), Ok(Isa::Avx512));
        let above = Isa::choose("avx512", Isa::Avx2Fma).unwrap_err();
        assert!(above.contains("at most avx2"), "{above}");
        let typo = Isa::choose("avx-512", Isa::Avx512).unwrap_err();
        assert!(
            typo.contains("TANDEM_CPU_KERNELS") && typo.contains("portable, avx2, avx512"),
            "{typo}"
        );
        // The tokens follow the choice.
        assert_eq!(Avx512::detect().is_some(), isa() == Isa::Avx512);
        assert_eq!(Avx2Fma::detect().is_some(), isa() >= Isa::Avx2Fma);
        assert!(isa() <= Isa::best());
    }

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
