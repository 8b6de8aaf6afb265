//! The attribution engine of causal decoders (Llama family, GPT-2): one row per
//! integration point.
//!
//! In a causal model, scaling the neurons of the last position at layer L changes no
//! earlier position at any layer: their keys and values above L are the normal pass's.
//! So an integration point is one row through layers L+1…top, attending over the normal
//! pass's cached keys and values plus its own, and its backward pass is one row too. This
//! is exact: the same numbers as recomputing every position (tested to 1e-10 in f64).
//! As in the BERT engine, the layers' groups are stacked (at layer d, the rows of every
//! group L < d are one batch), so each weight matrix is read once per layer and the
//! head once for all groups; the backward pass computes activation gradients only.
//!
//! The two families differ only in their parts, which [`DecoderEngine::from_llama`] and
//! [`DecoderEngine::from_gpt2`] choose: RMSNorm or LayerNorm, rotary or learned
//! positions, SwiGLU (`silu(gate) ⊙ up`) or GELU (`gelu_new(c_fc)`) FFN, grouped-query
//! or plain attention, biases or none. Shapes: `R` rows, `S` prompt length, `H` hidden,
//! `I` neurons, `V` vocabulary, `d` head width.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::model::gpt2::Gpt2;
use crate::model::llama::Llama;
use crate::model::rope::Rope;

use super::engine::{LayerGradients, PromptPass};
use super::kernels::{
    activate, add_in_place, gold_probability_gradient, matmul, mul_in_place, softmax_rows, Dense,
    Norm, NormCache, Real, RmsNorm,
};

/// A pre-norm: LayerNorm (GPT-2) or RMSNorm (Llama).
#[derive(Debug, Clone)]
enum PreNorm<F> {
    Layer(Norm<F>),
    Rms(RmsNorm<F>),
}

impl<F: Real> PreNorm<F> {
    fn forward(&self, x: &[F]) -> (Vec<F>, NormCache<F>) {
        match self {
            Self::Layer(n) => n.forward(x),
            Self::Rms(n) => n.forward(x),
        }
    }

    fn backward(&self, dy: &[F], cache: &NormCache<F>) -> Vec<F> {
        match self {
            Self::Layer(n) => n.backward(dy, cache),
            Self::Rms(n) => n.backward(dy, cache),
        }
    }
}

/// One decoder layer's weights.
#[derive(Debug, Clone)]
struct Layer<F> {
    attn_norm: PreNorm<F>,
    query: Dense<F>,
    key: Dense<F>,
    value: Dense<F>,
    attn_out: Dense<F>,
    ffn_norm: PreNorm<F>,
    /// SwiGLU's gate (Llama); `None` for a plain FFN (GPT-2).
    gate: Option<Dense<F>>,
    /// Llama's `up_proj`, GPT-2's `c_fc`.
    up: Dense<F>,
    /// The FFN output projection, whose columns are the neurons' value slots.
    down: Dense<F>,
}

/// A causal decoder's weights as flat buffers, and its shapes.
#[derive(Debug, Clone)]
pub struct DecoderEngine<F> {
    layers: Vec<Layer<F>>,
    final_norm: PreNorm<F>,
    /// Input embeddings `[V, H]`.
    embeddings: Vec<F>,
    /// Learned positions `[P, H]` (GPT-2); `None` with rotary positions.
    positions: Option<Vec<F>>,
    /// Output head `[V, H]`; `None` when tied to the input embeddings.
    head: Option<Vec<F>>,
    /// The FFN activation (GPT-2's GELU, or SiLU on Llama's gate).
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
}

