//! Numeric kernels every architecture's attribution engine shares: the float types,
//! matrix products through `gemm` (or OpenBLAS) split between all cores, dense layers
//! kept in both layouts, LayerNorm and RMSNorm with their backward passes, activations
//! with their slopes, and elementwise helpers. The architectures' engines
//! ([`super::bert`], [`super::decoder`]) are built from these.

use std::fmt::Debug;
use std::ops::AddAssign;

use candle_core::{DType, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::error::Result;
use crate::model::config::Activation;
use crate::model::nn::{LayerNorm, Linear};

use super::simd;

/// The float types the engine runs in: f32 for work, f64 for gradient checks.
pub trait Real: Float + AddAssign + Debug + Send + Sync + std::iter::Sum + 'static {
    /// candle's dtype for this type.
    const DTYPE: DType;
    /// From f64.
    fn of(x: f64) -> Self;
    /// The error function.
    fn erf(self) -> Self;
    /// Tensor → flat vector.
    fn from_tensor(t: &Tensor) -> Result<Vec<Self>>;
    /// `value = f(pre)`, `slope = f'(pre)`, elementwise.
    fn activate(kind: Activation, pre: &[Self], value: &mut [Self], slope: &mut [Self]) {
        for ((&x, v), s) in pre.iter().zip(value.iter_mut()).zip(slope.iter_mut()) {
            *v = act(kind, x);
            *s = act_grad(kind, x);
        }
    }
    /// `x = eˣ`, elementwise.
    fn exp_in_place(x: &mut [Self]) {
        for v in x.iter_mut() {
            *v = v.exp();
        }
    }
    /// `Σ a_i b_i`.
    fn dot(a: &[Self], b: &[Self]) -> Self {
        a.iter().zip(b).fold(Self::zero(), |s, (&x, &y)| s + x * y)
    }
    /// `Σ a_i`.
    fn sum_slice(a: &[Self]) -> Self {
        a.iter().copied().sum()
    }
    /// Columns `first..` of `x [rows, cols]` as the rows of `out [width, rows]`.
    fn transpose_band(x: &[Self], rows: usize, cols: usize, first: usize, out: &mut [Self]) {
        for (c, out_row) in out.chunks_mut(rows).enumerate() {
            for (r, o) in out_row.iter_mut().enumerate() {
                *o = x[r * cols + first + c];
            }
        }
    }
}

/// f32 runs the vectorised kernels of [`simd`]; results differ from libm's by a few ulp.
impl Real for f32 {
    const DTYPE: DType = DType::F32;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn from_tensor(t: &Tensor) -> Result<Vec<Self>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
    fn activate(kind: Activation, pre: &[Self], value: &mut [Self], slope: &mut [Self]) {
        simd::activate(kind, pre, value, slope)
    }
    fn exp_in_place(x: &mut [Self]) {
        simd::exp_in_place(x)
    }
    fn dot(a: &[Self], b: &[Self]) -> Self {
        simd::dot(a, b)
    }
    fn sum_slice(a: &[Self]) -> Self {
        simd::sum(a)
    }
    fn transpose_band(x: &[Self], rows: usize, cols: usize, first: usize, out: &mut [Self]) {
        simd::transpose_band(x, rows, cols, first, out)
    }
}

/// f64 (the gradient checks) keeps libm and plain sums: the reference arithmetic.
impl Real for f64 {
    const DTYPE: DType = DType::F64;
    fn of(x: f64) -> Self {
        x
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn from_tensor(t: &Tensor) -> Result<Vec<Self>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
    }
}

