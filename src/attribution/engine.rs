//! A BERT forward and backward pass on plain buffers that computes only what integrated
//! gradients needs: gradients with respect to *activations* (never weights), outputs
//! only at the rows that are read, and every matrix product through `gemm` with all
//! cores. The IG loop itself is in [`super::ig`].
//!
//! Shapes: `B` batch (integration points), `S` sequence, `Q` query rows (all `S`, or
//! only the mask row in the top layer), `H` hidden, `I` intermediate (neurons), `V`
//! vocabulary. Matrices are row-major; weights keep PyTorch's `[out, in]` layout.

use std::borrow::Cow;
use std::fmt::Debug;
use std::ops::AddAssign;

use candle_core::{DType, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::error::Result;
use crate::model::bert::{LayerNorm, Linear};
use crate::model::config::Activation;
use crate::model::BertMaskedLm;

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
}

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
}

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
    #[cfg(feature = "openblas")]
    if blas::gemm(m, n, k, a, b, b_is_nk, c, accumulate) {
        return;
    }
    let (rhs_cs, rhs_rs) = if b_is_nk {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // Single-threaded: the IG loop runs layers in parallel, which keeps every core busy
    // between products too (threads inside each product idle there).
    let parallelism = gemm::Parallelism::None;
    // SAFETY: the asserts above bound every index gemm computes from these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            parallelism,
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

    /// `c (+)= a · op(b)` through cblas; false when `F` is not f32 or f64.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<F: 'static>(
        m: usize,
        n: usize,
        k: usize,
        a: &[F],
        b: &[F],
        b_is_nk: bool,
        c: &mut [F],
        accumulate: bool,
    ) -> bool {
        let tb = if b_is_nk { TRANS } else { NO_TRANS };
        let ldb = if b_is_nk { k } else { n } as c_int;
        let beta = if accumulate { 1.0 } else { 0.0 };
        let (m, n, k) = (m as c_int, n as c_int, k as c_int);
        // As for gemm: parallelism is across layers, so BLAS threads would only spin.
        // SAFETY: a plain setter of OpenBLAS's thread count.
        SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
        // SAFETY: the caller checked the slice lengths against m, n and k; the casts
        // only rename F as the type TypeId says it is.
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
                        a.as_ptr().cast(),
                        k,
                        b.as_ptr().cast(),
                        ldb,
                        beta as $t,
                        c.as_mut_ptr().cast(),
                        n,
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
#[derive(Debug, Clone)]
pub struct Dense<F> {
    weight: Vec<F>,
    bias: Vec<F>,
    out: usize,
    inp: usize,
}

impl<F: Real> Dense<F> {
    fn from(linear: &Linear) -> Result<Self> {
        let (out, inp) = linear.weight.dims2()?;
        Ok(Self {
            weight: F::from_tensor(&linear.weight)?,
            bias: F::from_tensor(&linear.bias)?,
            out,
            inp,
        })
    }

    /// `x [rows, in]` → `[rows, out]`
    fn forward(&self, x: &[F], rows: usize) -> Vec<F> {
        let mut y: Vec<F> = self
            .bias
            .iter()
            .copied()
            .cycle()
            .take(rows * self.out)
            .collect();
        matmul(
            rows,
            self.out,
            self.inp,
            x,
            &self.weight,
            true,
            &mut y,
            true,
        );
        y
    }

    /// `dx (+)= dy [rows, out] · W` → `[rows, in]`: the input gradient only.
    fn backward_input(&self, dy: &[F], rows: usize, dx: &mut [F], accumulate: bool) {
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
    gamma: Vec<F>,
    beta: Vec<F>,
    eps: F,
}

/// What LayerNorm's backward needs: the normalised input and 1/σ per row.
#[derive(Debug, Clone, Default)]
struct NormCache<F> {
    xhat: Vec<F>,
    rstd: Vec<F>,
}

impl<F: Real> Norm<F> {
    fn from(ln: &LayerNorm) -> Result<Self> {
        Ok(Self {
            gamma: F::from_tensor(&ln.weight)?,
            beta: F::from_tensor(&ln.bias)?,
            eps: F::of(ln.eps),
        })
    }

    fn forward(&self, x: &[F]) -> (Vec<F>, NormCache<F>) {
        let h = self.gamma.len();
        let n = F::of(h as f64);
        let rows = x.len() / h;
        let mut y = vec![F::zero(); x.len()];
        let mut xhat = vec![F::zero(); x.len()];
        let mut rstd = vec![F::zero(); rows];
        for r in 0..rows {
            let row = &x[r * h..(r + 1) * h];
            let mean = row.iter().copied().sum::<F>() / n;
            let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<F>() / n;
            let rs = (var + self.eps).sqrt().recip();
            rstd[r] = rs;
            for j in 0..h {
                let xh = (row[j] - mean) * rs;
                xhat[r * h + j] = xh;
                y[r * h + j] = xh * self.gamma[j] + self.beta[j];
            }
        }
        (y, NormCache { xhat, rstd })
    }

    fn backward(&self, dy: &[F], cache: &NormCache<F>) -> Vec<F> {
        let h = self.gamma.len();
        let n = F::of(h as f64);
        let mut dx = vec![F::zero(); dy.len()];
        for (r, &rs) in cache.rstd.iter().enumerate() {
            let xh = &cache.xhat[r * h..(r + 1) * h];
            let g = &dy[r * h..(r + 1) * h];
            let mut mean_d = F::zero();
            let mut mean_dx = F::zero();
            for j in 0..h {
                let d = g[j] * self.gamma[j];
                mean_d += d;
                mean_dx += d * xh[j];
            }
            mean_d = mean_d / n;
            mean_dx = mean_dx / n;
            for j in 0..h {
                let d = g[j] * self.gamma[j];
                dx[r * h + j] = rs * (d - mean_d - xh[j] * mean_dx);
            }
        }
        dx
    }
}

/// The activation function and its derivative.
fn act<F: Real>(kind: Activation, x: F) -> F {
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
    }
}

fn act_grad<F: Real>(kind: Activation, x: F) -> F {
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
    }
}

