//! The causal decoders' engine in candle tensors (Llama family, GPT-2): the one-row
//! algorithm of [`crate::attribution::decoder`] — an integration point is one row
//! through layers L+1…top, attending over the normal pass's cached keys and values plus
//! its own, and its backward pass is one row too — in device-generic ops
//! ([`super::ops`]). The layers' groups are stacked as there.
//!
//! Shapes: `R` rows, `S` prompt length, `H` hidden, `I` neurons, `V` vocabulary, `d`
//! head width, `kv` key/value heads, each serving `group` query heads.

use candle_core::{DType, Device, Tensor};

use crate::attribution::engine::LayerGradients;
use crate::attribution::kernels::Real;
use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::model::gpt2::Gpt2;
use crate::model::llama::Llama;
use crate::model::nn::most_negative;
use crate::model::rope::Rope;

use super::ops::{
    activate, cat_along, cat_rows, device_name, gold_probability_gradient, host, layer_results,
    scaled, softmax, Blocks, Dense, Dtypes, Norm, NormCache, Ops,
};
use super::TensorPass;

/// One decoder layer.
#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Norm,
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    ffn_norm: Norm,
    /// SwiGLU's gate (Llama); `None` for GPT-2's plain FFN.
    gate: Option<Dense>,
    up: Dense,
    down: Dense,
}

/// A causal decoder's weights on a device.
#[derive(Debug, Clone)]
pub struct DecoderTensorEngine {
    layers: Vec<Layer>,
    final_norm: Norm,
    /// `[V, H]`
    embeddings: Tensor,
    /// Learned positions `[P, H]` (GPT-2); `None` with rotary positions.
    positions: Option<Tensor>,
    /// `[V, H]`: the embeddings when tied (stored again in the products' dtype).
    head: Dense,
    activation: Activation,
    /// The rotary frequencies (Llama); `None` for learned positions.
    rope: Option<Rope>,
    max_positions: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    dtype: DType,
}

/// What a one-row layer's backward needs.
struct RowCache {
    attn_norm: NormCache,
    /// Rotated queries `[kv, R·group, d]`, own keys and values `[kv, R·group, d]`
    /// (repeated over the group).
    q: Tensor,
    own_k: Tensor,
    own_v: Tensor,
    /// Each part's `[kv, rows·group, S]`: its cached positions, then the row's own.
    probs: Vec<Tensor>,
    /// The FFN: the activation's slope, and SwiGLU's `silu(gate)` and `up`.
    slope: Tensor,
    gated: Option<(Tensor, Tensor)>,
    ffn_norm: NormCache,
}

/// A causal prompt's normal pass, kept on the device.
pub struct DecoderTensorPass<'a, F> {
    engine: &'a DecoderTensorEngine,
    seq: usize,
    /// `cos`, `sin` of the last position `[1, 1, d]` (rotary positions only).
    rotary: Option<(Tensor, Tensor)>,
    /// `keys[l]`, `values[l]`: layer `l`'s (rotated) keys and values of the positions
    /// before the last, `[kv, S − 1, d]`.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// `residuals[l]`: after layer `l`'s attention, at the last position, `[1, H]`.
    residuals: Vec<Tensor>,
    device_neurons: Vec<Tensor>,
    neurons: Vec<Vec<F>>,
    probabilities: Vec<F>,
}