/// `c[m, n] (+)= a[m, k] · b`, with `b` stored `[n, k]` (`b_is_nk`, a PyTorch weight:
/// the product is `a · bᵀ`) or `[k, n]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<F: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[F],
    b: &[F],
    b_is_nk: bool,
    c: &mut [F],
    accumulate: bool,
) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(F::zero());
        }
        return;
    }
    let product = Product {
        m,
        n,
        k,
        a: a.as_ptr(),
        b: b.as_ptr(),
        b_is_nk,
        c: c.as_mut_ptr(),
        accumulate,
    };
    // Large products are split between the threads, each part a single-threaded product
    // (BLAS threads would spin through the attention and elementwise work that runs
    // between products on the same cores). Each part packs all of the operand it does
    // not split, so split the larger of the rows of A or the columns of B.
    let threads = rayon::current_num_threads();
    let split = if m >= n { m } else { n };
    if threads > 1 && split >= 2 * MIN_PART && m * n * k >= PARALLEL_WORK {
        // A few parts per thread, taken as threads come free: a thread slowed by the other
        // work on its core does not hold the product up.
        // gemm vectorises along C's columns in blocks of 64 (four AVX-512 registers):
        // a part of 96 columns would run a third of its work in the half-width kernel.
        let size = split
            .div_ceil(PARTS_PER_THREAD * threads)
            .max(MIN_PART)
            .next_multiple_of(if m >= n { 16 } else { 64 });
        (0..split.div_ceil(size)).into_par_iter().for_each(|part| {
            let (start, len) = (part * size, size.min(split - part * size));
            // SAFETY: the parts are disjoint blocks of C, inside the bounds checked above.
            unsafe {
                if m >= n {
                    product.rows(start, len).run()
                } else {
                    product.columns(start, len).run()
                }
            }
        });
    } else {
        // SAFETY: the bounds were checked above.
        unsafe { product.run() }
    }
}

/// `x [rows, cols]` → `[cols, rows]`, in parallel over bands of columns.
pub fn transpose<F: Real>(x: &[F], rows: usize, cols: usize) -> Vec<F> {
    // A band's rows (8 × 64 values at a time) and its output lines stay in L1.
    const BAND: usize = 64;
    let mut out = vec![F::zero(); rows * cols];
    out.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, out)| F::transpose_band(x, rows, cols, band * BAND, out));
    out
}

/// Multiply-adds below which a product runs on one thread.
const PARALLEL_WORK: usize = 1 << 22;
/// Parts of a split product per thread.
const PARTS_PER_THREAD: usize = 4;
/// Rows (or columns) of a part at least.
const MIN_PART: usize = 64;

/// A block of a product `c (+)= a · op(b)` in row-major buffers: `a` has row stride `k`,
/// `c` row stride `ldc`, `b` is `[n, k]` (`b_is_nk`) or `[k, n]` with row stride `ldb`.
#[derive(Clone, Copy)]
struct Product<F> {
    m: usize,
    n: usize,
    k: usize,
    a: *const F,
    b: *const F,
    b_is_nk: bool,
    c: *mut F,
    accumulate: bool,
}

// SAFETY: a `Product` is only run on disjoint blocks of `c` (see `matmul`), while the
// buffers it points into are borrowed by `matmul`.
unsafe impl<F: Send> Send for Product<F> {}
unsafe impl<F: Sync> Sync for Product<F> {}

impl<F: Real> Product<F> {
    /// Row strides of the whole product: the blocks keep them.
    fn strides(&self) -> (usize, usize) {
        (self.n, if self.b_is_nk { self.k } else { self.n })
    }

    /// Rows `start..start + len` of the product.
    unsafe fn rows(self, start: usize, len: usize) -> ProductBlock<F> {
        let (ldc, ldb) = self.strides();
        ProductBlock {
            m: len,
            n: self.n,
            a: self.a.add(start * self.k),
            b: self.b,
            c: self.c.add(start * ldc),
            ldc,
            ldb,
            product: self,
        }
    }

    /// Columns `start..start + len` of the product.
    unsafe fn columns(self, start: usize, len: usize) -> ProductBlock<F> {
        let (ldc, ldb) = self.strides();
        ProductBlock {
            m: self.m,
            n: len,
            a: self.a,
            b: if self.b_is_nk {
                self.b.add(start * self.k)
            } else {
                self.b.add(start)
            },
            c: self.c.add(start),
            ldc,
            ldb,
            product: self,
        }
    }

