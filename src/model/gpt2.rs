//! GPT-2 causal language model, written with differentiable candle ops only, with
//! access to every FFN neuron: the input of `mlp.c_proj`, `gelu_new(c_fc(x))`.
//!
//! Weights by their Hugging Face names without the `transformer.` prefix (`wte.weight`,
//! `h.3.mlp.c_proj.weight`, `ln_f.weight`, `lm_head.weight`). GPT-2 stores its dense
//! layers as Conv1D, `[in, out]`; they are transposed to `[out, in]` at load time, so
//! neuron `i`'s value slot, row `i` of `h.L.mlp.c_proj.weight` in the file, is column `i`
//! of [`Gpt2Block::c_proj`]'s weight here, as for every other architecture.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::bert::FfnHook;
use super::config::{Activation, Config};
use super::nn::{activate, causal_bias, output_head, softmax_last_dim, LayerNorm, Linear};
use crate::error::Result;

/// One GPT-2 block: pre-norm attention and pre-norm FFN, each with a residual.
#[derive(Debug, Clone)]
pub struct Gpt2Block {
    /// `ln_1`
    pub ln_1: LayerNorm,
    /// `attn.c_attn`: hidden → 3·hidden (queries, keys, values)
    pub c_attn: Linear,
    /// `attn.c_proj`: hidden → hidden
    pub attn_proj: Linear,
    /// `ln_2`
    pub ln_2: LayerNorm,
    /// `mlp.c_fc`: hidden → intermediate
    pub c_fc: Linear,
    /// `mlp.c_proj`: intermediate → hidden (the neurons' value slots are its columns here).
    pub c_proj: Linear,
}

impl Gpt2Block {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), h, eps)?,
            c_attn: Linear::load_conv1d(vb.pp("attn").pp("c_attn"), h, 3 * h)?,
            attn_proj: Linear::load_conv1d(vb.pp("attn").pp("c_proj"), h, h)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), h, eps)?,
            c_fc: Linear::load_conv1d(vb.pp("mlp").pp("c_fc"), h, i)?,
            c_proj: Linear::load_conv1d(vb.pp("mlp").pp("c_proj"), i, h)?,
        })
    }
}

/// A GPT-2 causal LM: token and position embeddings, blocks, final LayerNorm, head.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    /// The checkpoint's configuration.
    pub config: Config,
    /// `wte.weight` `[vocab, hidden]`: the input embeddings E.
    pub wte: Tensor,
    /// `wpe.weight` `[n_positions, hidden]`
    pub wpe: Tensor,
    /// Blocks, bottom first.
    pub blocks: Vec<Gpt2Block>,
    /// `ln_f`
    pub ln_f: LayerNorm,
    /// `lm_head.weight` `[vocab, hidden]`, or `wte` itself when tied.
    pub lm_head: Tensor,
    activation: Activation,
}

impl Gpt2 {
    /// Builds the model from weights named as in `GPT2LMHeadModel` without the
    /// `transformer.` prefix. Every shape is checked against `cfg` here.
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let wte = vb.get((v, h), "wte.weight")?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Gpt2Block::load(vb.pp("h").pp(i), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = output_head(&vb, &wte, cfg.tie_word_embeddings)?;
        Ok(Self {
            config: cfg.clone(),
            wpe: vb.get((cfg.max_position_embeddings, h), "wpe.weight")?,
            ln_f: LayerNorm::load(vb.pp("ln_f"), h, cfg.layer_norm_eps)?,
            wte,
            blocks,
            lm_head,
            activation: cfg.activation(),
        })
    }

    /// Runs every block: `[batch, seq]` ids (right-padded; `keep` 0 on padding) → final
    /// hidden states `[batch, seq, hidden]` after `ln_f`.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        keep: Option<&Tensor>,
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let (dtype, device) = (self.wte.dtype(), self.wte.device());
        let bias = causal_bias(keep, batch, seq, dtype, device)?;
        let (h, heads) = (self.config.hidden_size, self.config.num_attention_heads);
        let d = h / heads;
        let words = self
            .wte
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, h))?;
        let mut x = words.broadcast_add(&self.wpe.narrow(0, 0, seq)?)?;
        for (index, block) in self.blocks.iter().enumerate() {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?;
            let part = |n: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, n * h, h)?
                    .reshape((batch, seq, heads, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(&bias)?;
            let context = softmax_last_dim(&scores)?
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((batch, seq, h))?;
            x = (x + block.attn_proj.forward(&context)?)?;
            let normed = block.ln_2.forward(&x)?;
            let neurons = activate(self.activation, &block.c_fc.forward(&normed)?)?;
            let neurons = hook.apply(index, neurons)?;
            x = (x + block.c_proj.forward(&neurons)?)?;
        }
        Ok(self.ln_f.forward(&x)?)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }
}