impl DecoderTensorEngine {
    /// Takes a Llama-family model's weights.
    pub fn from_llama(model: Llama, dtypes: Dtypes) -> Result<Self> {
        let dtype = dtypes.activations;
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                Ok(Layer {
                    attn_norm: Norm::rms(&l.input_layernorm, dtype)?,
                    query: Dense::new(&a.q_proj, dtypes)?,
                    key: Dense::new(&a.k_proj, dtypes)?,
                    value: Dense::new(&a.v_proj, dtypes)?,
                    attn_out: Dense::new(&a.o_proj, dtypes)?,
                    ffn_norm: Norm::rms(&l.post_attention_layernorm, dtype)?,
                    gate: Some(Dense::new(&l.mlp.gate_proj, dtypes)?),
                    up: Dense::new(&l.mlp.up_proj, dtypes)?,
                    down: Dense::new(&l.mlp.down_proj, dtypes)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let c = &model.config;
        Ok(Self {
            layers,
            final_norm: Norm::rms(&model.norm, dtype)?,
            embeddings: model.embed_tokens.to_dtype(dtype)?,
            positions: None,
            head: Dense::from_parts(&model.lm_head, None, dtypes)?,
            activation: Activation::Silu,
            rope: Some(Rope::of(c)),
            max_positions: c.max_prompt_tokens(),
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            dtype,
        })
    }

    /// Takes a GPT-2 model's weights (its fused `c_attn` split into q, k, v).
    pub fn from_gpt2(model: Gpt2, dtypes: Dtypes) -> Result<Self> {
        let dtype = dtypes.activations;
        let c = model.config.clone();
        let h = c.hidden_size;
        let layers = model
            .blocks
            .iter()
            .map(|b| {
                let part = |n: usize| -> Result<Dense> {
                    let bias = b
                        .c_attn
                        .bias
                        .as_ref()
                        .map(|t| t.narrow(0, n * h, h))
                        .transpose()?;
                    Dense::from_parts(&b.c_attn.weight.narrow(0, n * h, h)?, bias.as_ref(), dtypes)
                };
                Ok(Layer {
                    attn_norm: Norm::layer(&b.ln_1, dtype)?,
                    query: part(0)?,
                    key: part(1)?,
                    value: part(2)?,
                    attn_out: Dense::new(&b.attn_proj, dtypes)?,
                    ffn_norm: Norm::layer(&b.ln_2, dtype)?,
                    gate: None,
                    up: Dense::new(&b.c_fc, dtypes)?,
                    down: Dense::new(&b.c_proj, dtypes)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_norm: Norm::layer(&model.ln_f, dtype)?,
            embeddings: model.wte.to_dtype(dtype)?,
            positions: Some(model.wpe.to_dtype(dtype)?),
            head: Dense::from_parts(&model.lm_head, None, dtypes)?,
            activation: c.activation(),
            rope: None,
            max_positions: c.max_prompt_tokens(),
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            dtype,
        })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Neurons per layer.
    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    fn device(&self) -> &Device {
        self.embeddings.device()
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The normal pass of a prompt's token ids, read at `position` (its last token).
    pub fn prepare<F: Real>(
        &self,
        ids: &[u32],
        position: usize,
    ) -> Result<DecoderTensorPass<'_, F>> {
        if ids.is_empty() || position + 1 != ids.len() {
            return Err(Error::Prompt(format!(
                "a causal model reads the answer after the last prompt token ({}), not at {position}",
                ids.len().saturating_sub(1)
            )));
        }
        crate::attribution::engine::check_token_ids(ids, self.max_positions, self.vocab)?;
        Ok(self.base_forward(ids)?)
    }

    /// `cos`, `sin` `[S, d]` of every position (rotary positions only).
    fn rotary(&self, seq: usize) -> Ops<Option<(Tensor, Tensor)>> {
        let Some(rope) = &self.rope else {
            return Ok(None);
        };
        let d = self.head_dim;
        let (cos, sin) = rope.tables(seq);
        let table =
            |t: Vec<f64>| Tensor::from_vec(t, (seq, d), self.device())?.to_dtype(self.dtype);
        Ok(Some((table(cos)?, table(sin)?)))
    }

    /// The whole prompt, keeping each layer's keys and values and, at the last position,
    /// the residual after attention and the neurons.
    fn base_forward<F: Real>(&self, ids: &[u32]) -> Ops<DecoderTensorPass<'_, F>> {
        let seq = ids.len();
        let last = seq - 1;
        let (d, heads, kv) = (self.head_dim, self.heads, self.kv_heads);
        let index = Tensor::new(ids, self.device())?;
        let mut x = self.embeddings.index_select(&index, 0)?;
        if let Some(p) = &self.positions {
            x = (x + p.narrow(0, 0, seq)?)?;
        }
        let rotary = self.rotary(seq)?;
        // Key j is hidden from query i > j: an additive bias that gives it weight 0.
        let mut bias = vec![0f64; seq * seq];
        for i in 0..seq {
            for j in i + 1..seq {
                bias[i * seq + j] = most_negative(self.dtype);
            }
        }
        let bias = Tensor::from_vec(bias, (1, seq, seq), self.device())?.to_dtype(self.dtype)?;
        let scale = 1.0 / (d as f64).sqrt();
        let (mut keys, mut values, mut residuals, mut device_neurons) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for layer in &self.layers {
            let (normed, _) = layer.attn_norm.forward(&x)?;
            // [S, n·d] → [n, S, d]
            let heads_of = |t: Tensor, n: usize| t.reshape((seq, n, d))?.transpose(0, 1);
            let mut q = heads_of(layer.query.forward(&normed)?, heads)?;
            let mut k = heads_of(layer.key.forward(&normed)?, kv)?;
            let v = heads_of(layer.value.forward(&normed)?, kv)?.contiguous()?;
            if let Some((cos, sin)) = &rotary {
                q = rope(&q, cos, sin)?;
                k = rope(&k, cos, sin)?;
            }
            let k = k.contiguous()?;
            // Query head j uses key/value head j / group: [kv, group·S, d] against [kv, S, d].
            let qg = q.contiguous()?.reshape((kv, self.group() * seq, d))?;
            let scores = (qg.matmul(&k.t()?)? * scale)?
                .reshape((heads, seq, seq))?
                .broadcast_add(&bias)?;
            let probs = softmax(&scores)?.reshape((kv, self.group() * seq, seq))?;
            let context = probs
                .matmul(&v)?
                .reshape((heads, seq, d))?
                .transpose(0, 1)?
                .reshape((seq, heads * d))?;
            let residual = (layer.attn_out.forward(&context)? + &x)?;
            let (neurons, _) = self.ffn(layer, &residual)?;
            x = (layer.down.forward(&neurons)? + &residual)?;
            residuals.push(residual.narrow(0, last, 1)?);
            device_neurons.push(neurons.narrow(0, last, 1)?);
            keys.push(k.narrow(1, 0, last)?.contiguous()?);
            values.push(v.narrow(1, 0, last)?.contiguous()?);
        }
        let (probabilities, _) = self.head_forward(&x.narrow(0, last, 1)?)?;
        let rotary = rotary
            .map(|(cos, sin)| -> Ops<_> {
                Ok((
                    cos.narrow(0, last, 1)?.unsqueeze(0)?,
                    sin.narrow(0, last, 1)?.unsqueeze(0)?,
                ))
            })
            .transpose()?;
        Ok(DecoderTensorPass {
            engine: self,
            seq,
            rotary,
            keys,
            values,
            residuals,
            neurons: device_neurons.iter().map(host).collect::<Ops<_>>()?,
            probabilities: host(&probabilities)?,
            device_neurons,
        })
    }

    /// The FFN's neurons of `x [R, H]`, and (slope, SwiGLU's parts, norm cache).
    #[allow(clippy::type_complexity)]
    fn ffn(
        &self,
        layer: &Layer,
        x: &Tensor,
    ) -> Ops<(Tensor, (Tensor, Option<(Tensor, Tensor)>, NormCache))> {
        let (normed, norm) = layer.ffn_norm.forward(x)?;
        let up = layer.up.forward(&normed)?;
        Ok(match &layer.gate {
            Some(gate) => {
                let (silu, slope) = activate(self.activation, &gate.forward(&normed)?)?;
                ((&silu * &up)?, (slope, Some((silu, up)), norm))
            }
            None => {
                let (neurons, slope) = activate(self.activation, &up)?;
                (neurons, (slope, None, norm))
            }
        })
    }

    /// Final norm, head and softmax on rows `[R, H]`.
    fn head_forward(&self, x: &Tensor) -> Ops<(Tensor, NormCache)> {
        let (normed, norm) = self.final_norm.forward(x)?;
        Ok((softmax(&self.head.forward(&normed)?)?, norm))
    }
}

/// `x·cos + rotate_half(x)·sin` on `[.., d]`, `rotate_half(x) = [−x₂, x₁]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Ops<Tensor> {
    let last = x.rank() - 1;
    let d = x.dim(last)?;
    let (first, second) = (x.narrow(last, 0, d / 2)?, x.narrow(last, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[&second.neg()?, &first], last)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// The transpose of [`rope`] (a rotation's inverse): `dy·cos + Rᵀ(dy·sin)`,
/// `Rᵀ(z) = [z₂, −z₁]`; it carries a gradient back through the rotation.
fn rope_back(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Ops<Tensor> {
    let last = dy.rank() - 1;
    let d = dy.dim(last)?;
    let z = dy.broadcast_mul(sin)?;
    let (first, second) = (z.narrow(last, 0, d / 2)?, z.narrow(last, d / 2, d / 2)?);
    let back = Tensor::cat(&[&second, &first.neg()?], last)?;
    dy.broadcast_mul(cos)? + back
}

/// One request's rows in a stacked batch: its pass (cached keys and values, rotary
/// position, length) and how many rows it has there.
struct Part<'p, 'a, F> {
    pass: &'p DecoderTensorPass<'a, F>,
    rows: usize,
}

/// One request of a joint batch: a prompt's pass, its layers (ascending, distinct) and
/// its integration points.
pub(super) type Request<'p, 'a, F> = (&'p DecoderTensorPass<'a, F>, &'p [usize], &'p [f64]);

impl DecoderTensorEngine {
    /// `[R, n·d]` with `n = heads` → `[kv, R·group, d]` (query head j with kv head
    /// j / group); a row's entries stay together along dimension 1, so a part's rows
    /// are a `narrow` of it.
    fn grouped(&self, x: &Tensor) -> Ops<Tensor> {
        let r = x.dim(0)?;
        x.reshape((r, self.kv_heads, self.group(), self.head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((self.kv_heads, r * self.group(), self.head_dim))
    }

    /// The inverse of [`Self::grouped`].
    fn ungrouped(&self, x: &Tensor) -> Ops<Tensor> {
        let r = x.dim(1)? / self.group();
        x.reshape((self.kv_heads, r, self.group(), self.head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((r, self.heads * self.head_dim))
    }

    /// `[R, kv·d]` → `[kv, R·group, d]`, each row repeated for its group's queries.
    fn repeated(&self, x: &Tensor) -> Ops<Tensor> {
        let r = x.dim(0)?;
        let (kv, g, d) = (self.kv_heads, self.group(), self.head_dim);
        x.reshape((r, kv, 1, d))?
            .broadcast_as((r, kv, g, d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kv, r * g, d))
    }

    /// `[kv, R·group, d]` summed over each group → `[R, kv·d]` (the transpose of
    /// [`Self::repeated`]).
    fn group_sum(&self, x: &Tensor) -> Ops<Tensor> {
        let (kv, g, d) = (self.kv_heads, self.group(), self.head_dim);
        let r = x.dim(1)? / g;
        x.reshape((kv, r, g, d))?
            .sum(2)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((r, kv * d))
    }

    /// `f` (rope or its transpose) on `x [R, n, d]`, each part's rows at its own
    /// position; unchanged without rotary positions.
    fn rotate<F>(
        &self,
        x: Tensor,
        parts: &[Part<'_, '_, F>],
        f: fn(&Tensor, &Tensor, &Tensor) -> Ops<Tensor>,
    ) -> Ops<Tensor> {
        if self.rope.is_none() {
            return Ok(x);
        }
        let mut start = 0;
        let mut rows = Vec::with_capacity(parts.len());
        for part in parts {
            let (cos, sin) = part.pass.rotary.as_ref().expect("rotary positions");
            rows.push(f(&x.narrow(0, start, part.rows)?, cos, sin)?);
            start += part.rows;
        }
        cat_rows(rows)
    }

    /// Layer `depth` on one-row sequences `x [R, H]` at each part's last position: the
    /// products on all rows, each part's attention over its own prompt's cache.
    fn row_forward<F>(
        &self,
        depth: usize,
        x: &Tensor,
        parts: &[Part<'_, '_, F>],
    ) -> Ops<(Tensor, RowCache)> {
        let layer = &self.layers[depth];
        let (d, g) = (self.head_dim, self.group());
        let scale = 1.0 / (d as f64).sqrt();
        let r = x.dim(0)?;
        let (normed, attn_norm) = layer.attn_norm.forward(x)?;
        let q = layer.query.forward(&normed)?.reshape((r, self.heads, d))?;
        let k = layer.key.forward(&normed)?.reshape((r, self.kv_heads, d))?;
        let q = self.rotate(q, parts, rope)?;
        let k = self.rotate(k, parts, rope)?;
        let q = self.grouped(&q.reshape((r, self.heads * d))?)?;
        let own_k = self.repeated(&k.reshape((r, self.kv_heads * d))?)?;
        let own_v = self.repeated(&layer.value.forward(&normed)?)?;
        let own_score = (&q * &own_k)?.sum_keepdim(2)?;
        let (mut start, mut contexts, mut probs_of) = (0, Vec::new(), Vec::new());
        for part in parts {
            let (pass, rows) = (part.pass, part.rows * g);
            let q = q.narrow(1, start, rows)?;
            let own_score = own_score.narrow(1, start, rows)?;
            let scores = if pass.seq > 1 {
                Tensor::cat(&[&q.matmul(&pass.keys[depth].t()?)?, &own_score], 2)?
            } else {
                own_score
            };
            let probs = softmax(&(scores * scale)?)?;
            let last = pass.seq - 1;
            let mut context = probs
                .narrow(2, last, 1)?
                .broadcast_mul(&own_v.narrow(1, start, rows)?)?;
            if last > 0 {
                let cached = probs.narrow(2, 0, last)?.contiguous()?;
                context = (context + cached.matmul(&pass.values[depth])?)?;
            }
            contexts.push(context);
            probs_of.push(probs);
            start += rows;
        }
        let context = cat_along(contexts, 1)?;
        let residual = (layer.attn_out.forward(&self.ungrouped(&context)?)? + x)?;
        let (neurons, (slope, gated, ffn_norm)) = self.ffn(layer, &residual)?;
        let out = (layer.down.forward(&neurons)? + &residual)?;
        let cache = RowCache {
            attn_norm,
            q,
            own_k,
            own_v,
            probs: probs_of,
            slope,
            gated,
            ffn_norm,
        };
        Ok((out, cache))
    }

    /// The gradient of layer `depth`'s input rows from its output rows' `d_out [R, H]`.
    fn row_backward<F>(
        &self,
        depth: usize,
        cache: &RowCache,
        d_out: &Tensor,
        parts: &[Part<'_, '_, F>],
    ) -> Ops<Tensor> {
        let layer = &self.layers[depth];
        let (d, g) = (self.head_dim, self.group());
        let scale = 1.0 / (d as f64).sqrt();
        // FFN: d_residual = d_out + norm'(d_normed), d_normed from the neurons' gradient.
        let d_neurons = layer.down.backward_input(d_out)?;
        let d_normed = match (&layer.gate, &cache.gated) {
            (Some(gate), Some((silu, up))) => {
                // n = silu(g) ⊙ u: dg = dn ⊙ u ⊙ silu'(g), du = dn ⊙ silu(g).
                let d_gate = ((&d_neurons * up)? * &cache.slope)?;
                let d_up = (&d_neurons * silu)?;
                (gate.backward_input(&d_gate)? + layer.up.backward_input(&d_up)?)?
            }
            _ => layer.up.backward_input(&(&d_neurons * &cache.slope)?)?,
        };
        let d_residual = (layer.ffn_norm.backward(&d_normed, &cache.ffn_norm)? + d_out)?;
        // Attention: the row's query, own key and own value; the cached ones are constants.
        let d_context_all = self.grouped(&layer.attn_out.backward_input(&d_residual)?)?;
        let own_dp_all = (&d_context_all * &cache.own_v)?.sum_keepdim(2)?;
        let mut start = 0;
        let (mut d_vs, mut ds_owns, mut d_qs) = (Vec::new(), Vec::new(), Vec::new());
        for (part, probs) in parts.iter().zip(&cache.probs) {
            let (pass, rows) = (part.pass, part.rows * g);
            let last = pass.seq - 1;
            let d_context = d_context_all.narrow(1, start, rows)?;
            let own_dp = own_dp_all.narrow(1, start, rows)?;
            let d_probs = if last > 0 {
                Tensor::cat(&[&d_context.matmul(&pass.values[depth].t()?)?, &own_dp], 2)?
            } else {
                own_dp
            };
            d_vs.push(probs.narrow(2, last, 1)?.broadcast_mul(&d_context)?);
            let weighted = (probs * &d_probs)?.sum_keepdim(2)?;
            let d_scores = ((probs * d_probs.broadcast_sub(&weighted)?)? * scale)?;
            let ds_own = d_scores.narrow(2, last, 1)?;
            let mut d_q = ds_own.broadcast_mul(&cache.own_k.narrow(1, start, rows)?)?;
            if last > 0 {
                let cached = d_scores.narrow(2, 0, last)?.contiguous()?;
                d_q = (d_q + cached.matmul(&pass.keys[depth])?)?;
            }
            ds_owns.push(ds_own);
            d_qs.push(d_q);
            start += rows;
        }
        // The parts' rows are along dimension 1 of the grouped heads.
        let d_v = self.group_sum(&cat_along(d_vs, 1)?)?;
        let d_q = self.ungrouped(&cat_along(d_qs, 1)?)?;
        let d_k = self.group_sum(&cat_along(ds_owns, 1)?.broadcast_mul(&cache.q)?)?;
        let r = d_q.dim(0)?;
        let d_q = self
            .rotate(d_q.reshape((r, self.heads, d))?, parts, rope_back)?
            .reshape((r, self.heads * d))?;
        let d_k = self
            .rotate(d_k.reshape((r, self.kv_heads, d))?, parts, rope_back)?
            .reshape((r, self.kv_heads * d))?;
        let d_normed = ((layer.query.backward_input(&d_q)? + layer.key.backward_input(&d_k)?)?
            + layer.value.backward_input(&d_v)?)?;
        layer.attn_norm.backward(&d_normed, &cache.attn_norm)? + d_residual
    }

    /// The stacked one-row integration of several requests at once: each layer L of a
    /// request is a group of rows (one per α), `residual + down(α·w)` at its prompt's
    /// last position; at layer d every group L < d of every request is one batch (each
    /// request's rows a block, attending over its own prompt); the head runs once for
    /// all; the backward comes down the same way, a group leaving where it entered.
    pub(super) fn gradients<F: Real>(
        &self,
        requests: &[Request<'_, '_, F>],
        gold: usize,
    ) -> Ops<Vec<Vec<LayerGradients<F>>>> {
        let top = self.layers.len() - 1;
        let Some(&first) = requests.iter().filter_map(|r| r.1.first()).min() else {
            return Ok(requests.iter().map(|_| Vec::new()).collect());
        };
        let group_of = |r: usize, layer: usize| requests[r].1.iter().position(|&l| l == layer);
        let own = requests
            .iter()
            .map(|(pass, layers, alphas)| {
                layers
                    .iter()
                    .map(|&layer| {
                        let neurons = scaled(&pass.device_neurons[layer], alphas)?;
                        self.layers[layer]
                            .down
                            .forward(&neurons)?
                            .broadcast_add(&pass.residuals[layer])
                    })
                    .collect::<Ops<Vec<_>>>()
            })
            .collect::<Ops<Vec<_>>>()?;
        let new_at = |layer: usize| -> Vec<Option<Tensor>> {
            (0..requests.len())
                .map(|r| group_of(r, layer).map(|g| own[r][g].clone()))
                .collect()
        };
        let parts_of = |blocks: &Blocks| -> Vec<Part<'_, '_, F>> {
            requests
                .iter()
                .zip(&blocks.rows)
                .filter(|(_, &rows)| rows > 0)
                .map(|((pass, _, _), &rows)| Part { pass, rows })
                .collect()
        };

        let mut blocks = Blocks::new(requests.len());
        let mut x: Option<Tensor> = None;
        let mut caches = Vec::new();
        for depth in first + 1..=top {
            let input = blocks.push(x.take(), &new_at(depth - 1))?;
            let (out, cache) = self.row_forward(depth, &input, &parts_of(&blocks))?;
            caches.push((depth, cache, blocks.clone()));
            x = Some(out);
        }
        let rows = blocks.push(x, &new_at(top))?;
        // Request r's rows at the head: its groups in order, `b` rows each.
        let head_spans = blocks.spans();
        let (probs, norm) = self.head_forward(&rows)?;
        let (gold_p, d_logits) = gold_probability_gradient(&probs, gold)?;
        drop(probs);
        let d = self
            .final_norm
            .backward(&self.head.backward_input(&d_logits)?, &norm)?;
        drop(d_logits);

        let mut d_own: Vec<Vec<Option<Tensor>>> =
            requests.iter().map(|r| vec![None; r.1.len()]).collect();
        // Takes the groups of `layer` off the ends of the blocks of `d`.
        let mut leave = |blocks: &mut Blocks, d: &Tensor, layer: usize| -> Ops<Option<Tensor>> {
            let take: Vec<usize> = (0..requests.len())
                .map(|r| group_of(r, layer).map_or(0, |_| requests[r].2.len()))
                .collect();
            let (rest, taken) = blocks.pop(d, &take)?;
            for (r, rows) in taken.iter().enumerate() {
                if let (Some(rows), Some(g)) = (rows, group_of(r, layer)) {
                    d_own[r][g] = Some(self.layers[layer].down.backward_input(rows)?);
                }
            }
            Ok(rest)
        };
        let mut d = leave(&mut blocks, &d, top)?;
        while let Some((depth, cache, entered)) = caches.pop() {
            let d_out = d.take().expect("groups below the top stay in the stack");
            let d_in = self.row_backward(depth, &cache, &d_out, &parts_of(&entered))?;
            drop(cache);
            blocks = entered;
            d = leave(&mut blocks, &d_in, depth - 1)?;
        }
        let points: Vec<usize> = requests.iter().map(|r| r.2.len()).collect();
        layer_results(&gold_p, &head_spans, &points, d_own)
    }
}

impl<F: Real> DecoderTensorPass<'_, F> {}

impl<F: Real> TensorPass<F> for DecoderTensorPass<'_, F> {
    fn host(&self) -> (&[Vec<F>], &[F]) {
        (&self.neurons, &self.probabilities)
    }

    /// Bytes of device memory one integration point takes with all layers stacked: per
    /// row and layer the norms, q, own k and v (repeated over the group), attention and
    /// the FFN's four `[I]` vectors; the head's logits; twice, for the products' inputs.
    fn bytes_per_point(&self) -> usize {
        let e = self.engine;
        let n = e.layers.len();
        let h = e.heads * e.head_dim;
        let row = 2 * e.hidden + 3 * h + e.heads * self.seq + 4 * e.intermediate;
        let row_layers = n * n.saturating_sub(1) / 2;
        2 * (row_layers * row + n * 3 * e.vocab) * e.dtype.size_in_bytes()
    }

    fn device_name(&self) -> &'static str {
        device_name(self.engine.device())
    }

    fn joint(
        requests: &[(&Self, &[usize], &[f64])],
        gold: usize,
    ) -> Ops<Vec<Vec<LayerGradients<F>>>> {
        requests[0].0.engine.gradients(requests, gold)
    }
}
