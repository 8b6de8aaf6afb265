//! BERT masked language model, written with differentiable candle ops only, with
//! access to every FFN neuron (the post-activation intermediate output of each layer).
//!
//! Weights are looked up by their Hugging Face names (`embeddings.word_embeddings.weight`,
//! `encoder.layer.3.intermediate.dense.weight`, `cls.predictions.bias`, …) after
//! [`super::load`] has normalised prefixes and old `gamma`/`beta` names.
//!
//! Why not candle-transformers' `BertModel`: its FFN activations are private and its
//! fused LayerNorm and softmax record no backward graph, so gradients through them
//! would be silently wrong. Everything here is built from ops candle differentiates.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, Config};
use super::nn::most_negative;
pub use super::nn::{activate, softmax_last_dim, LayerNorm, Linear};
use crate::error::Result;

/// Word, position and segment embeddings, summed and normalised.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    /// `[vocab, hidden]`: also the MLM decoder when weights are tied.
    pub word_embeddings: Tensor,
    /// `[max_positions, hidden]`
    pub position_embeddings: Tensor,
    /// `[type_vocab, hidden]`
    pub token_type_embeddings: Tensor,
    /// Applied to the sum.
    pub layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word_embeddings: vb.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position_embeddings: vb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type_embeddings: vb.get(
                (cfg.type_vocab_size.max(1), h),
                "token_type_embeddings.weight",
            )?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        })
    }

    /// `[batch, seq]` token ids (segment 0) → `[batch, seq, hidden]`
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let words = self
            .word_embeddings
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, ()))?;
        let positions = self.position_embeddings.narrow(0, 0, seq)?;
        let segment = self.token_type_embeddings.i(0)?;
        let summed = words.broadcast_add(&positions)?.broadcast_add(&segment)?;
        self.layer_norm.forward(&summed)
    }
}

/// Multi-head self-attention with its output projection, residual and LayerNorm
/// (`attention.self.*` and `attention.output.*`).
#[derive(Debug, Clone)]
pub struct BertAttention {
    /// `attention.self.query`
    pub query: Linear,
    /// `attention.self.key`
    pub key: Linear,
    /// `attention.self.value`
    pub value: Linear,
    /// `attention.output.dense`
    pub output: Linear,
    /// `attention.output.LayerNorm`
    pub layer_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
}

