//! Building blocks every architecture's candle forward pass shares, written with
//! differentiable candle ops only (candle's fused LayerNorm and softmax record no
//! backward, so a gradient through them would be silently wrong): dense layers, the
//! norms, activations, softmax.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;

/// `v` (`[n]`) repeated to the shape of `like` (`[..., n]`), as `broadcast_add` and
/// `broadcast_mul` would repeat it, but as the product of a column of ones with `v`, so
/// that its backward is a matrix product: candle's backward of a broadcast sums over the
/// leading dimensions one element at a time, with integer divisions per element, and took
/// 29% of the time of training (`examples/train-fact-model.rs`). The values are the same
/// to the bit (`1 · v` is `v`).
pub fn rows_of(v: &Tensor, like: &Tensor) -> candle_core::Result<Tensor> {
    let n = v.dim(0)?;
    let rows = like.elem_count() / n;
    let ones = Tensor::ones((rows, 1), v.dtype(), v.device())?;
    ones.matmul(&v.reshape((1, n))?)?.reshape(like.shape())
}

/// A dense layer `y = x·Wᵀ (+ b)`, weights in PyTorch's `[out, in]` layout (GPT-2's
/// Conv1D `[in, out]` weights are transposed at load time).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`, when the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `weight` and `bias` under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: Some(vb.get(out_dim, "bias")?),
        })
    }

    /// `weight` only.
    pub fn load_no_bias(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: None,
        })
    }

    /// `weight` and, when `bias`, `bias`.
    pub fn load_with(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Self> {
        if bias {
            Self::load(vb, in_dim, out_dim)
        } else {
            Self::load_no_bias(vb, in_dim, out_dim)
        }
    }

    /// A Conv1D layer (GPT-2): `weight [in, out]` in the checkpoint, kept `[out, in]`.
    pub fn load_conv1d(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((in_dim, out_dim), "weight")?.t()?.contiguous()?,
            bias: Some(vb.get(out_dim, "bias")?),
        })
    }

    /// `[..., in]` → `[..., out]`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let product = x.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(bias) => product.add(&rows_of(bias, &product)?),
            None => Ok(product),
        }
    }
}

/// LayerNorm over the last dimension, from plain differentiable ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `[hidden]`
    pub weight: Tensor,
    /// `[hidden]`
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// `weight` and `bias` under `vb`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    /// `[..., hidden]` → `[..., hidden]`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed
            .mul(&rows_of(&self.weight, &normed)?)?
            .add(&rows_of(&self.bias, &normed)?)
    }
}

/// RMSNorm over the last dimension (Llama): `x / √(mean(x²) + ε) · weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[hidden]`
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// `weight` under `vb`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// `[..., hidden]` → `[..., hidden]`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?;
        normed.mul(&rows_of(&self.weight, &normed)?)
    }
}

/// Applies the configured activation function. The tanh GELU and SiLU are built from
/// ops whose backward is exact: candle's own `gelu` differentiates with rounded
/// constants (a relative error of 1e-7 in the gradient).
pub fn activate(act: Activation, x: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = ((x + (x.sqr()?.mul(x)? * 0.044715)?)? * c)?;
            (x * 0.5)?.mul(&(inner.tanh()? + 1.0)?)
        }
        Activation::Relu => x.relu(),
        Activation::Silu => x.mul(&(x.neg()?.exp()? + 1.0)?.recip()?),
    }
}

/// Softmax over the last dimension from differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)
}

/// The most negative finite value of `dtype`: an additive attention bias that gives a
/// key exactly zero weight, as `transformers` does.
pub fn most_negative(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F16 => -65504.0,
        _ => f32::MIN as f64,
    }
}

/// Additive attention bias `[batch, 1, seq, seq]` of a causal model: key `j` is hidden
/// from query `i` when `j > i` or when `keep[b, j]` is 0 (padding).
pub fn causal_bias(
    keep: Option<&Tensor>,
    batch: usize,
    seq: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let keep: Vec<u32> = match keep {
        Some(k) => k.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?,
        None => vec![1; batch * seq],
    };
    let min = most_negative(dtype);
    let mut bias = vec![0f64; batch * seq * seq];
    for b in 0..batch {
        for i in 0..seq {
            for j in 0..seq {
                if j > i || keep[b * seq + j] == 0 {
                    bias[(b * seq + i) * seq + j] = min;
                }
            }
        }
    }
    Tensor::from_vec(bias, (batch, 1, seq, seq), device)?.to_dtype(dtype)
}

/// A causal LM's output head `[vocab, hidden]`: `lm_head.weight` when the checkpoint
/// has it (a tied checkpoint may carry a copy), else the input embeddings when
/// `tie_word_embeddings` says so.
pub fn output_head(
    vb: &VarBuilder,
    embeddings: &Tensor,
    tied: bool,
) -> candle_core::Result<Tensor> {
    if vb.contains_tensor("lm_head.weight") {
        vb.get(embeddings.dims2()?, "lm_head.weight")
    } else if tied {
        Ok(embeddings.clone())
    } else {
        candle_core::bail!(
            "lm_head.weight is missing and tie_word_embeddings is false in config.json"
        )
    }
}
