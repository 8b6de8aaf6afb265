//! The BERT engine in candle tensors: the algorithm of [`crate::attribution::bert`]
//! (one normal pass per prompt; for layer L only layers L…top on the integration points,
//! layer L and the top layer at the mask row only; the layers' groups stacked so each
//! weight is read once per layer; a backward pass to the activations only), written in
//! device-generic ops ([`super::ops`]) so that it runs on CUDA.
//!
//! Shapes: `n` sequences (stacked groups × points), `S` sequence, `Q` query rows (`S`,
//! or 1 at the top layer), `H` hidden, `I` neurons, `V` vocabulary; activations are
//! kept as 2-D `[rows, width]` between layers.

use candle_core::{DType, Device, Tensor};

use crate::attribution::engine::LayerGradients;
use crate::attribution::kernels::Real;
use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::model::BertMaskedLm;

use super::ops::{
    activate, gold_probability_gradient, push_rows, scaled, softmax, Dense, Dtypes, Norm,
    NormCache, Ops,
};

/// One transformer block.
#[derive(Debug, Clone)]
struct Block {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    up: Dense,
    down: Dense,
    out_norm: Norm,
}

/// What a block's backward needs from its forward.
struct BlockCache {
    /// `None`: every row is a query; `Some(p)`: only row `p` (the top layer).
    only: Option<usize>,
    /// `[n, heads, Q, d]`, `[n, heads, S, d]` (twice), `[n, heads, Q, S]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    attn_norm: NormCache,
    /// f'(pre-activation) of the neurons, `[n·Q, I]`.
    slope: Tensor,
    out_norm: NormCache,
}

/// A BERT masked LM's weights on a device.
#[derive(Debug, Clone)]
pub struct BertTensorEngine {
    words: Tensor,
    positions: Tensor,
    /// `[1, H]`: token type 0.
    segment: Tensor,
    embedding_norm: Norm,
    blocks: Vec<Block>,
    head_dense: Dense,
    head_norm: Norm,
    /// `[V, H]`, without its bias (added in the activations' dtype).
    decoder: Dense,
    /// `[V]`
    decoder_bias: Tensor,
    activation: Activation,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    vocab: usize,
    dtype: DType,
}

/// One prompt's normal pass, kept on the device for every layer's integration.
pub struct BertTensorPass<'a, F> {
    engine: &'a BertTensorEngine,
    seq: usize,
    mask: usize,
    /// `inputs[l]`: layer `l`'s input `[S, H]`.
    inputs: Vec<Tensor>,
    /// `attended[l]`: layer `l`'s FFN input at the mask `[1, H]`.
    attended: Vec<Tensor>,
    /// `neurons[l]` on the device `[1, I]`, and on the host.
    device_neurons: Vec<Tensor>,
    neurons: Vec<Vec<F>>,
    probabilities: Vec<F>,
}