impl BertAttention {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let sa = vb.pp("self");
        let out = vb.pp("output");
        Ok(Self {
            query: Linear::load(sa.pp("query"), h, h)?,
            key: Linear::load(sa.pp("key"), h, h)?,
            value: Linear::load(sa.pp("value"), h, h)?,
            output: Linear::load(out.pp("dense"), h, h)?,
            layer_norm: LayerNorm::load(out.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`; `bias` is the additive
    /// attention mask `[batch, 1, 1, seq]` (0 to attend, a large negative to ignore).
    pub fn forward(&self, hidden: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (batch, seq, width) = hidden.dims3()?;
        let heads = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((batch, seq, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.query.forward(hidden)?)?;
        let k = heads(self.key.forward(hidden)?)?;
        let v = heads(self.value.forward(hidden)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, width))?;
        let projected = self.output.forward(&context)?;
        self.layer_norm.forward(&(projected + hidden)?)
    }
}

/// Rewrites (or only observes) a layer's FFN activation: the neurons.
///
/// `activation` is `[batch, seq, intermediate]`, after the activation function and
/// before `output.dense`. Return it unchanged to observe only.
pub trait FfnHook {
    /// Called once per layer during a forward pass.
    fn apply(&self, layer: usize, activation: Tensor) -> Result<Tensor>;
}

/// The plain forward pass: no neuron is touched.
impl FfnHook for () {
    fn apply(&self, _layer: usize, activation: Tensor) -> Result<Tensor> {
        Ok(activation)
    }
}

/// Two hooks in turn: the first's output is the second's input.
impl<A: FfnHook, B: FfnHook> FfnHook for (A, B) {
    fn apply(&self, layer: usize, activation: Tensor) -> Result<Tensor> {
        let activation = self.0.apply(layer, activation)?;
        self.1.apply(layer, activation)
    }
}

impl<H: FfnHook + ?Sized> FfnHook for &H {
    fn apply(&self, layer: usize, activation: Tensor) -> Result<Tensor> {
        (**self).apply(layer, activation)
    }
}

/// One transformer block: attention, then the FFN whose intermediate units are the
/// neurons. Its `output.dense.weight[:, i]` is neuron i's value slot.
#[derive(Debug, Clone)]
pub struct BertLayer {
    /// Self-attention sub-block.
    pub attention: BertAttention,
    /// `intermediate.dense`: hidden → intermediate (the neurons' keys).
    pub intermediate: Linear,
    /// `output.dense`: intermediate → hidden (the neurons' value slots are its columns).
    pub output: Linear,
    /// `output.LayerNorm`
    pub output_layer_norm: LayerNorm,
    activation: Activation,
}

impl BertLayer {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            attention: BertAttention::load(vb.pp("attention"), cfg)?,
            intermediate: Linear::load(vb.pp("intermediate").pp("dense"), h, i)?,
            output: Linear::load(vb.pp("output").pp("dense"), i, h)?,
            output_layer_norm: LayerNorm::load(
                vb.pp("output").pp("LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
            activation: cfg.activation(),
        })
    }

    /// Attention then FFN: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        bias: Option<&Tensor>,
        index: usize,
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let attended = self.attention.forward(hidden, bias)?;
        let neurons = self.ffn_activation(&attended)?;
        let neurons = hook.apply(index, neurons)?;
        self.ffn_output(&neurons, &attended)
    }

    /// The neurons: `activation(intermediate.dense(x))`, `[batch, seq, intermediate]`.
    pub fn ffn_activation(&self, attended: &Tensor) -> candle_core::Result<Tensor> {
        activate(self.activation, &self.intermediate.forward(attended)?)
    }

    /// The block's output from its neurons and the attention output (the residual).
    pub fn ffn_output(&self, neurons: &Tensor, attended: &Tensor) -> Result<Tensor> {
        let projected = self.output.forward(neurons)?;
        Ok(self.output_layer_norm.forward(&(projected + attended)?)?)
    }
}

/// The masked-LM head (`cls.predictions`): transform, LayerNorm, decoder to the vocabulary.
#[derive(Debug, Clone)]
pub struct MlmHead {
    /// `cls.predictions.transform.dense`
    pub transform: Linear,
    /// `cls.predictions.transform.LayerNorm`
    pub layer_norm: LayerNorm,
    /// `[vocab, hidden]`: `cls.predictions.decoder.weight`, or the word embeddings when tied.
    pub decoder_weight: Tensor,
    /// `[vocab]`: `cls.predictions.bias` (or `decoder.bias`).
    pub decoder_bias: Tensor,
    activation: Activation,
}

impl MlmHead {
    /// `[n, hidden]` → logits `[n, vocab]`.
    pub fn forward(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let x = activate(self.activation, &self.transform.forward(hidden)?)?;
        let x = self.layer_norm.forward(&x)?;
        x.matmul(&self.decoder_weight.t()?)?
            .broadcast_add(&self.decoder_bias)
    }
}

/// A BERT masked LM: embeddings, encoder layers, MLM head.
#[derive(Debug, Clone)]
pub struct BertMaskedLm {
    /// The checkpoint's configuration.
    pub config: Config,
    /// Input embeddings.
    pub embeddings: BertEmbeddings,
    /// Encoder layers, bottom first.
    pub layers: Vec<BertLayer>,
    /// Prediction head.
    pub head: MlmHead,
}

impl BertMaskedLm {
    /// Builds the model from weights named as in Hugging Face's `BertForMaskedLM`
    /// without the `bert.` prefix. Every shape is checked against `cfg` here.
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let embeddings = BertEmbeddings::load(vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let p = vb.pp("cls").pp("predictions");
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        // Tied weights: BertForMaskedLM checkpoints usually omit the decoder matrix.
        let decoder_weight = if p.contains_tensor("decoder.weight") {
            p.get((v, h), "decoder.weight")?
        } else {
            embeddings.word_embeddings.clone()
        };
        let decoder_bias = if p.contains_tensor("bias") {
            p.get(v, "bias")?
        } else {
            p.get(v, "decoder.bias")?
        };
        let t = p.pp("transform");
        let head = MlmHead {
            transform: Linear::load(t.pp("dense"), h, h)?,
            layer_norm: LayerNorm::load(t.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            decoder_weight,
            decoder_bias,
            activation: cfg.activation(),
        };
        Ok(Self {
            config: cfg.clone(),
            embeddings,
            layers,
            head,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embeddings.word_embeddings.device()
    }

    /// The dtype of the weights (and of every activation).
    pub fn dtype(&self) -> DType {
        self.embeddings.word_embeddings.dtype()
    }

    /// Additive attention bias `[batch, 1, 1, seq]` from a 0/1 mask `[batch, seq]`.
    pub fn attention_bias(&self, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq) = attention_mask.dims2()?;
        // Like transformers: (1 - mask) · (most negative finite value), so that padded
        // keys get exactly zero weight.
        let min = most_negative(self.dtype());
        let ones = attention_mask.ones_like()?.to_dtype(self.dtype())?;
        let keep = attention_mask.to_dtype(self.dtype())?;
        ((ones - keep)? * min)?.reshape((batch, 1, 1, seq))
    }

    /// Runs every layer: `[batch, seq]` ids → final hidden states `[batch, seq, hidden]`.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let bias = attention_mask.map(|m| self.attention_bias(m)).transpose()?;
        let mut hidden = self.embeddings.forward(input_ids)?;
        for (index, layer) in self.layers.iter().enumerate() {
            hidden = layer.forward(&hidden, bias.as_ref(), index, hook)?;
        }
        Ok(hidden)
    }

    /// Picks one row per batch item: `hidden[b, positions[b], :]` → `[batch, hidden]`.
    pub fn rows_at(hidden: &Tensor, positions: &[usize]) -> candle_core::Result<Tensor> {
        let (batch, seq, _) = hidden.dims3()?;
        if positions.len() != batch {
            candle_core::bail!("{} positions for a batch of {batch}", positions.len());
        }
        let flat: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(b, &p)| (b * seq + p) as u32)
            .collect();
        let index = Tensor::new(flat, hidden.device())?;
        hidden.flatten_to(1)?.index_select(&index, 0)
    }

    /// Vocabulary logits at one position per batch item: `[batch, vocab]`. The MLM head
    /// runs only on those rows.
    pub fn logits_at(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &[usize],
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let hidden = self.encode(input_ids, attention_mask, hook)?;
        Ok(self.head.forward(&Self::rows_at(&hidden, positions)?)?)
    }

    /// Vocabulary probabilities at one position per batch item: `[batch, vocab]`.
    pub fn probabilities_at(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: &[usize],
        hook: &dyn FfnHook,
    ) -> Result<Tensor> {
        let logits = self.logits_at(input_ids, attention_mask, positions, hook)?;
        Ok(softmax_last_dim(&logits)?)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::model::load::model_from_tensors;
    use crate::model::nn::rows_of;
    use crate::model::random::{random_tensors, tiny_config, Layout};

    /// Replaces the whole neuron vector of one layer at one position by `value`, in a
    /// way the autograd follows (as integrated gradients will).
    struct Replace {
        layer: usize,
        position: usize,
        value: Tensor,
    }

    impl FfnHook for Replace {
        fn apply(&self, layer: usize, activation: Tensor) -> Result<Tensor> {
            if layer != self.layer {
                return Ok(activation);
            }
            let (_, seq, width) = activation.dims3()?;
            let onehot: Vec<f64> = (0..seq)
                .map(|s| if s == self.position { 1.0 } else { 0.0 })
                .collect();
            let at = Tensor::from_vec(onehot, (1, seq, 1), activation.device())?;
            let keep = (1.0 - &at)?;
            let value = self.value.reshape((1, 1, width))?;
            Ok(activation
                .broadcast_mul(&keep)?
                .add(&at.broadcast_mul(&value)?)?)
        }
    }

    /// Broadcasting through [`rows_of`] gives the values of candle's broadcast ops to the
    /// bit, and the same gradients.
    #[test]
    fn rows_of_matches_broadcast_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[
                [[1f64, 2., 3.], [4., 5., 6.]],
                [[7., 8., 9.], [1., -2., 0.5]],
            ],
            &dev,
        )?;
        let weights = Tensor::new(
            &[
                [[0.3f64, -1., 2.], [1.5, 0.2, -0.7]],
                [[0.1, 0.4, 0.9], [-2., 1., 3.]],
            ],
            &dev,
        )?;
        let v = Var::new(&[0.5f64, -1.25, 2.0], &dev)?;
        let pairs = [
            (
                x.broadcast_add(v.as_tensor())?,
                x.add(&rows_of(v.as_tensor(), &x)?)?,
            ),
            (
                x.broadcast_mul(v.as_tensor())?,
                x.mul(&rows_of(v.as_tensor(), &x)?)?,
            ),
        ];
        for (broadcast, rows) in pairs {
            let (a, b): (Vec<f64>, Vec<f64>) = (
                broadcast.flatten_all()?.to_vec1()?,
                rows.flatten_all()?.to_vec1()?,
            );
            assert_eq!(a, b);
            let grad = |t: &Tensor| -> Result<Vec<f64>> {
                let grads = t.mul(&weights)?.sum_all()?.backward()?;
                Ok(grads.get(v.as_tensor()).expect("gradient").to_vec1()?)
            };
            // The same sums, perhaps in another order.
            for (g, h) in grad(&broadcast)?.into_iter().zip(grad(&rows)?) {
                assert!((g - h).abs() <= 1e-12 * g.abs().max(1.0), "{g} vs {h}");
            }
        }
        Ok(())
    }

    /// The gradient of the gold probability w.r.t. a layer's neurons equals central
    /// finite differences (f64). A fused op without a backward would break this.
    #[test]
    fn neuron_gradient_matches_finite_differences() -> Result<()> {
        let cfg = tiny_config(18, 16, 3, 24);
        let tensors = random_tensors(&cfg, Layout::default(), 11, 0.5)?;
        let model = model_from_tensors(tensors, &cfg, DType::F64, &Device::Cpu, Path::new("test"))?;
        let ids = Tensor::new(&[[2u32, 5, 6, 7, 4, 13, 3]], &Device::Cpu)?;
        let (mask, gold) = (4usize, 10usize);
        for layer in 0..cfg.num_hidden_layers {
            let capture = crate::model::ActivationCapture::new(vec![mask]);
            model.logits_at(&ids, None, &[mask], &capture)?;
            let w = capture.into_layers()[layer].squeeze(0)?;
            let var = Var::from_tensor(&(w * 0.7)?)?;
            let prob = |value: &Tensor| -> Result<Tensor> {
                let hook = Replace {
                    layer,
                    position: mask,
                    value: value.clone(),
                };
                Ok(model
                    .probabilities_at(&ids, None, &[mask], &hook)?
                    .get(0)?
                    .get(gold)?)
            };
            let p = prob(var.as_tensor())?;
            let grads = p.backward()?;
            let grad: Vec<f64> = grads.get(var.as_tensor()).expect("gradient").to_vec1()?;
            let base: Vec<f64> = var.as_tensor().to_vec1()?;
            let eps = 1e-5;
            let mut max_grad = 0f64;
            for (i, &g) in grad.iter().enumerate() {
                let mut plus = base.clone();
                plus[i] += eps;
                let mut minus = base.clone();
                minus[i] -= eps;
                let fp = prob(&Tensor::new(plus, &Device::Cpu)?)?.to_scalar::<f64>()?;
                let fm = prob(&Tensor::new(minus, &Device::Cpu)?)?.to_scalar::<f64>()?;
                let fd = (fp - fm) / (2.0 * eps);
                assert!(
                    (g - fd).abs() <= 1e-7 + 1e-5 * fd.abs(),
                    "layer {layer} neuron {i}: autograd {g} vs finite difference {fd}"
                );
                max_grad = max_grad.max(g.abs());
            }
            assert!(
                max_grad > 1e-4,
                "layer {layer}: gradient is ~0 ({max_grad})"
            );
        }
        Ok(())
    }
}