/// Which rows of a layer to compute: all of them, or only one position (the top
/// layer, whose other rows nothing reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Every position.
    All,
    /// Only this position.
    One(usize),
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct Block<F> {
    query: Dense<F>,
    key: Dense<F>,
    value: Dense<F>,
    attn_out: Dense<F>,
    attn_norm: Norm<F>,
    up: Dense<F>,
    down: Dense<F>,
    out_norm: Norm<F>,
}

/// What a block's backward needs from its forward.
#[derive(Debug, Clone)]
pub struct BlockCache<F> {
    rows: Rows,
    seq: usize,
    q: Vec<F>,
    k: Vec<F>,
    v: Vec<F>,
    probs: Vec<F>,
    attn_norm: NormCache<F>,
    pre_act: Vec<F>,
    out_norm: NormCache<F>,
}

/// The model's weights as flat buffers, and the shapes.
#[derive(Debug, Clone)]
pub struct Engine<F> {
    blocks: Vec<Block<F>>,
    head_dense: Dense<F>,
    head_norm: Norm<F>,
    decoder: Vec<F>,
    decoder_bias: Vec<F>,
    activation: Activation,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    vocab: usize,
}

/// The unscaled forward pass of one prompt, kept for every layer's integration.
#[derive(Debug, Clone)]
pub struct BaseForward<F> {
    /// Sequence length.
    pub seq: usize,
    /// Mask position.
    pub mask: usize,
    /// `inputs[l]`: the input of layer `l`, `[S, H]` (`inputs[N]` is the last output).
    pub inputs: Vec<Vec<F>>,
    /// `attended[l]`: layer `l`'s attention output at the mask (the FFN input), `[H]`.
    pub attended: Vec<Vec<F>>,
    /// `neurons[l]`: layer `l`'s activations at the mask, `[I]`.
    pub neurons: Vec<Vec<F>>,
    /// Vocabulary probabilities at the mask.
    pub probabilities: Vec<F>,
}