impl BertTensorEngine {
    /// Takes a loaded model's weights (no copy when they are already in `dtype`).
    pub fn from_model(model: BertMaskedLm, dtypes: Dtypes) -> Result<Self> {
        let dtype = dtypes.activations;
        let BertMaskedLm {
            config: cfg,
            embeddings,
            layers,
            head,
        } = model;
        let blocks = layers
            .iter()
            .map(|l| {
                Ok(Block {
                    query: Dense::new(&l.attention.query, dtypes)?,
                    key: Dense::new(&l.attention.key, dtypes)?,
                    value: Dense::new(&l.attention.value, dtypes)?,
                    attn_out: Dense::new(&l.attention.output, dtypes)?,
                    attn_norm: Norm::layer(&l.attention.layer_norm, dtype)?,
                    up: Dense::new(&l.intermediate, dtypes)?,
                    down: Dense::new(&l.output, dtypes)?,
                    out_norm: Norm::layer(&l.output_layer_norm, dtype)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            words: embeddings.word_embeddings.to_dtype(dtype)?,
            positions: embeddings.position_embeddings.to_dtype(dtype)?,
            segment: embeddings
                .token_type_embeddings
                .narrow(0, 0, 1)?
                .to_dtype(dtype)?,
            embedding_norm: Norm::layer(&embeddings.layer_norm, dtype)?,
            blocks,
            head_dense: Dense::new(&head.transform, dtypes)?,
            head_norm: Norm::layer(&head.layer_norm, dtype)?,
            decoder: Dense::from_parts(&head.decoder_weight, None, dtypes)?,
            decoder_bias: head.decoder_bias.to_dtype(dtype)?,
            activation: cfg.activation(),
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            dtype,
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

    fn device(&self) -> &Device {
        self.words.device()
    }

    /// The embedding output `[S, H]` of a prompt's token ids (segment 0).
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let positions = self.positions.dim(0)?;
        crate::attribution::engine::check_token_ids(ids, positions, self.vocab)?;
        let index = Tensor::new(ids, self.device())?;
        let summed = self
            .words
            .index_select(&index, 0)?
            .add(&self.positions.narrow(0, 0, ids.len())?)?
            .broadcast_add(&self.segment)?;
        Ok(self.embedding_norm.forward(&summed)?.0)
    }

    /// The normal pass of a prompt's token ids with the mask at `mask`.
    pub fn prepare<F: Real>(&self, ids: &[u32], mask: usize) -> Result<BertTensorPass<'_, F>> {
        if mask >= ids.len() {
            return Err(Error::Prompt(format!(
                "mask position {mask} is outside the prompt's {} tokens",
                ids.len()
            )));
        }
        let seq = ids.len();
        let mut x = self.embed(ids)?;
        let (mut inputs, mut attended, mut device_neurons) = (Vec::new(), Vec::new(), Vec::new());
        for block in &self.blocks {
            let (out, _, ffn_input, neurons) = self.block_forward(block, &x, 1, seq, None)?;
            attended.push(ffn_input.narrow(0, mask, 1)?);
            device_neurons.push(neurons.narrow(0, mask, 1)?);
            inputs.push(x);
            x = out;
        }
        let (probabilities, _) = self.head_forward(&x.narrow(0, mask, 1)?)?;
        Ok(BertTensorPass {
            engine: self,
            seq,
            mask,
            neurons: device_neurons
                .iter()
                .map(F::from_tensor)
                .collect::<Result<_>>()?,
            probabilities: F::from_tensor(&probabilities)?,
            inputs,
            attended,
            device_neurons,
        })
    }

    /// `[n·S, H]` (`n` sequences) → heads `[n, heads, rows, d]`.
    fn split_heads(&self, x: &Tensor, n: usize, rows: usize) -> Ops<Tensor> {
        let d = self.hidden / self.heads;
        x.reshape((n, rows, self.heads, d))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Heads `[n, heads, rows, d]` → `[n·rows, H]`.
    fn merge_heads(&self, x: &Tensor) -> Ops<Tensor> {
        let (n, _, rows, _) = x.dims4()?;
        x.transpose(1, 2)?.reshape((n * rows, self.hidden))
    }

    /// One block on `x [n·S, H]`, all rows or only row `only` of each sequence as
    /// queries. Returns the output `[n·Q, H]`, the cache, the FFN input and the neurons
    /// (`[n·Q, H]`, `[n·Q, I]`).
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        n: usize,
        seq: usize,
        only: Option<usize>,
    ) -> Ops<(Tensor, BlockCache, Tensor, Tensor)> {
        let h = self.hidden;
        let (x_q, nq) = match only {
            None => (x.clone(), seq),
            Some(p) => (x.reshape((n, seq, h))?.narrow(1, p, 1)?.reshape((n, h))?, 1),
        };
        let q = self.split_heads(&block.query.forward(&x_q)?, n, nq)?;
        let k = self.split_heads(&block.key.forward(x)?, n, seq)?;
        let v = self.split_heads(&block.value.forward(x)?, n, seq)?;
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let probs = softmax(&(q.matmul(&k.t()?)? * scale)?)?;
        let context = self.merge_heads(&probs.matmul(&v)?)?;
        let attn = (block.attn_out.forward(&context)? + &x_q)?;
        let (attended, attn_norm) = block.attn_norm.forward(&attn)?;
        let (neurons, slope) = activate(self.activation, &block.up.forward(&attended)?)?;
        let out = (block.down.forward(&neurons)? + &attended)?;
        let (out, out_norm) = block.out_norm.forward(&out)?;
        let cache = BlockCache {
            only,
            q,
            k,
            v,
            probs,
            attn_norm,
            slope,
            out_norm,
        };
        Ok((out, cache, attended, neurons))
    }

    /// The gradient of a block's input `[n·S, H]` from its output rows' `[n·Q, H]`.
    fn block_backward(&self, block: &Block, cache: &BlockCache, d_out: &Tensor) -> Ops<Tensor> {
        let (n, _, seq, _) = cache.k.dims4()?;
        let h = self.hidden;
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let d_res2 = block.out_norm.backward(d_out, &cache.out_norm)?;
        // FFN: d_attended = d_res2 (residual) + (d_res2 · W_down ⊙ f') · W_up.
        let d_neurons = (block.down.backward_input(&d_res2)? * &cache.slope)?;
        let d_attended = (block.up.backward_input(&d_neurons)? + d_res2)?;
        let d_res1 = block.attn_norm.backward(&d_attended, &cache.attn_norm)?;
        let nq = cache.q.dim(2)?;
        let d_context = self.split_heads(&block.attn_out.backward_input(&d_res1)?, n, nq)?;
        // Attention: dP = dC·Vᵀ, dV = Pᵀ·dC, dS = P ⊙ (dP − Σ P⊙dP).
        let d_probs = d_context.matmul(&cache.v.t()?)?;
        let d_v = cache.probs.t()?.matmul(&d_context)?;
        let weighted = (&cache.probs * &d_probs)?.sum_keepdim(3)?;
        let d_scores = ((&cache.probs * d_probs.broadcast_sub(&weighted)?)? * scale)?;
        let d_q = self.merge_heads(&d_scores.matmul(&cache.k)?)?;
        let d_k = self.merge_heads(&d_scores.t()?.matmul(&cache.q)?)?;
        let d_v = self.merge_heads(&d_v)?;
        let d_x = (block.key.backward_input(&d_k)? + block.value.backward_input(&d_v)?)?;
        // The query path and the residual reach only the query rows.
        let d_xq = (block.query.backward_input(&d_q)? + d_res1)?;
        match cache.only {
            None => d_x + d_xq,
            Some(p) => {
                let d_x = d_x.reshape((n, seq, h))?;
                let row = (d_x.narrow(1, p, 1)? + d_xq.reshape((n, 1, h))?)?;
                let mut parts = Vec::with_capacity(3);
                if p > 0 {
                    parts.push(d_x.narrow(1, 0, p)?);
                }
                parts.push(row);
                if p + 1 < seq {
                    parts.push(d_x.narrow(1, p + 1, seq - p - 1)?);
                }
                Tensor::cat(&parts, 1)?.reshape((n * seq, h))
            }
        }
    }

    /// The head on rows `[R, H]`: probabilities `[R, V]`, and the transform's slope and
    /// norm cache for the backward.
    fn head_forward(&self, top: &Tensor) -> Ops<(Tensor, (Tensor, NormCache))> {
        let (activated, slope) = activate(self.activation, &self.head_dense.forward(top)?)?;
        let (normed, norm) = self.head_norm.forward(&activated)?;
        let logits = self
            .decoder
            .forward(&normed)?
            .broadcast_add(&self.decoder_bias)?;
        Ok((softmax(&logits)?, (slope, norm)))
    }

    fn head_backward(&self, d_logits: &Tensor, cache: &(Tensor, NormCache)) -> Ops<Tensor> {
        let d_normed = self.decoder.backward_input(d_logits)?;
        let d_activated = (self.head_norm.backward(&d_normed, &cache.1)? * &cache.0)?;
        self.head_dense.backward_input(&d_activated)
    }
}

impl<F: Real> BertTensorPass<'_, F> {
    /// Layer `layers[g]`'s group: its own layer from the scaled neurons on, at the mask
    /// row only (the other rows of that layer's output do not depend on them).
    fn own_forward(&self, layer: usize, alphas: &[f64]) -> Ops<(Tensor, NormCache)> {
        let block = &self.engine.blocks[layer];
        let neurons = scaled(&self.device_neurons[layer], alphas)?;
        let pre = block
            .down
            .forward(&neurons)?
            .broadcast_add(&self.attended[layer])?;
        block.out_norm.forward(&pre)
    }

    /// The normal input of layer `depth` for `b` points, with the mask rows replaced by
    /// `rows [b, H]`: `[b·S, H]`.
    fn with_mask_rows(&self, depth: usize, rows: &Tensor) -> Ops<Tensor> {
        let (seq, mask, h) = (self.seq, self.mask, self.engine.hidden);
        let b = rows.dim(0)?;
        let normal = &self.inputs[depth];
        let mut parts = Vec::with_capacity(3);
        if mask > 0 {
            parts.push(
                normal
                    .narrow(0, 0, mask)?
                    .unsqueeze(0)?
                    .broadcast_as((b, mask, h))?,
            );
        }
        parts.push(rows.unsqueeze(1)?);
        if mask + 1 < seq {
            let rest = seq - mask - 1;
            parts.push(
                normal
                    .narrow(0, mask + 1, rest)?
                    .unsqueeze(0)?
                    .broadcast_as((b, rest, h))?,
            );
        }
        Tensor::cat(&parts, 1)?.reshape((b * seq, h))
    }

    /// The stacked integration of `layers` (see `attribution::bert`'s `gradients`): at
    /// layer d every group L < d is one batch; the head runs once for all groups; the
    /// backward comes down the same way, a group leaving where it entered.
    pub(super) fn gradients(
        &self,
        layers: &[usize],
        alphas: &[f64],
        gold: usize,
    ) -> Ops<Vec<LayerGradients<F>>> {
        let e = self.engine;
        let Some(&first) = layers.first() else {
            return Ok(Vec::new());
        };
        let (h, seq, mask) = (e.hidden, self.seq, self.mask);
        let b = alphas.len();
        let top = e.blocks.len() - 1;
        let group_of = |layer: usize| layers.iter().position(|&l| l == layer);
        let own = layers
            .iter()
            .map(|&layer| self.own_forward(layer, alphas))
            .collect::<Ops<Vec<_>>>()?;

        let mut x: Option<Tensor> = None;
        let mut stacked = 0;
        let mut caches = Vec::new();
        for depth in first + 1..=top {
            if let Some(g) = group_of(depth - 1) {
                x = Some(push_rows(x, &self.with_mask_rows(depth, &own[g].0)?)?);
                stacked += 1;
            }
            let only = (depth == top).then_some(mask);
            let input = x.take().expect("a group is stacked");
            let (out, cache, _, _) =
                e.block_forward(&e.blocks[depth], &input, stacked * b, seq, only)?;
            caches.push((depth, cache));
            x = Some(out);
        }
        if let Some(g) = group_of(top) {
            x = Some(push_rows(x, &own[g].0)?);
        }
        let head_rows = x.expect("at least one group");
        let (probs, head_cache) = e.head_forward(&head_rows)?;
        let (gold_p, d_logits) = gold_probability_gradient(&probs, gold)?;
        drop(probs);
        let mut d = e.head_backward(&d_logits, &head_cache)?;
        drop(d_logits);

        let mut d_own: Vec<Option<Tensor>> = vec![None; layers.len()];
        let own_backward = |g: usize, d_rows: &Tensor| -> Ops<Tensor> {
            let block = &e.blocks[layers[g]];
            block
                .down
                .backward_input(&block.out_norm.backward(d_rows, &own[g].1)?)
        };
        if let Some(g) = group_of(top) {
            d_own[g] = Some(own_backward(g, &d.narrow(0, g * b, b)?)?);
            d = d.narrow(0, 0, g * b)?;
        }
        while let Some((depth, cache)) = caches.pop() {
            d = e.block_backward(&e.blocks[depth], &cache, &d)?;
            drop(cache);
            if let Some(g) = group_of(depth - 1) {
                let rows = d
                    .narrow(0, g * b * seq, b * seq)?
                    .reshape((b, seq, h))?
                    .narrow(1, mask, 1)?
                    .reshape((b, h))?;
                d_own[g] = Some(own_backward(g, &rows)?);
                d = d.narrow(0, 0, g * b * seq)?;
            }
        }
        let gold_p = F::from_tensor(&gold_p).map_err(into_candle)?;
        d_own
            .into_iter()
            .zip(gold_p.chunks(b))
            .map(|(gradients, p)| {
                let gradients = gradients.expect("every group left the stack");
                Ok(LayerGradients {
                    probabilities: p.to_vec(),
                    gradients: F::from_tensor(&gradients).map_err(into_candle)?,
                })
            })
            .collect()
    }

    /// Bytes of device memory one integration point takes when all layers are stacked:
    /// each layer's cache (q, k, v, two norms, the slopes, the attention probabilities)
    /// for the groups below it, the head's logits; twice, for what the products hold
    /// while they run.
    pub(super) fn bytes_per_point(&self) -> usize {
        let e = self.engine;
        let (h, i, n, seq) = (e.hidden, e.intermediate, e.blocks.len(), self.seq);
        let row = 5 * h + i + e.heads * seq;
        let groups = n * n.saturating_sub(1) / 2;
        2 * (groups * seq * row + n * 3 * e.vocab) * e.dtype.size_in_bytes()
    }

    /// The normal pass's neurons and probabilities on the host.
    pub(super) fn host(&self) -> (&[Vec<F>], &[F]) {
        (&self.neurons, &self.probabilities)
    }
}

/// A host-copy error as candle's (it is one).
fn into_candle(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}