impl<F: Real> DecoderEngine<F> {
    /// Copies a Llama-family model's weights, releasing each layer once copied.
    pub fn from_llama(model: Llama) -> Result<Self> {
        let Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        } = model;
        let tied = embed_tokens.id() == lm_head.id();
        let layers = layers
            .into_iter()
            .map(|l| {
                let a = &l.self_attn;
                Ok(Layer {
                    attn_norm: PreNorm::Rms(RmsNorm::from(&l.input_layernorm)?),
                    query: Dense::from(&a.q_proj)?,
                    key: Dense::from(&a.k_proj)?,
                    value: Dense::from(&a.v_proj)?,
                    attn_out: Dense::from(&a.o_proj)?,
                    ffn_norm: PreNorm::Rms(RmsNorm::from(&l.post_attention_layernorm)?),
                    gate: Some(Dense::from(&l.mlp.gate_proj)?),
                    up: Dense::from(&l.mlp.up_proj)?,
                    down: Dense::from(&l.mlp.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_norm: PreNorm::Rms(RmsNorm::from(&norm)?),
            embeddings: F::from_tensor(&embed_tokens)?,
            positions: None,
            head: if tied {
                None
            } else {
                Some(F::from_tensor(&lm_head)?)
            },
            activation: Activation::Silu,
            rope: Some(Rope::of(&config)),
            max_positions: config.max_prompt_tokens(),
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim(),
            intermediate: config.intermediate_size,
            vocab: config.vocab_size,
        })
    }

    /// Copies a GPT-2 model's weights (its fused `c_attn` split into q, k, v),
    /// releasing each block once copied.
    pub fn from_gpt2(model: Gpt2) -> Result<Self> {
        let config = model.config.clone();
        let activation = config.activation();
        let tied = model.wte.id() == model.lm_head.id();
        let h = config.hidden_size;
        let Gpt2 {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            ..
        } = model;
        let layers = blocks
            .into_iter()
            .map(|b| {
                let part = |n: usize| -> Result<Dense<F>> {
                    let bias = b
                        .c_attn
                        .bias
                        .as_ref()
                        .map(|t| t.narrow(0, n * h, h))
                        .transpose()?;
                    Dense::from_parts(&b.c_attn.weight.narrow(0, n * h, h)?, bias.as_ref())
                };
                Ok(Layer {
                    attn_norm: PreNorm::Layer(Norm::from(&b.ln_1)?),
                    query: part(0)?,
                    key: part(1)?,
                    value: part(2)?,
                    attn_out: Dense::from(&b.attn_proj)?,
                    ffn_norm: PreNorm::Layer(Norm::from(&b.ln_2)?),
                    gate: None,
                    up: Dense::from(&b.c_fc)?,
                    down: Dense::from(&b.c_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_norm: PreNorm::Layer(Norm::from(&ln_f)?),
            embeddings: F::from_tensor(&wte)?,
            positions: Some(F::from_tensor(&wpe)?),
            head: if tied {
                None
            } else {
                Some(F::from_tensor(&lm_head)?)
            },
            activation,
            rope: None,
            max_positions: config.max_prompt_tokens(),
            hidden: h,
            heads: config.num_attention_heads,
            kv_heads: config.num_attention_heads,
            head_dim: h / config.num_attention_heads,
            intermediate: config.intermediate_size,
            vocab: config.vocab_size,
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

    /// The output head `[V, H]`.
    fn head(&self) -> &[F] {
        self.head.as_deref().unwrap_or(&self.embeddings)
    }

    /// The residual stream entering layer 0, `[S, H]`.
    fn embed(&self, ids: &[u32]) -> Result<Vec<F>> {
        let h = self.hidden;
        crate::attribution::engine::check_token_ids(ids, self.max_positions, self.vocab)?;
        let mut x = Vec::with_capacity(ids.len() * h);
        for (p, &id) in ids.iter().enumerate() {
            let word = &self.embeddings[id as usize * h..][..h];
            match &self.positions {
                Some(positions) => {
                    let place = &positions[p * h..][..h];
                    x.extend(word.iter().zip(place).map(|(&w, &q)| w + q));
                }
                None => x.extend_from_slice(word),
            }
        }
        Ok(x)
    }

    /// The normal pass of a prompt's token ids, read at `position` (its last token).
    pub fn prepare(&self, ids: &[u32], position: usize) -> Result<DecoderPass<'_, F>> {
        if ids.is_empty() || position + 1 != ids.len() {
            return Err(Error::Prompt(format!(
                "a causal model reads the answer after the last prompt token ({}), not at {position}",
                ids.len().saturating_sub(1)
            )));
        }
        let x = self.embed(ids)?;
        Ok(self.base_forward(x))
    }

    /// `cos`, `sin` `[S, d]` of the rotary angles (empty with learned positions).
    fn rotary(&self, seq: usize) -> (Vec<F>, Vec<F>) {
        match &self.rope {
            Some(rope) => {
                let (cos, sin) = rope.tables(seq);
                (
                    cos.into_iter().map(F::of).collect(),
                    sin.into_iter().map(F::of).collect(),
                )
            }
            None => (Vec::new(), Vec::new()),
        }
    }

    /// The unscaled forward pass of the whole prompt `x [S, H]`, keeping every layer's
    /// keys and values, and at the last position the residual after attention and the
    /// neurons.
    fn base_forward(&self, mut x: Vec<F>) -> DecoderPass<'_, F> {
        let h = self.hidden;
        let seq = x.len() / h;
        let last = seq - 1;
        let rotary = self.rotary(seq);
        let (mut keys, mut values, mut residuals, mut neurons) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let positions: Vec<usize> = (0..seq).collect();
        for layer in &self.layers {
            let (normed, _) = layer.attn_norm.forward(&x);
            let mut q = layer.query.forward(&normed, seq);
            let mut k = layer.key.forward(&normed, seq);
            let v = layer.value.forward(&normed, seq);
            self.rope(&mut q, self.heads, &positions, &rotary, false);
            self.rope(&mut k, self.kv_heads, &positions, &rotary, false);
            // Row i attends the cached keys 0..=i (its own among them).
            let (context, _) = self.attention(&q, seq, &k, &v, None, |i| i + 1);
            let mut residual = layer.attn_out.forward(&context, seq);
            add_in_place(&mut residual, &x);
            let (activated, _) = self.ffn(layer, &residual, seq);
            let mut out = layer.down.forward(&activated.neurons, seq);
            add_in_place(&mut out, &residual);
            residuals.push(residual[last * h..].to_vec());
            neurons.push(activated.neurons[last * self.intermediate..].to_vec());
            keys.push(k);
            values.push(v);
            x = out;
        }
        let (probabilities, _) = self.head_probabilities(&x[last * h..], 1);
        DecoderPass {
            engine: self,
            seq,
            rotary,
            keys,
            values,
            residuals,
            neurons,
            probabilities,
        }
    }

    /// The FFN's neurons of `x [R, H]` (pre-normed here) and what their backward needs.
    fn ffn(&self, layer: &Layer<F>, x: &[F], rows: usize) -> (FfnCache<F>, NormCache<F>) {
        let (normed, norm) = layer.ffn_norm.forward(x);
        let up = layer.up.forward(&normed, rows);
        let cache = match &layer.gate {
            Some(gate) => {
                // SwiGLU: n = silu(g) ⊙ u.
                let (silu, slope) = activate(self.activation, &gate.forward(&normed, rows));
                let mut neurons = silu.clone();
                mul_in_place(&mut neurons, &up);
                FfnCache {
                    neurons,
                    slope,
                    gated: Some((silu, up)),
                }
            }
            None => {
                let (neurons, slope) = activate(self.activation, &up);
                FfnCache {
                    neurons,
                    slope,
                    gated: None,
                }
            }
        };
        (cache, norm)
    }

    /// Rotates `x [R, n·d]` (n heads) at `positions[r]` by the rotary angles, or back
    /// (`inverse`: the transpose, which carries a gradient through the rotation).
    fn rope(
        &self,
        x: &mut [F],
        n: usize,
        positions: &[usize],
        rotary: &(Vec<F>, Vec<F>),
        inverse: bool,
    ) {
        if self.rope.is_none() {
            return;
        }
        let d = self.head_dim;
        let half = d / 2;
        let (cos, sin) = rotary;
        x.par_chunks_mut(n * d)
            .zip(positions.par_iter())
            .for_each(|(row, &p)| {
                let (c, s) = (&cos[p * d..][..d], &sin[p * d..][..d]);
                for head in row.chunks_mut(d) {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        // x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁].
                        if inverse {
                            head[i] = a * c[i] + b * s[i + half];
                            head[i + half] = b * c[i + half] - a * s[i];
                        } else {
                            head[i] = a * c[i] - b * s[i];
                            head[i + half] = b * c[i + half] + a * s[i + half];
                        }
                    }
                }
            });
    }

    /// Attention of `q [R, heads·d]` over the first `visible(r)` rows of the cached
    /// `keys`, `values` `[S, kv·d]`, and then over the row's own key and value when
    /// `own` is given (`[R, kv·d]` each). Returns the context `[R, heads·d]` and the
    /// probabilities `[R, heads, visible + own]` (rows padded to `S + 1`).
    fn attention(
        &self,
        q: &[F],
        rows: usize,
        keys: &[F],
        values: &[F],
        own: Option<(&[F], &[F])>,
        visible: impl Fn(usize) -> usize + Sync,
    ) -> (Vec<F>, Vec<F>) {
        let (heads, d) = (self.heads, self.head_dim);
        let kv = self.kv_heads * d;
        let group = self.heads / self.kv_heads;
        let scale = F::of(1.0 / (d as f64).sqrt());
        let width = keys.len() / kv + 1;
        let mut context = vec![F::zero(); rows * heads * d];
        let mut probs = vec![F::zero(); rows * heads * width];
        context
            .par_chunks_mut(heads * d)
            .zip(probs.par_chunks_mut(heads * width))
            .enumerate()
            .for_each(|(r, (ctx, p))| {
                let n = visible(r);
                for hd in 0..heads {
                    let g = hd / group;
                    let qi = &q[r * heads * d + hd * d..][..d];
                    let row = &mut p[hd * width..(hd + 1) * width];
                    let key = |j: usize| -> &[F] {
                        match own {
                            Some((k, _)) if j == n => &k[r * kv + g * d..][..d],
                            _ => &keys[j * kv + g * d..][..d],
                        }
                    };
                    let value = |j: usize| -> &[F] {
                        match own {
                            Some((_, v)) if j == n => &v[r * kv + g * d..][..d],
                            _ => &values[j * kv + g * d..][..d],
                        }
                    };
                    let total = n + usize::from(own.is_some());
                    let mut max = F::neg_infinity();
                    for (j, s) in row[..total].iter_mut().enumerate() {
                        *s = F::dot(qi, key(j)) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = F::zero();
                    for s in row[..total].iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let c = &mut ctx[hd * d..(hd + 1) * d];
                    for (j, s) in row[..total].iter_mut().enumerate() {
                        *s = *s / sum;
                        for (cc, &vv) in c.iter_mut().zip(value(j)) {
                            *cc += *s * vv;
                        }
                    }
                }
            });
        (context, probs)
    }

    /// Final norm, head and softmax on `[R, H]` rows: probabilities `[R, V]`.
    fn head_probabilities(&self, x: &[F], rows: usize) -> (Vec<F>, NormCache<F>) {
        let (normed, norm) = self.final_norm.forward(x);
        let v = self.vocab;
        let mut logits = vec![F::zero(); rows * v];
        matmul(
            rows,
            v,
            self.hidden,
            &normed,
            self.head(),
            true,
            &mut logits,
            false,
        );
        softmax_rows(&mut logits, v);
        (logits, norm)
    }
}

/// What the FFN's backward needs.
#[derive(Debug, Clone)]
struct FfnCache<F> {
    /// The neurons `[R, I]`.
    neurons: Vec<F>,
    /// The activation's slope at its input (the gate's for SwiGLU), `[R, I]`.
    slope: Vec<F>,
    /// SwiGLU: `silu(gate)` and `up`, `[R, I]` each.
    gated: Option<(Vec<F>, Vec<F>)>,
}

/// What a one-row layer's backward needs from its forward.
struct RowCache<F> {
    attn_norm: NormCache<F>,
    /// The rows' queries, own keys (rotated) and own values.
    q: Vec<F>,
    k: Vec<F>,
    v: Vec<F>,
    /// Attention probabilities `[R, heads, S]`.
    probs: Vec<F>,
    ffn: FfnCache<F>,
    ffn_norm: NormCache<F>,
}

/// A causal prompt's normal pass: what every layer's integration reuses.
pub struct DecoderPass<'a, F> {
    engine: &'a DecoderEngine<F>,
    seq: usize,
    rotary: (Vec<F>, Vec<F>),
    /// `keys[l]`, `values[l]`: layer `l`'s keys (rotated) and values of every position,
    /// `[S, kv·d]`.
    keys: Vec<Vec<F>>,
    values: Vec<Vec<F>>,
    /// `residuals[l]`: the residual stream after layer `l`'s attention at the last
    /// position (the FFN's input and residual), `[H]`.
    residuals: Vec<Vec<F>>,
    /// `neurons[l]`: layer `l`'s neurons at the last position, `[I]`.
    neurons: Vec<Vec<F>>,
    /// Vocabulary probabilities after the last position.
    probabilities: Vec<F>,
}

impl<F: Real> DecoderPass<'_, F> {
    /// Layer `depth` on `rows` one-row sequences `x [R, H]` at the last position,
    /// attending the normal pass's keys and values of the earlier positions.
    fn row_forward(&self, depth: usize, x: &[F], rows: usize) -> (Vec<F>, RowCache<F>) {
        let e = self.engine;
        let layer = &e.layers[depth];
        let last = self.seq - 1;
        let kv = e.kv_heads * e.head_dim;
        let (normed, attn_norm) = layer.attn_norm.forward(x);
        let mut q = layer.query.forward(&normed, rows);
        let mut k = layer.key.forward(&normed, rows);
        let v = layer.value.forward(&normed, rows);
        let at_last = vec![last; rows];
        e.rope(&mut q, e.heads, &at_last, &self.rotary, false);
        e.rope(&mut k, e.kv_heads, &at_last, &self.rotary, false);
        let (keys, values) = (
            &self.keys[depth][..last * kv],
            &self.values[depth][..last * kv],
        );
        let (context, probs) = e.attention(&q, rows, keys, values, Some((&k, &v)), |_| last);
        let mut residual = layer.attn_out.forward(&context, rows);
        add_in_place(&mut residual, x);
        let (ffn, ffn_norm) = e.ffn(layer, &residual, rows);
        let mut out = layer.down.forward(&ffn.neurons, rows);
        add_in_place(&mut out, &residual);
        let cache = RowCache {
            attn_norm,
            q,
            k,
            v,
            probs,
            ffn,
            ffn_norm,
        };
        (out, cache)
    }

    /// The gradient of layer `depth`'s input rows from its output rows' `d_out [R, H]`.
    fn row_backward(&self, depth: usize, cache: &RowCache<F>, d_out: &[F], rows: usize) -> Vec<F> {
        let e = self.engine;
        let layer = &e.layers[depth];
        let (h, i) = (e.hidden, e.intermediate);
        // FFN: d_residual = d_out + norm'(d_normed), d_normed from the neurons' gradient.
        let mut d_neurons = vec![F::zero(); rows * i];
        layer
            .down
            .backward_input(d_out, rows, &mut d_neurons, false);
        let mut d_normed = vec![F::zero(); rows * h];
        match (&layer.gate, &cache.ffn.gated) {
            (Some(gate), Some((silu, up))) => {
                // n = silu(g) ⊙ u: dg = dn ⊙ u ⊙ silu'(g), du = dn ⊙ silu(g).
                let mut d_gate = d_neurons.clone();
                mul_in_place(&mut d_gate, up);
                mul_in_place(&mut d_gate, &cache.ffn.slope);
                let mut d_up = d_neurons;
                mul_in_place(&mut d_up, silu);
                gate.backward_input(&d_gate, rows, &mut d_normed, false);
                layer.up.backward_input(&d_up, rows, &mut d_normed, true);
            }
            _ => {
                mul_in_place(&mut d_neurons, &cache.ffn.slope);
                layer
                    .up
                    .backward_input(&d_neurons, rows, &mut d_normed, false);
            }
        }
        let mut d_residual = layer.ffn_norm.backward(&d_normed, &cache.ffn_norm);
        add_in_place(&mut d_residual, d_out);
        // Attention: the row's query, own key and own value; the cached ones are constants.
        let mut d_context = vec![F::zero(); rows * e.heads * e.head_dim];
        layer
            .attn_out
            .backward_input(&d_residual, rows, &mut d_context, false);
        let (mut d_q, mut d_k, d_v) = self.attention_backward(depth, cache, &d_context, rows);
        let at_last = vec![self.seq - 1; rows];
        e.rope(&mut d_q, e.heads, &at_last, &self.rotary, true);
        e.rope(&mut d_k, e.kv_heads, &at_last, &self.rotary, true);
        let mut d_normed = vec![F::zero(); rows * h];
        layer.query.backward_input(&d_q, rows, &mut d_normed, false);
        layer.key.backward_input(&d_k, rows, &mut d_normed, true);
        layer.value.backward_input(&d_v, rows, &mut d_normed, true);
        let mut d_x = layer.attn_norm.backward(&d_normed, &cache.attn_norm);
        add_in_place(&mut d_x, &d_residual);
        d_x
    }

    /// Gradients of the rows' query `[R, heads·d]`, own key and own value `[R, kv·d]`
    /// from that of the context.
    fn attention_backward(
        &self,
        depth: usize,
        cache: &RowCache<F>,
        d_context: &[F],
        rows: usize,
    ) -> (Vec<F>, Vec<F>, Vec<F>) {
        let e = self.engine;
        let (heads, d) = (e.heads, e.head_dim);
        let kv = e.kv_heads * d;
        let group = heads / e.kv_heads;
        let scale = F::of(1.0 / (d as f64).sqrt());
        let last = self.seq - 1;
        let width = self.seq;
        let (keys, values) = (&self.keys[depth], &self.values[depth]);
        let mut d_q = vec![F::zero(); rows * heads * d];
        let mut d_k = vec![F::zero(); rows * kv];
        let mut d_v = vec![F::zero(); rows * kv];
        d_q.par_chunks_mut(heads * d)
            .zip(d_k.par_chunks_mut(kv))
            .zip(d_v.par_chunks_mut(kv))
            .enumerate()
            .for_each(|(r, ((dq, dk), dv))| {
                for hd in 0..heads {
                    let g = hd / group;
                    let p = &cache.probs[(r * heads + hd) * width..][..width];
                    let dc = &d_context[r * heads * d + hd * d..][..d];
                    let qi = &cache.q[r * heads * d + hd * d..][..d];
                    let own_k = &cache.k[r * kv + g * d..][..d];
                    let own_v = &cache.v[r * kv + g * d..][..d];
                    let key = |j: usize| {
                        if j == last {
                            own_k
                        } else {
                            &keys[j * kv + g * d..][..d]
                        }
                    };
                    let value = |j: usize| {
                        if j == last {
                            own_v
                        } else {
                            &values[j * kv + g * d..][..d]
                        }
                    };
                    let dp: Vec<F> = (0..width).map(|j| F::dot(dc, value(j))).collect();
                    let weighted: F = (0..width).map(|j| p[j] * dp[j]).sum();
                    for (gv, &c) in dv[g * d..(g + 1) * d].iter_mut().zip(dc) {
                        *gv += p[last] * c;
                    }
                    let dqh = &mut dq[hd * d..(hd + 1) * d];
                    for j in 0..width {
                        let ds = p[j] * (dp[j] - weighted) * scale;
                        for (gq, &kk) in dqh.iter_mut().zip(key(j)) {
                            *gq += ds * kk;
                        }
                        if j == last {
                            for (gk, &qq) in dk[g * d..(g + 1) * d].iter_mut().zip(qi) {
                                *gk += ds * qq;
                            }
                        }
                    }
                }
            });
        (d_q, d_k, d_v)
    }
}

impl<F: Real> PromptPass<F> for DecoderPass<'_, F> {
    fn neurons(&self) -> &[Vec<F>] {
        &self.neurons
    }

    fn probabilities(&self) -> &[F] {
        &self.probabilities
    }

    fn cache_bytes_per_point(&self) -> usize {
        let e = self.engine;
        let n = e.layers.len();
        let (h, i) = (e.hidden, e.intermediate);
        let (q, kv) = (e.heads * e.head_dim, e.kv_heads * e.head_dim);
        // Per row and layer: two norm caches, q, own k and v, attention, the FFN's four
        // [I] vectors; layer d holds the rows of every group below it; the head, two
        // rows of logits per group.
        let row = 2 * h + q + 2 * kv + e.heads * self.seq + 4 * i;
        let row_layers = n * n.saturating_sub(1) / 2;
        (row_layers * row + n * 2 * e.vocab) * std::mem::size_of::<F>()
    }

    fn gradients(
        &self,
        layers: &[usize],
        alphas: &[F],
        gold: usize,
    ) -> Result<Vec<LayerGradients<F>>> {
        // The inherent method below (the flat engine cannot fail).
        Ok(DecoderPass::gradients(self, layers, alphas, gold))
    }
}

impl<F: Real> DecoderPass<'_, F> {
    /// Each layer L is a *group* of `B` rows (one per α): the last position's output
    /// of layer L, `residual + down(α·w)`. The groups go up the model stacked, one row
    /// each through the layers above, and come down the same way; a group leaves the
    /// stack at the layer it entered, its gradient taken into its own neurons.
    pub fn gradients(&self, layers: &[usize], alphas: &[F], gold: usize) -> Vec<LayerGradients<F>> {
        assert!(
            layers.windows(2).all(|w| w[0] < w[1]),
            "layers ascending, distinct"
        );
        let Some(&first) = layers.first() else {
            return Vec::new();
        };
        let e = self.engine;
        let (h, width, v) = (e.hidden, e.intermediate, e.vocab);
        let batch = alphas.len();
        let top = e.layers.len() - 1;
        let group_of = |layer: usize| layers.iter().position(|&l| l == layer);

        // Each group's own layer: the attention's residual plus the scaled neurons' output.
        let own: Vec<Vec<F>> = layers
            .iter()
            .map(|&layer| {
                let w = &self.neurons[layer];
                let scaled: Vec<F> = alphas
                    .iter()
                    .flat_map(|&a| w.iter().map(move |&x| a * x))
                    .collect();
                let mut out = e.layers[layer].down.forward(&scaled, batch);
                for row in out.chunks_mut(h) {
                    for (o, &r) in row.iter_mut().zip(&self.residuals[layer]) {
                        *o += r;
                    }
                }
                out
            })
            .collect();

        // Up: at layer d the group of layer d − 1 joins the stack, after those there.
        let mut x: Vec<F> = Vec::new();
        let mut stacked = 0;
        let mut caches = Vec::new();
        for depth in first + 1..=top {
            if let Some(g) = group_of(depth - 1) {
                x.extend_from_slice(&own[g]);
                stacked += 1;
            }
            let (out, cache) = self.row_forward(depth, &x, stacked * batch);
            caches.push((depth, stacked, cache));
            x = out;
        }
        if let Some(g) = group_of(top) {
            x.extend_from_slice(&own[g]);
        }

        // Head and the gold probability's gradient, dP_gold/dz_j = P_gold (δ_gold,j − p_j).
        let rows = layers.len() * batch;
        let (mut d_logits, norm) = e.head_probabilities(&x, rows);
        let gold_p = gold_probability_gradient(&mut d_logits, v, gold);
        let mut d_normed = vec![F::zero(); rows * h];
        matmul(rows, h, v, &d_logits, e.head(), false, &mut d_normed, false);
        drop(d_logits);
        let mut d = e.final_norm.backward(&d_normed, &norm);

        // Down: where a group joined, its rows' gradient goes into its own neurons.
        let own_backward = |g: usize, d_rows: &[F]| {
            let mut d_neurons = vec![F::zero(); batch * width];
            e.layers[layers[g]]
                .down
                .backward_input(d_rows, batch, &mut d_neurons, false);
            d_neurons
        };
        let mut d_own: Vec<Option<Vec<F>>> = vec![None; layers.len()];
        if let Some(g) = group_of(top) {
            d_own[g] = Some(own_backward(g, &d[g * batch * h..]));
            d.truncate(g * batch * h);
        }
        while let Some((depth, stacked, cache)) = caches.pop() {
            d = self.row_backward(depth, &cache, &d, stacked * batch);
            drop(cache);
            if let Some(g) = group_of(depth - 1) {
                let start = g * batch * h;
                d_own[g] = Some(own_backward(g, &d[start..]));
                d.truncate(start);
            }
        }
        d_own
            .into_iter()
            .zip(gold_p.chunks(batch))
            .map(|(gradients, p)| LayerGradients {
                probabilities: p.to_vec(),
                gradients: gradients.expect("every group left the stack"),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::model::random::{random_decoder_tensors, tiny_decoder_config, tiny_rope_configs};
    use crate::model::{FfnHook, LanguageModel};

    const IDS: [u32; 7] = [3, 17, 5, 22, 9, 14, 2];
    const GOLD: usize = 11;

    /// Tiny random decoders of every kind: Llama (grouped-query), Qwen2 (q/k/v biases),
    /// GPT-2, tied and untied, and Llamas with llama3, yarn and dynamic rope scaling.
    fn models() -> Vec<(String, LanguageModel)> {
        [
            ("llama", true),
            ("llama", false),
            ("qwen2", false),
            ("gpt2", true),
            ("gpt2", false),
        ]
        .into_iter()
        .map(|(kind, tied)| {
            let cfg = tiny_decoder_config(kind, 29, 16, 3, 24, tied).unwrap();
            (format!("{kind} tied={tied}"), cfg)
        })
        .chain(tiny_rope_configs(29, 16, 3, 24).unwrap())
        .map(|(name, cfg)| {
            let tensors = random_decoder_tensors(&cfg, 7, 0.5).unwrap();
            let model = LanguageModel::from_tensors(
                tensors,
                &cfg,
                DType::F64,
                &Device::Cpu,
                Path::new(&name),
            )
            .unwrap();
            (name, model)
        })
        .collect()
    }

    fn engine(model: &LanguageModel) -> DecoderEngine<f64> {
        match model.clone() {
            LanguageModel::Llama(m) => DecoderEngine::from_llama(m).unwrap(),
            LanguageModel::Gpt2(m) => DecoderEngine::from_gpt2(m).unwrap(),
            LanguageModel::Bert(_) => unreachable!(),
        }
    }

    /// Replaces layer `layer`'s neurons at the last position by `value` in a way candle's
    /// autograd follows: the full recomputation of every position.
    struct Replace {
        layer: usize,
        value: Tensor,
    }

    impl FfnHook for Replace {
        fn apply(&self, layer: usize, activation: Tensor) -> crate::error::Result<Tensor> {
            if layer != self.layer {
                return Ok(activation);
            }
            let (_, seq, width) = activation.dims3()?;
            let onehot: Vec<f64> = (0..seq)
                .map(|s| f64::from(u8::from(s + 1 == seq)))
                .collect();
            let at = Tensor::from_vec(onehot, (1, seq, 1), activation.device())?;
            let keep = (1.0 - &at)?;
            Ok(activation
                .broadcast_mul(&keep)?
                .add(&at.broadcast_mul(&self.value.reshape((1, 1, width))?)?)?)
        }
    }

    /// The one-row engine equals a full recomputation of every position (candle's
    /// forward with the neurons replaced, and its autograd) to 1e-10: probabilities of
    /// the normal pass, P(α) and dP/d(neurons) at every layer and several α.
    #[test]
    fn one_row_engine_equals_full_recomputation() {
        let ids = Tensor::new(&IDS, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let last = IDS.len() - 1;
        for (name, model) in models() {
            let engine = engine(&model);
            let pass = engine.prepare(&IDS, last).unwrap();
            let want: Vec<f64> = model
                .probabilities_at(&ids, None, &[last], &())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in pass.probabilities().iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{name}: {a} vs {b}");
            }
            let alphas = [0.0, 0.3, 1.0];
            let layers: Vec<usize> = (0..engine.layers()).collect();
            let results = pass.gradients(&layers, &alphas, GOLD);
            for (layer, result) in results.iter().enumerate() {
                for (b, &alpha) in alphas.iter().enumerate() {
                    let w: Vec<f64> = pass.neurons()[layer].iter().map(|x| x * alpha).collect();
                    let var = Var::new(w.as_slice(), &Device::Cpu).unwrap();
                    let hook = Replace {
                        layer,
                        value: var.as_tensor().clone(),
                    };
                    let p = model
                        .probabilities_at(&ids, None, &[last], &hook)
                        .unwrap()
                        .get(0)
                        .unwrap()
                        .get(GOLD)
                        .unwrap();
                    let p_full = p.to_scalar::<f64>().unwrap();
                    let got = result.probabilities[b];
                    assert!(
                        (got - p_full).abs() < 1e-10,
                        "{name} layer {layer} α {alpha}: P {got} vs {p_full}"
                    );
                    let grads = p.backward().unwrap();
                    let full: Vec<f64> = grads.get(var.as_tensor()).unwrap().to_vec1().unwrap();
                    let width = engine.intermediate();
                    let row = &result.gradients[b * width..(b + 1) * width];
                    let scale = full.iter().fold(0f64, |m, g| m.max(g.abs()));
                    assert!(scale > 1e-6, "{name} layer {layer} α {alpha}: gradient ~0");
                    for (i, (a, f)) in row.iter().zip(&full).enumerate() {
                        assert!(
                            (a - f).abs() < 1e-10,
                            "{name} layer {layer} α {alpha} neuron {i}: {a} vs {f}"
                        );
                    }
                }
            }
        }
    }

    /// dP/d(neurons) from the one-row backward equals central finite differences of the
    /// one-row forward, at every layer and several α.
    #[test]
    fn gradients_match_finite_differences() {
        let last = IDS.len() - 1;
        for (name, model) in models() {
            let engine = engine(&model);
            let pass = engine.prepare(&IDS, last).unwrap();
            let width = engine.intermediate();
            for layer in 0..engine.layers() {
                for alpha in [0.0, 0.45, 1.0] {
                    let g = pass
                        .gradients(&[layer], &[alpha], GOLD)
                        .pop()
                        .unwrap()
                        .gradients;
                    let w: Vec<f64> = pass.neurons()[layer].iter().map(|x| x * alpha).collect();
                    for (i, &gi) in g.iter().enumerate().take(width) {
                        let eps = 1e-6;
                        let p_at = |delta: f64| {
                            let mut moved = DecoderPass {
                                engine: &engine,
                                seq: pass.seq,
                                rotary: pass.rotary.clone(),
                                keys: pass.keys.clone(),
                                values: pass.values.clone(),
                                residuals: pass.residuals.clone(),
                                neurons: pass.neurons.clone(),
                                probabilities: pass.probabilities.clone(),
                            };
                            moved.neurons[layer] = w.clone();
                            moved.neurons[layer][i] += delta;
                            moved.gradients(&[layer], &[1.0], GOLD)[0].probabilities[0]
                        };
                        let fd = (p_at(eps) - p_at(-eps)) / (2.0 * eps);
                        assert!(
                            (gi - fd).abs() <= 1e-8 + 1e-5 * fd.abs(),
                            "{name} layer {layer} α {alpha} neuron {i}: {gi} vs {fd}"
                        );
                    }
                }
            }
        }
    }

    /// Stacking layers gives each layer what it gets alone; f32 is close to f64.
    #[test]
    fn stacked_layers_equal_single_layers_and_f32_is_close() {
        let last = IDS.len() - 1;
        for (name, model) in models() {
            let e64 = engine(&model);
            let pass = e64.prepare(&IDS, last).unwrap();
            let alphas = [0.1, 0.6, 1.0];
            let stacked = pass.gradients(&[0, 1, 2], &alphas, GOLD);
            for (layer, together) in stacked.iter().enumerate() {
                let alone = pass.gradients(&[layer], &alphas, GOLD).pop().unwrap();
                for (a, b) in together.gradients.iter().zip(&alone.gradients) {
                    assert!((a - b).abs() < 1e-13, "{name} layer {layer}: {a} vs {b}");
                }
            }
            let e32: DecoderEngine<f32> = match model.clone() {
                LanguageModel::Llama(m) => DecoderEngine::from_llama(m).unwrap(),
                LanguageModel::Gpt2(m) => DecoderEngine::from_gpt2(m).unwrap(),
                LanguageModel::Bert(_) => unreachable!(),
            };
            let p32 = e32.prepare(&IDS, last).unwrap();
            let g32 = p32.gradients(&[0, 1, 2], &[0.5], GOLD);
            let g64 = pass.gradients(&[0, 1, 2], &[0.5], GOLD);
            for (a, b) in g64.iter().zip(&g32) {
                let scale = a.gradients.iter().fold(0f64, |m, g| m.max(g.abs()));
                for (x, y) in a.gradients.iter().zip(&b.gradients) {
                    assert!(
                        (x - f64::from(*y)).abs() <= 1e-4 * scale,
                        "{name}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_prompts_are_errors() {
        let (_, model) = models().remove(0);
        let engine = engine(&model);
        assert!(engine.prepare(&IDS, 2).is_err(), "answer position not last");
        assert!(
            engine.prepare(&[3, 29], 1).is_err(),
            "id outside the vocabulary"
        );
        assert!(
            engine.prepare(&[3; 33], 32).is_err(),
            "longer than the positions"
        );
        assert!(engine.prepare(&[], 0).is_err());
    }
}
