//! Elementwise math of the engine's f32 path, written so that LLVM vectorises it: no
//! branches, polynomial `exp` and `erf` instead of libm calls, fixed-width accumulators
//! for sums. The activation and exp kernels are compiled twice, for the baseline CPU and
//! for AVX2 + FMA, and picked at run time. The activations are millions of values per
//! prompt, and libm's scalar `erff`/`expf` alone cost a tenth of a second there.

use crate::model::config::Activation;

/// ln 2 split in two so that `x − n·ln 2` is exact for the `n` an f32 `exp` needs
/// (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding it rounds an f32 of magnitude < 2²² to an integer, kept in the
/// low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;

/// `eˣ` to about 2 ulp (Cephes `expf`), flushed to ~1e-38 below −87 and capped at e⁸⁸.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2ⁿ: n + 127 in the exponent bits (n sits in t's low mantissa bits).
    let biased = t
        .to_bits()
        .wrapping_sub(ROUNDER.to_bits())
        .wrapping_add(127);
    er * f32::from_bits(biased << 23)
}

/// erf(x) to a few ulp: Eigen's rational approximation on [−4, 4] (erf is ±1 in f32
/// beyond).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// `(f(x), f'(x))` for an activation function.
#[inline(always)]
fn activation_and_slope(kind: Activation, x: f32) -> (f32, f32) {
    match kind {
        Activation::GeluErf => {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            // 1/√(2π)
            let pdf = exp(-0.5 * x * x) * 0.398_942_3;
            (x * cdf, cdf + x * pdf)
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // √(2/π)
            const A: f32 = 0.044_715;
            // With E = e^{2y}, t = tanh y: (1 + t)/2 = E/(E + 1) and 1 − t² = 4E/(E + 1)²,
            // which keep their precision where t is near −1 (exp is capped: no overflow).
            let e = exp(2.0 * C * (x + A * x * x * x));
            let r = 1.0 / (e + 1.0);
            let half_one_plus_t = e * r;
            let one_minus_t2 = 4.0 * half_one_plus_t * r;
            let value = x * half_one_plus_t;
            let slope = half_one_plus_t + 0.5 * x * one_minus_t2 * C * (1.0 + 3.0 * A * x * x);
            (value, slope)
        }
        Activation::Relu => {
            let on = if x > 0.0 { 1.0 } else { 0.0 };
            (x * on, on)
        }
        Activation::Silu => {
            let sigmoid = 1.0 / (1.0 + exp(-x));
            (x * sigmoid, sigmoid * (1.0 + x * (1.0 - sigmoid)))
        }
    }
}

/// Compiles `$body` for AVX2 + FMA and for the baseline, and runs the best the CPU has.
macro_rules! dispatch {
    (fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

dispatch! {
    fn activate(kind: Activation, pre: &[f32], value: &mut [f32], slope: &mut [f32]) {
        for ((&x, v), s) in pre.iter().zip(value.iter_mut()).zip(slope.iter_mut()) {
            (*v, *s) = activation_and_slope(kind, x);
        }
    }
}

dispatch! {
    fn exp_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = exp(*v);
        }
    }
}

/// Fixed-width partial sums: what lets LLVM vectorise a float reduction.
const LANES: usize = 16;

