//! Llama-family causal language model (Llama 2/3, Mistral, SmolLM; Qwen2 with its q/k/v
//! biases), written with differentiable candle ops only, with access to every FFN
//! neuron: the input of `mlp.down_proj`, `silu(gate_proj(x)) ⊙ up_proj(x)`.
//!
//! Weights by their Hugging Face names without the `model.` prefix
//! (`embed_tokens.weight`, `layers.3.mlp.down_proj.weight`, `norm.weight`,
//! `lm_head.weight`); a GGUF file's names are mapped to these by [`super::gguf`].
//! Neuron `i`'s value slot is column `i` of `layers.L.mlp.down_proj.weight`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::bert::FfnHook;
use super::config::{Activation, Config};
use super::nn::{activate, causal_bias, output_head, softmax_last_dim, Linear, RmsNorm};
use super::rope::Rope;
use crate::error::Result;

/// Rotary position embedding of `x [batch, heads, seq, head_dim]`:
/// `x·cos + rotate_half(x)·sin`, with `rotate_half(x) = [−x₂, x₁]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(3)?;
    let (first, second) = (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[second.neg()?, first], 3)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// Grouped-query self-attention with rotary positions (`self_attn.*`).
#[derive(Debug, Clone)]
pub struct LlamaAttention {
    /// `q_proj`: hidden → heads·head_dim
    pub q_proj: Linear,
    /// `k_proj`: hidden → kv_heads·head_dim
    pub k_proj: Linear,
    /// `v_proj`: hidden → kv_heads·head_dim
    pub v_proj: Linear,
    /// `o_proj`: heads·head_dim → hidden
    pub o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl LlamaAttention {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::load_with(vb.pp("q_proj"), h, heads * d, bias)?,
            k_proj: Linear::load_with(vb.pp("k_proj"), h, kv * d, bias)?,
            v_proj: Linear::load_with(vb.pp("v_proj"), h, kv * d, bias)?,
            // Llama's `attention_bias` also puts a bias on o_proj; Qwen2 never does.
            o_proj: Linear::load_with(
                vb.pp("o_proj"),
                heads * d,
                h,
                bias && cfg.model_type.as_deref() != Some("qwen2"),
            )?,
            heads,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`; `bias` `[batch, 1, seq, seq]`.
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let d = self.head_dim;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((batch, seq, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = rotate(&heads(self.q_proj.forward(x)?, self.heads)?, cos, sin)?;
        let k = rotate(&heads(self.k_proj.forward(x)?, self.kv_heads)?, cos, sin)?;
        let v = heads(self.v_proj.forward(x)?, self.kv_heads)?;
        // Each key/value head serves `group` query heads, consecutive.
        let group = self.heads / self.kv_heads;
        let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
            if group == 1 {
                return Ok(t);
            }
            t.unsqueeze(2)?
                .broadcast_as((batch, self.kv_heads, group, seq, d))?
                .reshape((batch, self.heads, seq, d))
        };
        let (k, v) = (repeat(k)?.contiguous()?, repeat(v)?.contiguous()?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(bias)?;
        let context = softmax_last_dim(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, self.heads * d))?;
        self.o_proj.forward(&context)
    }
}

/// The SwiGLU FFN (`mlp.*`): `down_proj(silu(gate_proj(x)) ⊙ up_proj(x))`.
#[derive(Debug, Clone)]
pub struct LlamaMlp {
    /// `gate_proj`: hidden → intermediate
    pub gate_proj: Linear,
    /// `up_proj`: hidden → intermediate
    pub up_proj: Linear,
    /// `down_proj`: intermediate → hidden (the neurons' value slots are its columns).
    pub down_proj: Linear,
}

/// One decoder layer: pre-norm attention, pre-norm FFN, each with a residual.
#[derive(Debug, Clone)]
pub struct LlamaLayer {
    /// `input_layernorm`
    pub input_layernorm: RmsNorm,
    /// `self_attn`
    pub self_attn: LlamaAttention,
    /// `post_attention_layernorm`
    pub post_attention_layernorm: RmsNorm,
    /// `mlp`
    pub mlp: LlamaMlp,
}

impl LlamaLayer {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), h, eps)?,
            self_attn: LlamaAttention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, eps)?,
            mlp: LlamaMlp {
                gate_proj: Linear::load_no_bias(mlp.pp("gate_proj"), h, i)?,
                up_proj: Linear::load_no_bias(mlp.pp("up_proj"), h, i)?,
                down_proj: Linear::load_no_bias(mlp.pp("down_proj"), i, h)?,
            },
        })
    }
}

/// A Llama-family causal LM: embeddings, decoder layers, final norm, output head.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The checkpoint's configuration.
    pub config: Config,
    /// `embed_tokens.weight` `[vocab, hidden]`: the input embeddings E.
    pub embed_tokens: Tensor,
    /// Decoder layers, bottom first.
    pub layers: Vec<LlamaLayer>,
    /// `norm`: the final RMSNorm.
    pub norm: RmsNorm,
    /// `lm_head.weight` `[vocab, hidden]`, or `embed_tokens` itself when tied.
    pub lm_head: Tensor,
}

impl Llama {
    /// Builds the model from weights named as in `LlamaForCausalLM` without the
    /// `model.` prefix. Every shape is checked against `cfg` here.
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = vb.get((v, h), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaLayer::load(vb.pp("layers").pp(i), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = output_head(&vb, &embed_tokens, cfg.tie_word_embeddings)?;
        Ok(Self {
            config: cfg.clone(),
            norm: RmsNorm::load(vb.pp("norm"), h, cfg.layer_norm_eps)?,
            embed_tokens,
            layers,
            lm_head,
        })
    }

    /// Runs every layer: `[batch, seq]` ids (right-padded; `keep` 0 on padding) → final
    /// hidden states `[batch, seq, hidden]` after the final norm.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        keep: Option<&Tensor>,
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let (dtype, device) = (self.embed_tokens.dtype(), self.embed_tokens.device());
        let bias = causal_bias(keep, batch, seq, dtype, device)?;
        let d = self.config.head_dim();
        let rope = Rope::of(&self.config);
        let table = |t: Vec<f64>, rows: usize| -> candle_core::Result<Tensor> {
            Tensor::from_vec(t, (rows, 1, seq, d), device)?.to_dtype(dtype)
        };
        let dynamic = rope.scaling.as_ref().is_some_and(|s| s.depends_on_length());
        let (cos, sin) = match keep {
            // `dynamic` frequencies depend on the length: each right-padded row gets
            // those of its own tokens, as when it runs alone.
            Some(keep) if dynamic => {
                let keep: Vec<u32> = keep.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
                let (mut cos, mut sin) = (Vec::new(), Vec::new());
                for row in keep.chunks(seq) {
                    let length = row.iter().filter(|&&k| k != 0).count();
                    let (c, s) = rope.tables_of(length, seq);
                    cos.extend(c);
                    sin.extend(s);
                }
                (table(cos, batch)?, table(sin, batch)?)
            }
            _ => {
                let (cos, sin) = rope.tables(seq);
                (table(cos, 1)?, table(sin, 1)?)
            }
        };
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, ()))?;
        for (index, layer) in self.layers.iter().enumerate() {
            let attended =
                layer
                    .self_attn
                    .forward(&layer.input_layernorm.forward(&x)?, &bias, &cos, &sin)?;
            x = (x + attended)?;
            let normed = layer.post_attention_layernorm.forward(&x)?;
            let mlp = &layer.mlp;
            let neurons = activate(Activation::Silu, &mlp.gate_proj.forward(&normed)?)?
                .mul(&mlp.up_proj.forward(&normed)?)?;
            let neurons = hook.apply(index, neurons)?;
            x = (x + mlp.down_proj.forward(&neurons)?)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }
}