    /// The whole product.
    unsafe fn run(self) {
        self.rows(0, self.m).run()
    }
}

/// A block of a [`Product`], run on the calling thread.
struct ProductBlock<F> {
    m: usize,
    n: usize,
    a: *const F,
    b: *const F,
    c: *mut F,
    ldc: usize,
    ldb: usize,
    product: Product<F>,
}

impl<F: Real> ProductBlock<F> {
    /// # Safety
    /// The pointers and strides must describe buffers that hold the block.
    unsafe fn run(self) {
        let Product {
            k,
            b_is_nk,
            accumulate,
            ..
        } = self.product;
        #[cfg(feature = "openblas")]
        if blas::gemm(
            (self.m, self.n, k),
            (self.a, self.b, self.c),
            (self.ldb, self.ldc),
            b_is_nk,
            accumulate,
        ) {
            return;
        }
        let (rhs_cs, rhs_rs) = if b_is_nk {
            (self.ldb as isize, 1)
        } else {
            (1, self.ldb as isize)
        };
        gemm::gemm(
            self.m,
            self.n,
            k,
            self.c,
            1,
            self.ldc as isize,
            accumulate,
            self.a,
            1,
            k as isize,
            self.b,
            rhs_cs,
            rhs_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The optional OpenBLAS path (`--features openblas`, links the system libopenblas):
/// its AVX-512 kernels beat gemm's AVX2 ones where the CPU has AVX-512.
#[cfg(feature = "openblas")]
mod blas {
    use std::any::TypeId;
    use std::ffi::c_int;

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;

    #[link(name = "openblas")]
    extern "C" {
        fn cblas_sgemm(
            order: c_int,
            ta: c_int,
            tb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        fn cblas_dgemm(
            order: c_int,
            ta: c_int,
            tb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f64,
            a: *const f64,
            lda: c_int,
            b: *const f64,
            ldb: c_int,
            beta: f64,
            c: *mut f64,
            ldc: c_int,
        );
    }

    extern "C" {
        fn openblas_set_num_threads(n: c_int);
    }

    static SINGLE_THREADED: std::sync::Once = std::sync::Once::new();

    /// `c (+)= a · op(b)` through cblas; false when `F` is not f32 or f64. `a` has row
    /// stride `k`.
    ///
    /// # Safety
    /// The pointers and strides must describe buffers that hold the product.
    pub unsafe fn gemm<F: 'static>(
        (m, n, k): (usize, usize, usize),
        (a, b, c): (*const F, *const F, *mut F),
        (ldb, ldc): (usize, usize),
        b_is_nk: bool,
        accumulate: bool,
    ) -> bool {
        let tb = if b_is_nk { TRANS } else { NO_TRANS };
        let beta = if accumulate { 1.0 } else { 0.0 };
        let int = |x: usize| c_int::try_from(x).expect("matrix dimension fits a C int");
        let (m, n, k, ldb, ldc) = (int(m), int(n), int(k), int(ldb), int(ldc));
        // kn splits products between threads itself (see `matmul`).
        // SAFETY: a plain setter of OpenBLAS's thread count.
        SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
        // SAFETY: the caller's pointers and strides hold the product; the casts only
        // rename F as the type TypeId says it is.
        macro_rules! call {
            ($gemm:ident, $t:ty) => {
                unsafe {
                    $gemm(
                        ROW_MAJOR,
                        NO_TRANS,
                        tb,
                        m,
                        n,
                        k,
                        1.0,
                        a.cast(),
                        k,
                        b.cast(),
                        ldb,
                        beta as $t,
                        c.cast(),
                        ldc,
                    )
                }
            };
        }
        if TypeId::of::<F>() == TypeId::of::<f32>() {
            call!(cblas_sgemm, f32);
            true
        } else if TypeId::of::<F>() == TypeId::of::<f64>() {
            call!(cblas_dgemm, f64);
            true
        } else {
            false
        }
    }
}

/// A dense layer: `weight [out, in]`, `bias [out]`.
///
/// The weight is kept twice, once per direction, because `gemm` packs the matrix it
/// vectorises along with the depth outermost: from `[out, in]` the input gradient's
/// packing is contiguous copies, the forward's one strided scalar load per element,
/// repeated in every part of a split product (a tenth of the wall time). The copy costs
/// 340 MB for bert-base, taken from the batch size (see `ig::CACHE_BUDGET`).
#[derive(Debug, Clone)]
pub struct Dense<F> {
    /// `[out, in]`: the input gradient `dy · W`.
    pub(crate) weight: Vec<F>,
    /// `[in, out]`: the forward `x · Wᵀ`.
    pub(crate) weight_t: Vec<F>,
    pub(crate) bias: Vec<F>,
    pub(crate) out: usize,
    pub(crate) inp: usize,
}

impl<F: Real> Dense<F> {
    /// Copies a candle dense layer (any dtype, any device).
    pub fn from(linear: &Linear) -> Result<Self> {
        Self::from_parts(&linear.weight, linear.bias.as_ref())
    }

    /// From a weight `[out, in]` and an optional bias `[out]` (none: zero).
    pub fn from_parts(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        let weight = F::from_tensor(weight)?;
        Ok(Self {
            weight_t: transpose(&weight, out, inp),
            weight,
            bias: match bias {
                Some(bias) => F::from_tensor(bias)?,
                None => vec![F::zero(); out],
            },
            out,
            inp,
        })
    }

    /// `x [rows, in]` → `[rows, out]`
    pub fn forward(&self, x: &[F], rows: usize) -> Vec<F> {
        let mut y = repeat_rows(&self.bias, rows);
        matmul(
            rows,
            self.out,
            self.inp,
            x,
            &self.weight_t,
            false,
            &mut y,
            true,
        );
        y
    }

    /// `dx (+)= dy [rows, out] · W` → `[rows, in]`: the input gradient only.
    pub fn backward_input(&self, dy: &[F], rows: usize, dx: &mut [F], accumulate: bool) {
        matmul(
            rows,
            self.inp,
            self.out,
            dy,
            &self.weight,
            false,
            dx,
            accumulate,
        );
    }
}

/// LayerNorm parameters.
#[derive(Debug, Clone)]
pub struct Norm<F> {
    pub(crate) gamma: Vec<F>,
    pub(crate) beta: Vec<F>,
    pub(crate) eps: F,
}

/// What LayerNorm's backward needs: the normalised input and 1/σ per row.
#[derive(Debug, Clone, Default)]
pub struct NormCache<F> {
    pub(crate) xhat: Vec<F>,
    pub(crate) rstd: Vec<F>,
}

impl<F: Real> Norm<F> {
    /// Copies a candle LayerNorm.
    pub fn from(ln: &LayerNorm) -> Result<Self> {
        Ok(Self {
            gamma: F::from_tensor(&ln.weight)?,
            beta: F::from_tensor(&ln.bias)?,
            eps: F::of(ln.eps),
        })
    }

    /// Rows of `x` normalised, and what the backward needs.
    pub fn forward(&self, x: &[F]) -> (Vec<F>, NormCache<F>) {
        let h = self.gamma.len();
        let n = F::of(h as f64);
        let rows = x.len() / h;
        let mut y = vec![F::zero(); x.len()];
        let mut xhat = vec![F::zero(); x.len()];
        let mut rstd = vec![F::zero(); rows];
        y.par_chunks_mut(h)
            .zip(xhat.par_chunks_mut(h))
            .zip(rstd.par_iter_mut())
            .zip(x.par_chunks(h))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(((y, xh), rs), row)| {
                let mean = F::sum_slice(row) / n;
                for (c, &v) in xh.iter_mut().zip(row) {
                    *c = v - mean;
                }
                *rs = (F::dot(xh, xh) / n + self.eps).sqrt().recip();
                for j in 0..h {
                    xh[j] = xh[j] * *rs;
                    y[j] = xh[j] * self.gamma[j] + self.beta[j];
                }
            });
        (y, NormCache { xhat, rstd })
    }

    /// The input gradient from the output's.
    pub fn backward(&self, dy: &[F], cache: &NormCache<F>) -> Vec<F> {
        let h = self.gamma.len();
        let n = F::of(h as f64);
        let mut dx = vec![F::zero(); dy.len()];
        dx.par_chunks_mut(h)
            .zip(dy.par_chunks(h))
            .zip(cache.xhat.par_chunks(h))
            .zip(cache.rstd.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(((dx, g), xh), &rs)| {
                // dx first holds γ ⊙ dy.
                for j in 0..h {
                    dx[j] = g[j] * self.gamma[j];
                }
                let mean_d = F::sum_slice(dx) / n;
                let mean_dx = F::dot(dx, xh) / n;
                for j in 0..h {
                    dx[j] = rs * (dx[j] - mean_d - xh[j] * mean_dx);
                }
            });
        dx
    }
}

/// RMSNorm parameters (Llama): `y = x / √(mean(x²) + ε) · γ`.
#[derive(Debug, Clone)]
pub struct RmsNorm<F> {
    pub(crate) gamma: Vec<F>,
    pub(crate) eps: F,
}

impl<F: Real> RmsNorm<F> {
    /// Copies a candle RMSNorm.
    pub fn from(norm: &crate::model::nn::RmsNorm) -> Result<Self> {
        Ok(Self {
            gamma: F::from_tensor(&norm.weight)?,
            eps: F::of(norm.eps),
        })
    }

    /// Rows of `x` normalised, and what the backward needs (`xhat = x / rms`).
    pub fn forward(&self, x: &[F]) -> (Vec<F>, NormCache<F>) {
        let h = self.gamma.len();
        let n = F::of(h as f64);
        let rows = x.len() / h;
        let mut y = vec![F::zero(); x.len()];
        let mut xhat = vec![F::zero(); x.len()];
        let mut rstd = vec![F::zero(); rows];
        y.par_chunks_mut(h)
            .zip(xhat.par_chunks_mut(h))
            .zip(rstd.par_iter_mut())
            .zip(x.par_chunks(h))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(((y, xh), rs), row)| {
                *rs = (F::dot(row, row) / n + self.eps).sqrt().recip();
                for j in 0..h {
                    xh[j] = row[j] * *rs;
                    y[j] = xh[j] * self.gamma[j];
                }
            });
        (y, NormCache { xhat, rstd })
    }

    /// The input gradient from the output's: `rstd · (g − x̂ · mean(g ⊙ x̂))`, `g = γ ⊙ dy`.
    pub fn backward(&self, dy: &[F], cache: &NormCache<F>) -> Vec<F> {
        let h = self.gamma.len();
        let n = F::of(h as f64);
        let mut dx = vec![F::zero(); dy.len()];
        dx.par_chunks_mut(h)
            .zip(dy.par_chunks(h))
            .zip(cache.xhat.par_chunks(h))
            .zip(cache.rstd.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(((dx, g), xh), &rs)| {
                for j in 0..h {
                    dx[j] = g[j] * self.gamma[j];
                }
                let mean_dx = F::dot(dx, xh) / n;
                for j in 0..h {
                    dx[j] = rs * (dx[j] - xh[j] * mean_dx);
                }
            });
        dx
    }
}

/// `y ⊙= x`, elementwise, in parallel.
pub(crate) fn mul_in_place<F: Real>(y: &mut [F], x: &[F]) {
    y.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(x.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(y, x)| {
            for (a, &b) in y.iter_mut().zip(x) {
                *a = *a * b;
            }
        });
}

/// Each row of `logits [R, V]` replaced by its softmax, in parallel.
pub(crate) fn softmax_rows<F: Real>(logits: &mut [F], v: usize) {
    logits.par_chunks_mut(v).for_each(|row| {
        let max = row.iter().copied().fold(F::neg_infinity(), F::max);
        for z in row.iter_mut() {
            *z = *z - max;
        }
        F::exp_in_place(row);
        let sum = F::sum_slice(row);
        for z in row.iter_mut() {
            *z = *z / sum;
        }
    });
}

/// Turns probabilities `[R, V]` into the gradient of the gold token's probability with
/// respect to the logits, `dP_gold/dz_j = P_gold (δ_gold,j − p_j)`, in place; returns
/// `P_gold` per row.
pub(crate) fn gold_probability_gradient<F: Real>(probs: &mut [F], v: usize, gold: usize) -> Vec<F> {
    let gold_p: Vec<F> = probs.chunks(v).map(|row| row[gold]).collect();
    probs
        .par_chunks_mut(v)
        .zip(gold_p.par_iter())
        .for_each(|(row, &p)| {
            for z in row.iter_mut() {
                *z = -p * *z;
            }
            row[gold] += p;
        });
    gold_p
}

/// Elements per rayon task in elementwise work.
pub(crate) const ELEMENTS_PER_TASK: usize = 1 << 14;

/// `row` repeated `rows` times, `[rows, len]`.
pub(crate) fn repeat_rows<F: Real>(row: &[F], rows: usize) -> Vec<F> {
    let mut out = vec![F::zero(); rows * row.len()];
    out.par_chunks_mut(row.len())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|r| r.copy_from_slice(row));
    out
}

