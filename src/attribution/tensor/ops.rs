//! The numeric kernels of the tensor engines ([`super::bert`], [`super::decoder`]), in
//! candle ops that run on any device (cuBLAS products and candle's CUDA kernels on a GPU):
//! dense layers and their input gradients, LayerNorm and RMSNorm with their backward
//! passes, activations with their slopes, softmax and the gold probability's gradient.
//! Every backward here is written by hand, so no gradient of a weight is ever formed
//! (candle's autograd would form one for every product it goes through).
//!
//! Activations are 2-D `[rows, width]` throughout; weights keep PyTorch's `[out, in]`.

use candle_core::{DType, Device, Tensor, D};

use crate::attribution::engine::LayerGradients;
use crate::attribution::kernels::Real;
use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::model::nn::{LayerNorm, Linear, RmsNorm};

/// candle's result, for the kernels' own use.
pub(super) type Ops<T> = candle_core::Result<T>;

/// The dtypes a tensor engine computes in: `activations` for everything it keeps
/// (activations, norms, softmax, attention, gradients), `products` for the operands of
/// the weight products (the dense layers and the vocabulary head). The same dtype for
/// both is plain f32 or f64; bf16 or f16 products are mixed precision as PyTorch's
/// autocast does it: the weights stored and multiplied in 16 bits (cuBLAS and candle's
/// CPU products accumulate in f32), each product's result widened back to
/// `activations` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtypes {
    /// What activations and gradients are kept in.
    pub activations: DType,
    /// What the weight products take their operands in.
    pub products: DType,
}

/// `x · w` with `w` in the products' dtype, the result in `x`'s dtype.
fn product(x: &Tensor, w: &Tensor) -> Ops<Tensor> {
    if x.dtype() == w.dtype() {
        x.matmul(w)
    } else {
        x.to_dtype(w.dtype())?.matmul(w)?.to_dtype(x.dtype())
    }
}

/// A dense layer `y = x·Wᵀ + b` on the engine's device: the weight in the products'
/// dtype, the bias in the activations'.
#[derive(Debug, Clone)]
pub(super) struct Dense {
    /// `[out, in]`
    weight: Tensor,
    /// `[out]`
    bias: Option<Tensor>,
}

impl Dense {
    /// A model's layer in `dtypes` (no copy when it is already in them).
    pub(super) fn new(linear: &Linear, dtypes: Dtypes) -> Result<Self> {
        Self::from_parts(&linear.weight, linear.bias.as_ref(), dtypes)
    }

    /// A layer from its weight `[out, in]` and bias.
    pub(super) fn from_parts(
        weight: &Tensor,
        bias: Option<&Tensor>,
        dtypes: Dtypes,
    ) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(dtypes.products)?.contiguous()?,
            bias: bias.map(|b| b.to_dtype(dtypes.activations)).transpose()?,
        })
    }

    /// `[R, in]` → `[R, out]`.
    pub(super) fn forward(&self, x: &Tensor) -> Ops<Tensor> {
        let y = product(x, &self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The input's gradient `[R, in]` from the output's `[R, out]`: `dy·W`.
    pub(super) fn backward_input(&self, dy: &Tensor) -> Ops<Tensor> {
        product(dy, &self.weight)
    }
}

/// LayerNorm (with a bias) or RMSNorm over the last dimension.
#[derive(Debug, Clone)]
pub(super) struct Norm {
    weight: Tensor,
    /// `None`: RMSNorm (no centring, no bias).
    bias: Option<Tensor>,
    eps: f64,
}

/// What a norm's backward needs: the normalised input and `1/σ` per row.
#[derive(Debug, Clone)]
pub(super) struct NormCache {
    xhat: Tensor,
    /// `[R, 1]`
    rstd: Tensor,
}

impl Norm {
    /// A model's LayerNorm.
    pub(super) fn layer(norm: &LayerNorm, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: norm.weight.to_dtype(dtype)?,
            bias: Some(norm.bias.to_dtype(dtype)?),
            eps: norm.eps,
        })
    }

    /// A model's RMSNorm.
    pub(super) fn rms(norm: &RmsNorm, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: norm.weight.to_dtype(dtype)?,
            bias: None,
            eps: norm.eps,
        })
    }

    /// `[R, H]` → `[R, H]`, with the cache of its backward.
    pub(super) fn forward(&self, x: &Tensor) -> Ops<(Tensor, NormCache)> {
        let centred = match self.bias {
            Some(_) => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
            None => x.clone(),
        };
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (variance + self.eps)?.sqrt()?.recip()?;
        let xhat = centred.broadcast_mul(&rstd)?;
        let mut y = xhat.broadcast_mul(&self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok((y, NormCache { xhat, rstd }))
    }

    /// The input's gradient from the output's: `rstd · (g − mean(g) − x̂·mean(g⊙x̂))`
    /// with `g = dy ⊙ weight` (RMSNorm: without `mean(g)`).
    pub(super) fn backward(&self, dy: &Tensor, cache: &NormCache) -> Ops<Tensor> {
        let g = dy.broadcast_mul(&self.weight)?;
        let projection = (&g * &cache.xhat)?.mean_keepdim(D::Minus1)?;
        let mut dx = (&g - cache.xhat.broadcast_mul(&projection)?)?;
        if self.bias.is_some() {
            dx = dx.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
        }
        dx.broadcast_mul(&cache.rstd)
    }
}