/// `Σ a_i b_i` in `LANES` partial sums. Inlined where it is called: attention calls it
/// on rows of 64 values, too short to pay for a dispatch.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_body, b_body) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_body
        .remainder()
        .iter()
        .zip(b_body.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_body.zip(b_body) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a_i` in `LANES` partial sums.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let body = a.chunks_exact(LANES);
    let tail: f32 = body.remainder().iter().sum();
    for x in body {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Columns `first..first + width` of `x [rows, cols]` as the rows of `out [width, rows]`.
pub(crate) fn transpose_band(x: &[f32], rows: usize, cols: usize, first: usize, out: &mut [f32]) {
    let width = out.len() / rows;
    assert!(first + width <= cols && x.len() >= rows * cols && out.len() == width * rows);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX; the bounds were checked above.
        unsafe { transpose_band_avx(x, rows, cols, first, width, out) };
        return;
    }
    transpose_band_scalar(x, rows, cols, first, width, out, 0, 0);
}

/// The part of a band from row `r0` and column `c0` (band-relative) on, one value at a time.
#[allow(clippy::too_many_arguments)]
fn transpose_band_scalar(
    x: &[f32],
    rows: usize,
    cols: usize,
    first: usize,
    width: usize,
    out: &mut [f32],
    r0: usize,
    c0: usize,
) {
    for c in 0..width {
        for r in if c < c0 { r0..rows } else { 0..rows } {
            out[c * rows + r] = x[r * cols + first + c];
        }
    }
}

/// 8 × 8 blocks in registers; the edges (rows or columns past a multiple of 8) by
/// [`transpose_band_scalar`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_band_avx(
    x: &[f32],
    rows: usize,
    cols: usize,
    first: usize,
    width: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (rows8, width8) = (rows / 8 * 8, width / 8 * 8);
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    for r in (0..rows8).step_by(8) {
        for c in (0..width8).step_by(8) {
            // SAFETY: rows r..r + 8 and columns first + c..first + c + 8 are inside x
            // (rows8 ≤ rows, first + width8 ≤ cols), their images inside out.
            unsafe {
                let at = |i: usize| src.add((r + i) * cols + first + c);
                let (r0, r1, r2, r3) = (
                    _mm256_loadu_ps(at(0)),
                    _mm256_loadu_ps(at(1)),
                    _mm256_loadu_ps(at(2)),
                    _mm256_loadu_ps(at(3)),
                );
                let (r4, r5, r6, r7) = (
                    _mm256_loadu_ps(at(4)),
                    _mm256_loadu_ps(at(5)),
                    _mm256_loadu_ps(at(6)),
                    _mm256_loadu_ps(at(7)),
                );
                let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
                let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
                let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
                let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
                let (u0, u1) = (
                    _mm256_shuffle_ps::<0x44>(t0, t2),
                    _mm256_shuffle_ps::<0xEE>(t0, t2),
                );
                let (u2, u3) = (
                    _mm256_shuffle_ps::<0x44>(t1, t3),
                    _mm256_shuffle_ps::<0xEE>(t1, t3),
                );
                let (u4, u5) = (
                    _mm256_shuffle_ps::<0x44>(t4, t6),
                    _mm256_shuffle_ps::<0xEE>(t4, t6),
                );
                let (u6, u7) = (
                    _mm256_shuffle_ps::<0x44>(t5, t7),
                    _mm256_shuffle_ps::<0xEE>(t5, t7),
                );
                let to = |i: usize| dst.add((c + i) * rows + r);
                _mm256_storeu_ps(to(0), _mm256_permute2f128_ps::<0x20>(u0, u4));
                _mm256_storeu_ps(to(1), _mm256_permute2f128_ps::<0x20>(u1, u5));
                _mm256_storeu_ps(to(2), _mm256_permute2f128_ps::<0x20>(u2, u6));
                _mm256_storeu_ps(to(3), _mm256_permute2f128_ps::<0x20>(u3, u7));
                _mm256_storeu_ps(to(4), _mm256_permute2f128_ps::<0x31>(u0, u4));
                _mm256_storeu_ps(to(5), _mm256_permute2f128_ps::<0x31>(u1, u5));
                _mm256_storeu_ps(to(6), _mm256_permute2f128_ps::<0x31>(u2, u6));
                _mm256_storeu_ps(to(7), _mm256_permute2f128_ps::<0x31>(u3, u7));
            }
        }
    }
    // Columns past width8 (every row), and rows past rows8 of the others.
    transpose_band_scalar(x, rows, cols, first, width, out, rows8, width8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |k| lo + (hi - lo) * k as f32 / n as f32)
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        for x in grid(-87.0, 88.0, 400_000) {
            let want = libm::exp(f64::from(x));
            let got = f64::from(exp(x));
            assert!(
                ((got - want) / want).abs() < 3.0 * f64::from(f32::EPSILON),
                "exp({x}) = {got}, want {want}"
            );
        }
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn erf_is_within_a_few_ulp_of_libm() {
        for x in grid(-6.0, 6.0, 400_000) {
            let want = libm::erf(f64::from(x));
            let got = f64::from(erf(x));
            assert!(
                (got - want).abs() < 4.0 * f64::from(f32::EPSILON) * want.abs().max(1e-3),
                "erf({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn activations_and_slopes_match_the_f64_formulas() {
        let xs: Vec<f32> = grid(-9.0, 9.0, 20_000).collect();
        let mut value = vec![0f32; xs.len()];
        let mut slope = vec![0f32; xs.len()];
        for kind in [
            Activation::GeluErf,
            Activation::GeluTanh,
            Activation::Relu,
            Activation::Silu,
        ] {
            activate(kind, &xs, &mut value, &mut slope);
            for (i, &x) in xs.iter().enumerate() {
                let x64 = f64::from(x);
                let (v, s) = (
                    super::super::kernels::act(kind, x64),
                    super::super::kernels::act_grad(kind, x64),
                );
                assert!(
                    (f64::from(value[i]) - v).abs() < 1e-6 * (1.0 + v.abs()),
                    "{kind:?}({x}) = {}, want {v}",
                    value[i]
                );
                assert!(
                    (f64::from(slope[i]) - s).abs() < 1e-6 * (1.0 + s.abs()),
                    "{kind:?}'({x}) = {}, want {s}",
                    slope[i]
                );
            }
        }
    }

    #[test]
    fn lane_sums_match_plain_sums() {
        let a: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
            .collect();
        let b: Vec<f32> = (0..1003)
            .map(|i| ((i * 13) % 17) as f32 / 3.0 - 2.0)
            .collect();
        let plain_dot: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x * y)).sum();
        let plain_sum: f64 = a.iter().map(|&x| f64::from(x)).sum();
        assert!((f64::from(dot(&a, &b)) - plain_dot).abs() < 1e-3);
        assert!((f64::from(sum(&a)) - plain_sum).abs() < 1e-3);
        assert_eq!(
            dot(&a[..5], &b[..5]),
            a[..5].iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        );
    }
}