/// `y += x`, elementwise, in parallel.
pub(crate) fn add_in_place<F: Real>(y: &mut [F], x: &[F]) {
    y.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(x.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(y, x)| {
            for (a, &b) in y.iter_mut().zip(x) {
                *a += b;
            }
        });
}

/// Rows of a LayerNorm (or positions of attention) per rayon task.
pub(crate) const ROWS_PER_TASK: usize = 16;

/// `f(pre)` and `f'(pre)` of a whole buffer, in parallel.
pub(crate) fn activate<F: Real>(kind: Activation, pre: &[F]) -> (Vec<F>, Vec<F>) {
    const PER_TASK: usize = ELEMENTS_PER_TASK;
    let mut value = vec![F::zero(); pre.len()];
    let mut slope = vec![F::zero(); pre.len()];
    value
        .par_chunks_mut(PER_TASK)
        .zip(slope.par_chunks_mut(PER_TASK))
        .zip(pre.par_chunks(PER_TASK))
        .for_each(|((v, s), p)| F::activate(kind, p, v, s));
    (value, slope)
}

/// The activation function and its derivative.
pub(crate) fn act<F: Real>(kind: Activation, x: F) -> F {
    let half = F::of(0.5);
    match kind {
        Activation::GeluErf => {
            half * x * (F::one() + (x * F::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
        }
        Activation::GeluTanh => {
            let c = F::of((2.0 / std::f64::consts::PI).sqrt());
            half * x * (F::one() + (c * (x + F::of(0.044715) * x * x * x)).tanh())
        }
        Activation::Relu => x.max(F::zero()),
        Activation::Silu => x / (F::one() + (-x).exp()),
    }
}

/// The derivative of [`act`].
pub(crate) fn act_grad<F: Real>(kind: Activation, x: F) -> F {
    let half = F::of(0.5);
    match kind {
        Activation::GeluErf => {
            let cdf = half * (F::one() + (x * F::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (-(x * x) * half).exp() * F::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
        Activation::GeluTanh => {
            let c = F::of((2.0 / std::f64::consts::PI).sqrt());
            let a = F::of(0.044715);
            let t = (c * (x + a * x * x * x)).tanh();
            half * (F::one() + t)
                + half * x * (F::one() - t * t) * c * (F::one() + F::of(3.0) * a * x * x)
        }
        Activation::Relu => {
            if x > F::zero() {
                F::one()
            } else {
                F::zero()
            }
        }
        Activation::Silu => {
            let sigmoid = F::one() / (F::one() + (-x).exp());
            sigmoid * (F::one() + x * (F::one() - sigmoid))
        }
    }
}