impl<F: Real> Engine<F> {
    /// Copies the weights of a loaded model (any dtype, any device) into flat buffers.
    pub fn new(model: &BertMaskedLm) -> Result<Self> {
        let blocks = model
            .layers
            .iter()
            .map(|l| {
                Ok(Block {
                    query: Dense::from(&l.attention.query)?,
                    key: Dense::from(&l.attention.key)?,
                    value: Dense::from(&l.attention.value)?,
                    attn_out: Dense::from(&l.attention.output)?,
                    attn_norm: Norm::from(&l.attention.layer_norm)?,
                    up: Dense::from(&l.intermediate)?,
                    down: Dense::from(&l.output)?,
                    out_norm: Norm::from(&l.output_layer_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = &model.config;
        Ok(Self {
            blocks,
            head_dense: Dense::from(&model.head.transform)?,
            head_norm: Norm::from(&model.head.layer_norm)?,
            decoder: F::from_tensor(&model.head.decoder_weight)?,
            decoder_bias: F::from_tensor(&model.head.decoder_bias)?,
            activation: cfg.activation(),
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            vocab: cfg.vocab_size,
        })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// Neurons per layer.
    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    /// The unscaled forward of one prompt. `embedded` is the embedding output `[S, H]`
    /// (computed by the candle model, which owns the embedding tables).
    pub fn base_forward(&self, embedded: Vec<F>, mask: usize) -> BaseForward<F> {
        let h = self.hidden;
        let seq = embedded.len() / h;
        let mut inputs = vec![embedded];
        let mut attended = Vec::new();
        let mut neurons = Vec::new();
        for block in &self.blocks {
            let x = inputs.last().expect("input");
            let (out, cache) = self.block_forward(block, x, 1, seq, Rows::All);
            // The FFN input at the mask, from the normalised row LayerNorm kept.
            let xhat = &cache.attn_norm.xhat[mask * h..(mask + 1) * h];
            let norm = &block.attn_norm;
            attended.push(
                xhat.iter()
                    .zip(norm.gamma.iter().zip(&norm.beta))
                    .map(|(&x, (&g, &b))| x * g + b)
                    .collect(),
            );
            let pre = &cache.pre_act[mask * self.intermediate..(mask + 1) * self.intermediate];
            neurons.push(pre.iter().map(|&v| act(self.activation, v)).collect());
            inputs.push(out);
        }
        let top = &inputs.last().expect("output")[mask * h..(mask + 1) * h];
        let probabilities = self.head_probabilities(top, 1).0;
        BaseForward {
            seq,
            mask,
            inputs,
            attended,
            neurons,
            probabilities,
        }
    }

    /// For layer `layer` and each `alphas[b]`: the gold probability when that layer's
    /// neurons at the mask are replaced by `alphas[b] · w`, and its gradient with respect
    /// to the replaced neurons. Returns `(P [B], dP/d(neurons) [B, I])`.
    pub fn scaled_gradients(
        &self,
        base: &BaseForward<F>,
        layer: usize,
        alphas: &[F],
        gold: usize,
    ) -> (Vec<F>, Vec<F>) {
        let (h, i, seq, mask) = (self.hidden, self.intermediate, base.seq, base.mask);
        let batch = alphas.len();
        let block = &self.blocks[layer];
        let w = &base.neurons[layer];

        // Layer `layer` from its neurons on, at the mask row only: the other rows of its
        // output do not depend on the neurons at the mask.
        let neurons: Vec<F> = alphas
            .iter()
            .flat_map(|&a| w.iter().map(move |&x| a * x))
            .collect();
        let mut pre = block.down.forward(&neurons, batch);
        for row in pre.chunks_mut(h) {
            for (p, &r) in row.iter_mut().zip(&base.attended[layer]) {
                *p += r;
            }
        }
        let (mask_rows, norm_cache) = block.out_norm.forward(&pre);

        // The layers above, on the batch, caching what their backward needs.
        let last = self.blocks.len() - 1;
        let mut caches = Vec::new();
        let top = if layer == last {
            mask_rows
        } else {
            let next = &base.inputs[layer + 1];
            let mut x = Vec::with_capacity(batch * seq * h);
            for b in 0..batch {
                x.extend_from_slice(&next[..mask * h]);
                x.extend_from_slice(&mask_rows[b * h..(b + 1) * h]);
                x.extend_from_slice(&next[(mask + 1) * h..]);
            }
            for l in layer + 1..=last {
                let rows = if l == last {
                    Rows::One(mask)
                } else {
                    Rows::All
                };
                let (out, cache) = self.block_forward(&self.blocks[l], &x, batch, seq, rows);
                caches.push(cache);
                x = out;
            }
            x
        };

        // Head and the gold probability's gradient.
        let (probs, head_cache) = self.head_probabilities(&top, batch);
        let v = self.vocab;
        let gold_p: Vec<F> = (0..batch).map(|b| probs[b * v + gold]).collect();
        // dP_gold/dz_j = P_gold (δ_gold,j − p_j)
        let mut d_logits = vec![F::zero(); batch * v];
        for b in 0..batch {
            for j in 0..v {
                let delta = if j == gold { F::one() } else { F::zero() };
                d_logits[b * v + j] = gold_p[b] * (delta - probs[b * v + j]);
            }
        }
        let mut d = self.head_backward(&d_logits, &head_cache, batch);

        // Back down to layer `layer + 1`'s input, then to the mask row of it.
        for (l, cache) in (layer + 1..last + 1).zip(&caches).rev() {
            d = self.block_backward(&self.blocks[l], cache, &d, batch);
        }
        let d_mask_rows: Vec<F> = if layer == last {
            d
        } else {
            (0..batch)
                .flat_map(|b| {
                    d[(b * seq + mask) * h..(b * seq + mask + 1) * h]
                        .iter()
                        .copied()
                })
                .collect()
        };
        let d_pre = block.out_norm.backward(&d_mask_rows, &norm_cache);
        let mut d_neurons = vec![F::zero(); batch * i];
        block
            .down
            .backward_input(&d_pre, batch, &mut d_neurons, false);
        (gold_p, d_neurons)
    }

    /// Head on `[B, H]` rows: probabilities `[B, V]` and what the backward needs.
    fn head_probabilities(&self, top: &[F], batch: usize) -> (Vec<F>, HeadCache<F>) {
        let pre = self.head_dense.forward(top, batch);
        let activated: Vec<F> = pre.iter().map(|&x| act(self.activation, x)).collect();
        let (normed, norm) = self.head_norm.forward(&activated);
        let v = self.vocab;
        let mut logits: Vec<F> = self
            .decoder_bias
            .iter()
            .copied()
            .cycle()
            .take(batch * v)
            .collect();
        matmul(
            batch,
            v,
            self.hidden,
            &normed,
            &self.decoder,
            true,
            &mut logits,
            true,
        );
        for row in logits.chunks_mut(v) {
            let max = row.iter().copied().fold(F::neg_infinity(), F::max);
            let mut sum = F::zero();
            for z in row.iter_mut() {
                *z = (*z - max).exp();
                sum += *z;
            }
            for z in row.iter_mut() {
                *z = *z / sum;
            }
        }
        (logits, HeadCache { pre, norm })
    }

    fn head_backward(&self, d_logits: &[F], cache: &HeadCache<F>, batch: usize) -> Vec<F> {
        let h = self.hidden;
        let mut d_normed = vec![F::zero(); batch * h];
        matmul(
            batch,
            h,
            self.vocab,
            d_logits,
            &self.decoder,
            false,
            &mut d_normed,
            false,
        );
        let mut d_act = self.head_norm.backward(&d_normed, &cache.norm);
        for (d, &x) in d_act.iter_mut().zip(&cache.pre) {
            *d = *d * act_grad(self.activation, x);
        }
        let mut d_top = vec![F::zero(); batch * h];
        self.head_dense
            .backward_input(&d_act, batch, &mut d_top, false);
        d_top
    }

    /// One block on `x [B·S, H]`; returns the output rows `[B·Q, H]` and its cache.
    fn block_forward(
        &self,
        block: &Block<F>,
        x: &[F],
        batch: usize,
        seq: usize,
        rows: Rows,
    ) -> (Vec<F>, BlockCache<F>) {
        let h = self.hidden;
        let (nq, x_q) = query_rows(x, batch, seq, h, rows);
        let q = block.query.forward(&x_q, batch * nq);
        let k = block.key.forward(x, batch * seq);
        let v = block.value.forward(x, batch * seq);
        let (context, probs) = self.attention(&q, &k, &v, batch, seq, nq);
        let mut attn = block.attn_out.forward(&context, batch * nq);
        for (a, &r) in attn.iter_mut().zip(x_q.iter()) {
            *a += r;
        }
        let (attended, attn_norm) = block.attn_norm.forward(&attn);
        let pre_act = block.up.forward(&attended, batch * nq);
        let activated: Vec<F> = pre_act.iter().map(|&x| act(self.activation, x)).collect();
        let mut out = block.down.forward(&activated, batch * nq);
        for (o, &a) in out.iter_mut().zip(&attended) {
            *o += a;
        }
        let (out, out_norm) = block.out_norm.forward(&out);
        let cache = BlockCache {
            rows,
            seq,
            q,
            k,
            v,
            probs,
            attn_norm,
            pre_act,
            out_norm,
        };
        (out, cache)
    }

    /// Gradient of a block's input `[B·S, H]` from that of its output rows `[B·Q, H]`.
    fn block_backward(
        &self,
        block: &Block<F>,
        cache: &BlockCache<F>,
        d_out: &[F],
        batch: usize,
    ) -> Vec<F> {
        let (h, seq) = (self.hidden, cache.seq);
        let nq = cache.q.len() / (batch * h);
        let d_res2 = block.out_norm.backward(d_out, &cache.out_norm);
        // FFN: d_attended = d_res2 (residual) + (d_res2 · W_down ⊙ act') · W_up
        let mut d_act = vec![F::zero(); batch * nq * self.intermediate];
        block
            .down
            .backward_input(&d_res2, batch * nq, &mut d_act, false);
        for (d, &x) in d_act.iter_mut().zip(&cache.pre_act) {
            *d = *d * act_grad(self.activation, x);
        }
        let mut d_attended = d_res2;
        block
            .up
            .backward_input(&d_act, batch * nq, &mut d_attended, true);
        let d_res1 = block.attn_norm.backward(&d_attended, &cache.attn_norm);
        let mut d_context = vec![F::zero(); batch * nq * h];
        block
            .attn_out
            .backward_input(&d_res1, batch * nq, &mut d_context, false);
        let (d_q, d_k, d_v) = self.attention_backward(cache, &d_context, batch, seq, nq);

        let mut d_x = vec![F::zero(); batch * seq * h];
        block.key.backward_input(&d_k, batch * seq, &mut d_x, false);
        block
            .value
            .backward_input(&d_v, batch * seq, &mut d_x, true);
        // The query path and the residual reach only the query rows.
        let mut d_xq = d_res1;
        block
            .query
            .backward_input(&d_q, batch * nq, &mut d_xq, true);
        match cache.rows {
            Rows::All => {
                for (d, &g) in d_x.iter_mut().zip(&d_xq) {
                    *d += g;
                }
            }
            Rows::One(p) => {
                for b in 0..batch {
                    let row = &mut d_x[(b * seq + p) * h..(b * seq + p + 1) * h];
                    for (d, &g) in row.iter_mut().zip(&d_xq[b * h..(b + 1) * h]) {
                        *d += g;
                    }
                }
            }
        }
        d_x
    }

    /// Scaled dot-product attention, per batch item and head (in parallel):
    /// returns the context `[B·Q, H]` and the probabilities `[B, heads, Q, S]`.
    fn attention(
        &self,
        q: &[F],
        k: &[F],
        v: &[F],
        batch: usize,
        seq: usize,
        nq: usize,
    ) -> (Vec<F>, Vec<F>) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = F::of(1.0 / (d as f64).sqrt());
        let mut probs = vec![F::zero(); batch * heads * nq * seq];
        let mut per_head_ctx = vec![F::zero(); batch * heads * nq * d];
        probs
            .par_chunks_mut(nq * seq)
            .zip(per_head_ctx.par_chunks_mut(nq * d))
            .enumerate()
            .for_each(|(bh, (p, ctx))| {
                let (b, hd) = (bh / heads, bh % heads);
                for i in 0..nq {
                    let qi = &q[(b * nq + i) * h + hd * d..][..d];
                    let row = &mut p[i * seq..(i + 1) * seq];
                    let mut max = F::neg_infinity();
                    for (j, s) in row.iter_mut().enumerate() {
                        let kj = &k[(b * seq + j) * h + hd * d..][..d];
                        *s = dot(qi, kj) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = F::zero();
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let c = &mut ctx[i * d..(i + 1) * d];
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = *s / sum;
                        let vj = &v[(b * seq + j) * h + hd * d..][..d];
                        for (cc, &vv) in c.iter_mut().zip(vj) {
                            *cc += *s * vv;
                        }
                    }
                }
            });
        (heads_to_rows(&per_head_ctx, batch, heads, nq, d), probs)
    }

    /// Gradients of q `[B·Q, H]`, k and v `[B·S, H]` from that of the context.
    fn attention_backward(
        &self,
        cache: &BlockCache<F>,
        d_context: &[F],
        batch: usize,
        seq: usize,
        nq: usize,
    ) -> (Vec<F>, Vec<F>, Vec<F>) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = F::of(1.0 / (d as f64).sqrt());
        let (q, k, v, probs) = (&cache.q, &cache.k, &cache.v, &cache.probs);
        let mut d_q = vec![F::zero(); batch * heads * nq * d];
        let mut d_k = vec![F::zero(); batch * heads * seq * d];
        let mut d_v = vec![F::zero(); batch * heads * seq * d];
        d_q.par_chunks_mut(nq * d)
            .zip(d_k.par_chunks_mut(seq * d))
            .zip(d_v.par_chunks_mut(seq * d))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| {
                let (b, hd) = (bh / heads, bh % heads);
                let p = &probs[bh * nq * seq..(bh + 1) * nq * seq];
                let mut dp = vec![F::zero(); seq];
                for i in 0..nq {
                    let dc = &d_context[(b * nq + i) * h + hd * d..][..d];
                    let pi = &p[i * seq..(i + 1) * seq];
                    let mut weighted = F::zero();
                    for j in 0..seq {
                        let vj = &v[(b * seq + j) * h + hd * d..][..d];
                        dp[j] = dot(dc, vj);
                        weighted += pi[j] * dp[j];
                        for (g, &c) in dv[j * d..(j + 1) * d].iter_mut().zip(dc) {
                            *g += pi[j] * c;
                        }
                    }
                    let qi = &q[(b * nq + i) * h + hd * d..][..d];
                    let dqi = &mut dq[i * d..(i + 1) * d];
                    for j in 0..seq {
                        let ds = pi[j] * (dp[j] - weighted) * scale;
                        let kj = &k[(b * seq + j) * h + hd * d..][..d];
                        for (g, &kk) in dqi.iter_mut().zip(kj) {
                            *g += ds * kk;
                        }
                        for (g, &qq) in dk[j * d..(j + 1) * d].iter_mut().zip(qi) {
                            *g += ds * qq;
                        }
                    }
                }
            });
        (
            heads_to_rows(&d_q, batch, heads, nq, d),
            heads_to_rows(&d_k, batch, heads, seq, d),
            heads_to_rows(&d_v, batch, heads, seq, d),
        )
    }
}

#[derive(Debug, Clone)]
struct HeadCache<F> {
    pre: Vec<F>,
    norm: NormCache<F>,
}

fn dot<F: Real>(a: &[F], b: &[F]) -> F {
    a.iter().zip(b).fold(F::zero(), |s, (&x, &y)| s + x * y)
}

/// `[B, heads, R, d]` → `[B·R, heads·d]`.
fn heads_to_rows<F: Real>(x: &[F], batch: usize, heads: usize, rows: usize, d: usize) -> Vec<F> {
    let mut out = vec![F::zero(); x.len()];
    for b in 0..batch {
        for hd in 0..heads {
            for r in 0..rows {
                let src = &x[((b * heads + hd) * rows + r) * d..][..d];
                out[(b * rows + r) * heads * d + hd * d..][..d].copy_from_slice(src);
            }
        }
    }
    out
}

/// The query rows of `x [B·S, H]`: all of them (borrowed), or one position per batch item.
fn query_rows<F: Real>(
    x: &[F],
    batch: usize,
    seq: usize,
    h: usize,
    rows: Rows,
) -> (usize, Cow<'_, [F]>) {
    match rows {
        Rows::All => (seq, Cow::Borrowed(x)),
        Rows::One(p) => (
            1,
            (0..batch)
                .flat_map(|b| x[(b * seq + p) * h..(b * seq + p + 1) * h].iter().copied())
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::model::load::model_from_tensors;
    use crate::model::random::{random_tensors, tiny_config, Layout};

    fn tiny(dtype: DType) -> BertMaskedLm {
        let cfg = tiny_config(18, 16, 3, 24);
        let tensors = random_tensors(&cfg, Layout::default(), 5, 0.5).unwrap();
        model_from_tensors(tensors, &cfg, dtype, &Device::Cpu, Path::new("tiny")).unwrap()
    }

    const IDS: [u32; 8] = [2, 5, 6, 7, 4, 13, 9, 3];
    const MASK: usize = 4;
    const GOLD: usize = 10;

    fn base(engine: &Engine<f64>, model: &BertMaskedLm) -> BaseForward<f64> {
        let ids = Tensor::new(&IDS, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let embedded = f64::from_tensor(&model.embeddings.forward(&ids).unwrap()).unwrap();
        engine.base_forward(embedded, MASK)
    }

    /// The engine's forward agrees with the candle model (a separate implementation).
    #[test]
    fn forward_matches_the_candle_model() {
        let model = tiny(DType::F64);
        let engine = Engine::<f64>::new(&model).unwrap();
        let base = base(&engine, &model);
        let ids = Tensor::new(&IDS, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let capture = crate::model::ActivationCapture::new(vec![MASK]);
        let probs: Vec<f64> = model
            .probabilities_at(&ids, None, &[MASK], &capture)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in base.probabilities.iter().zip(&probs) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        for (layer, t) in capture.into_layers().iter().enumerate() {
            let want: Vec<f64> = t.squeeze(0).unwrap().to_vec1().unwrap();
            for (a, b) in base.neurons[layer].iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "layer {layer}: {a} vs {b}");
            }
        }
        // α = 1 through the IG path gives the same probability as the plain forward.
        for layer in 0..engine.layers() {
            let (p, _) = engine.scaled_gradients(&base, layer, &[1.0], GOLD);
            assert!((p[0] - probs[GOLD]).abs() < 1e-12, "layer {layer}");
        }
    }

    /// dP/d(neurons) from the activation-only backward equals central finite
    /// differences, at every layer and at several points α of the path.
    #[test]
    fn scaled_gradients_match_finite_differences() {
        let model = tiny(DType::F64);
        let engine = Engine::<f64>::new(&model).unwrap();
        let base = base(&engine, &model);
        let width = engine.intermediate();
        let alphas = [0.0, 0.35, 1.0];
        for layer in 0..engine.layers() {
            let (_, grads) = engine.scaled_gradients(&base, layer, &alphas, GOLD);
            for (b, &alpha) in alphas.iter().enumerate() {
                let mut largest = 0f64;
                for i in 0..width {
                    // P at the point α·w with neuron i moved by ±ε: a base whose w is
                    // α·w ± ε·e_i, evaluated at α = 1.
                    let eps = 1e-6;
                    let p_at = |delta: f64| {
                        let mut moved = base.clone();
                        for x in moved.neurons[layer].iter_mut() {
                            *x *= alpha;
                        }
                        moved.neurons[layer][i] += delta;
                        engine.scaled_gradients(&moved, layer, &[1.0], GOLD).0[0]
                    };
                    let fd = (p_at(eps) - p_at(-eps)) / (2.0 * eps);
                    let g = grads[b * width + i];
                    assert!(
                        (g - fd).abs() <= 1e-8 + 1e-5 * fd.abs(),
                        "layer {layer} α {alpha} neuron {i}: backward {g} vs finite difference {fd}"
                    );
                    largest = largest.max(g.abs());
                }
                assert!(largest > 1e-4, "layer {layer} α {alpha}: gradient ~0");
            }
        }
    }

    /// The f32 engine (what kn runs) is close to the f64 one.
    #[test]
    fn f32_gradients_are_close_to_f64() {
        let model64 = tiny(DType::F64);
        let e64 = Engine::<f64>::new(&model64).unwrap();
        let e32 = Engine::<f32>::new(&model64).unwrap();
        let b64 = base(&e64, &model64);
        let ids = Tensor::new(&IDS, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let emb = f32::from_tensor(&model64.embeddings.forward(&ids).unwrap()).unwrap();
        let b32 = e32.base_forward(emb, MASK);
        for layer in 0..e64.layers() {
            let (_, g64) = e64.scaled_gradients(&b64, layer, &[0.5], GOLD);
            let (_, g32) = e32.scaled_gradients(&b32, layer, &[0.5], GOLD);
            let scale = g64.iter().fold(0f64, |m, g| m.max(g.abs()));
            for (a, b) in g64.iter().zip(&g32) {
                assert!(
                    (a - f64::from(*b)).abs() <= 1e-4 * scale,
                    "layer {layer}: {a} vs {b}"
                );
            }
        }
    }
}