/// `f(pre)` and `f'(pre)`, elementwise (the formulas of `kernels::act` and `act_grad`).
pub(super) fn activate(kind: Activation, pre: &Tensor) -> Ops<(Tensor, Tensor)> {
    match kind {
        Activation::GeluErf => {
            let cdf = ((pre * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
            let cdf = cdf?;
            let pdf = (pre.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
            Ok(((pre * &cdf)?, (&cdf + (pre * pdf?)?)?))
        }
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let a = 0.044715;
            let cube = pre.sqr()?.mul(pre)?;
            let t = ((pre + (cube * a)?)? * c)?.tanh()?;
            let one_plus = (&t + 1.0)?;
            let value = ((pre * 0.5)? * &one_plus)?;
            let inner = ((pre.sqr()? * (3.0 * a))? + 1.0)?;
            let sech2 = (1.0 - t.sqr()?)?;
            let slope = ((one_plus * 0.5)? + (((pre * 0.5)? * sech2)? * (inner * c)?)?)?;
            Ok((value, slope))
        }
        Activation::Relu => Ok((pre.relu()?, pre.gt(0.0)?.to_dtype(pre.dtype())?)),
        Activation::Silu => {
            let sigmoid = (pre.neg()?.exp()? + 1.0)?.recip()?;
            let value = (pre * &sigmoid)?;
            let slope = (&sigmoid * ((pre * (1.0 - &sigmoid)?)? + 1.0)?)?;
            Ok((value, slope))
        }
    }
}

/// Softmax over the last dimension (candle's fused kernel: nothing is differentiated
/// through it here, the backward passes are written out).
pub(super) fn softmax(x: &Tensor) -> Ops<Tensor> {
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// From the probabilities `[R, V]`: `P_gold` per row `[R]`, and the gradient of `P_gold`
/// with respect to the logits, `P_gold·(δ_gold − p)`, `[R, V]`.
pub(super) fn gold_probability_gradient(probs: &Tensor, gold: usize) -> Ops<(Tensor, Tensor)> {
    let v = probs.dim(1)?;
    let p_gold = probs.narrow(1, gold, 1)?;
    let mut onehot = vec![0f32; v];
    onehot[gold] = 1.0;
    let onehot = Tensor::from_vec(onehot, (1, v), probs.device())?.to_dtype(probs.dtype())?;
    let d_logits = onehot.broadcast_sub(probs)?.broadcast_mul(&p_gold)?;
    Ok((p_gold.flatten_all()?, d_logits))
}

/// `alphas[b] · w` for each b: `[B, I]` from `w [1, I]`.
pub(super) fn scaled(w: &Tensor, alphas: &[f64]) -> Ops<Tensor> {
    let alphas = Tensor::from_vec(alphas.to_vec(), (alphas.len(), 1), w.device())?;
    alphas.to_dtype(w.dtype())?.broadcast_mul(w)
}

/// Rows along dimension 0, or the one tensor itself (no copy).
pub(super) fn cat_rows(parts: Vec<Tensor>) -> Ops<Tensor> {
    cat_along(parts, 0)
}

/// `parts` concatenated along `dim`, or the one part itself (no copy).
pub(super) fn cat_along(mut parts: Vec<Tensor>, dim: usize) -> Ops<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    Tensor::cat(&parts, dim)
}

/// The rows of several requests (prompts) in one stacked tensor, request by request:
/// block `k` holds request `k`'s groups in the order they entered. The dense products
/// run on all rows at once; attention, which each prompt does over its own sequence,
/// runs block by block.
#[derive(Debug, Clone)]
pub(super) struct Blocks {
    /// Rows per block.
    pub rows: Vec<usize>,
}

impl Blocks {
    /// `n` empty blocks.
    pub fn new(n: usize) -> Self {
        Self { rows: vec![0; n] }
    }

    /// Each block's first row and row count.
    pub fn spans(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.rows
            .iter()
            .map(|&rows| {
                start += rows;
                (start - rows, rows)
            })
            .collect()
    }

    /// `stack` with `new[k]`'s rows (where some) appended at the end of block `k`.
    pub fn push(&mut self, stack: Option<Tensor>, new: &[Option<Tensor>]) -> Ops<Tensor> {
        let spans = self.spans();
        // Block by block; one request's stack is the old rows, then the new.
        let mut parts = Vec::with_capacity(2 * new.len());
        for (k, added) in new.iter().enumerate() {
            let (start, rows) = spans[k];
            if let (Some(stack), true) = (&stack, rows > 0) {
                parts.push(stack.narrow(0, start, rows)?);
            }
            if let Some(added) = added {
                self.rows[k] += added.dim(0)?;
                parts.push(added.clone());
            }
        }
        match stack {
            Some(stack) if new.iter().all(Option::is_none) => Ok(stack),
            _ => cat_rows(parts),
        }
    }

    /// Takes `take[k]` rows off the end of each block `k`: what stays (`None` when
    /// nothing does) and the rows taken from each block.
    pub fn pop(
        &mut self,
        stack: &Tensor,
        take: &[usize],
    ) -> Ops<(Option<Tensor>, Vec<Option<Tensor>>)> {
        let spans = self.spans();
        let (mut kept, mut taken) = (Vec::new(), Vec::with_capacity(take.len()));
        for (k, &n) in take.iter().enumerate() {
            let (start, rows) = spans[k];
            if rows > n {
                kept.push(stack.narrow(0, start, rows - n)?);
            }
            taken.push(
                (n > 0)
                    .then(|| stack.narrow(0, start + rows - n, n))
                    .transpose()?,
            );
            self.rows[k] -= n;
        }
        let rest = if kept.is_empty() {
            None
        } else {
            Some(cat_rows(kept)?)
        };
        Ok((rest, taken))
    }
}

/// The candle device of a model's tensor, named as kn names devices.
pub(super) fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

/// A tensor's values on the host, an error as candle's (a host copy's is one).
pub(super) fn host<F: Real>(t: &Tensor) -> Ops<Vec<F>> {
    F::from_tensor(t).map_err(|e| match e {
        Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    })
}

/// A joint batch's results on the host, request by request: `gold_p [rows]` the gold
/// probability of every row of the head, request `r`'s rows `spans[r]` (its groups in
/// order, `points[r]` rows each); `d_own[r][g]` its group `g`'s gradients.
pub(super) fn layer_results<F: Real>(
    gold_p: &Tensor,
    spans: &[(usize, usize)],
    points: &[usize],
    d_own: Vec<Vec<Option<Tensor>>>,
) -> Ops<Vec<Vec<LayerGradients<F>>>> {
    let gold_p = host::<F>(gold_p)?;
    d_own
        .into_iter()
        .zip(spans.iter().zip(points))
        .map(|(d_own, (&(start, rows), &b))| {
            d_own
                .into_iter()
                .zip(gold_p[start..start + rows].chunks(b))
                .map(|(gradients, p)| {
                    Ok(LayerGradients {
                        probabilities: p.to_vec(),
                        gradients: host(&gradients.expect("every group left the stack"))?,
                    })
                })
                .collect()
        })
        .collect()
}
