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
    activate, cat_rows, device_name, gold_probability_gradient, layer_results, scaled, softmax,
    Blocks, Dense, Dtypes, Norm, NormCache, Ops,
};
use super::TensorPass;

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

/// `n` sequences of `seq` rows in a stacked batch (one prompt's), with every row a query
/// or only row `only` of each sequence (the top layer: the mask).
#[derive(Debug, Clone, Copy)]
struct Part {
    n: usize,
    seq: usize,
    only: Option<usize>,
}

impl Part {
    /// Query rows per sequence.
    fn queries(&self) -> usize {
        if self.only.is_some() {
            1
        } else {
            self.seq
        }
    }
}

/// One part's attention, for the backward.
struct Attention {
    /// `[n, heads, Q, d]`, `[n, heads, S, d]` (twice), `[n, heads, Q, S]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
}

/// What a block's backward needs from its forward.
struct BlockCache {
    parts: Vec<Part>,
    attention: Vec<Attention>,
    attn_norm: NormCache,
    /// f'(pre-activation) of the neurons, `[Σ n·Q, I]`.
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
            let part = Part {
                n: 1,
                seq,
                only: None,
            };
            let (out, _, ffn_input, neurons) = self.block_forward(block, &x, &[part])?;
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

    /// One block on the parts' sequences stacked in `x [Σ n·S, H]`. Returns the output
    /// `[Σ n·Q, H]`, the cache, the FFN input and the neurons (`[Σ n·Q, H]`, `[Σ n·Q, I]`).
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        parts: &[Part],
    ) -> Ops<(Tensor, BlockCache, Tensor, Tensor)> {
        let h = self.hidden;
        let x_q = if parts.iter().any(|p| p.only.is_some()) {
            let mut start = 0;
            let mut rows = Vec::with_capacity(parts.len());
            for part in parts {
                let x = x.narrow(0, start, part.n * part.seq)?;
                rows.push(match part.only {
                    Some(p) => x
                        .reshape((part.n, part.seq, h))?
                        .narrow(1, p, 1)?
                        .reshape((part.n, h))?,
                    None => x,
                });
                start += part.n * part.seq;
            }
            cat_rows(rows)?
        } else {
            x.clone()
        };
        let (q_all, k_all, v_all) = (
            block.query.forward(&x_q)?,
            block.key.forward(x)?,
            block.value.forward(x)?,
        );
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let (mut start, mut q_start) = (0, 0);
        let (mut contexts, mut attention) = (Vec::new(), Vec::new());
        for part in parts {
            let (n, seq, nq) = (part.n, part.seq, part.queries());
            let q = self.split_heads(&q_all.narrow(0, q_start, n * nq)?, n, nq)?;
            let k = self.split_heads(&k_all.narrow(0, start, n * seq)?, n, seq)?;
            let v = self.split_heads(&v_all.narrow(0, start, n * seq)?, n, seq)?;
            let probs = softmax(&(q.matmul(&k.t()?)? * scale)?)?;
            contexts.push(self.merge_heads(&probs.matmul(&v)?)?);
            attention.push(Attention { q, k, v, probs });
            (start, q_start) = (start + n * seq, q_start + n * nq);
        }
        let attn = (block.attn_out.forward(&cat_rows(contexts)?)? + &x_q)?;
        let (attended, attn_norm) = block.attn_norm.forward(&attn)?;
        let (neurons, slope) = activate(self.activation, &block.up.forward(&attended)?)?;
        let out = (block.down.forward(&neurons)? + &attended)?;
        let (out, out_norm) = block.out_norm.forward(&out)?;
        let cache = BlockCache {
            parts: parts.to_vec(),
            attention,
            attn_norm,
            slope,
            out_norm,
        };
        Ok((out, cache, attended, neurons))
    }

    /// The gradient of a block's input `[Σ n·S, H]` from its output rows' `[Σ n·Q, H]`.
    fn block_backward(&self, block: &Block, cache: &BlockCache, d_out: &Tensor) -> Ops<Tensor> {
        let h = self.hidden;
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let d_res2 = block.out_norm.backward(d_out, &cache.out_norm)?;
        // FFN: d_attended = d_res2 (residual) + (d_res2 · W_down ⊙ f') · W_up.
        let d_neurons = (block.down.backward_input(&d_res2)? * &cache.slope)?;
        let d_attended = (block.up.backward_input(&d_neurons)? + d_res2)?;
        let d_res1 = block.attn_norm.backward(&d_attended, &cache.attn_norm)?;
        let d_context_all = block.attn_out.backward_input(&d_res1)?;
        let mut q_start = 0;
        let (mut d_qs, mut d_ks, mut d_vs) = (Vec::new(), Vec::new(), Vec::new());
        for (part, a) in cache.parts.iter().zip(&cache.attention) {
            let (n, nq) = (part.n, part.queries());
            let d_context = self.split_heads(&d_context_all.narrow(0, q_start, n * nq)?, n, nq)?;
            // Attention: dP = dC·Vᵀ, dV = Pᵀ·dC, dS = P ⊙ (dP − Σ P⊙dP).
            let d_probs = d_context.matmul(&a.v.t()?)?;
            let d_v = a.probs.t()?.matmul(&d_context)?;
            let weighted = (&a.probs * &d_probs)?.sum_keepdim(3)?;
            let d_scores = ((&a.probs * d_probs.broadcast_sub(&weighted)?)? * scale)?;
            d_qs.push(self.merge_heads(&d_scores.matmul(&a.k)?)?);
            d_ks.push(self.merge_heads(&d_scores.t()?.matmul(&a.q)?)?);
            d_vs.push(self.merge_heads(&d_v)?);
            q_start += n * nq;
        }
        let d_x = (block.key.backward_input(&cat_rows(d_ks)?)?
            + block.value.backward_input(&cat_rows(d_vs)?)?)?;
        // The query path and the residual reach only the query rows.
        let d_xq = (block.query.backward_input(&cat_rows(d_qs)?)? + d_res1)?;
        if cache.parts.iter().all(|p| p.only.is_none()) {
            return d_x + d_xq;
        }
        let (mut start, mut q_start) = (0, 0);
        let mut rows = Vec::with_capacity(3 * cache.parts.len());
        for part in &cache.parts {
            let (n, seq, nq) = (part.n, part.seq, part.queries());
            let d_x = d_x.narrow(0, start, n * seq)?;
            let d_xq = d_xq.narrow(0, q_start, n * nq)?;
            match part.only {
                None => rows.push((d_x + d_xq)?),
                Some(p) => {
                    let d_x = d_x.reshape((n, seq, h))?;
                    let row = (d_x.narrow(1, p, 1)? + d_xq.reshape((n, 1, h))?)?;
                    let mut pieces = Vec::with_capacity(3);
                    if p > 0 {
                        pieces.push(d_x.narrow(1, 0, p)?);
                    }
                    pieces.push(row);
                    if p + 1 < seq {
                        pieces.push(d_x.narrow(1, p + 1, seq - p - 1)?);
                    }
                    rows.push(Tensor::cat(&pieces, 1)?.reshape((n * seq, h))?);
                }
            }
            (start, q_start) = (start + n * seq, q_start + n * nq);
        }
        cat_rows(rows)
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

/// One request of a joint batch: a prompt's pass, its layers (ascending, distinct) and
/// its integration points.
pub(super) type Request<'p, 'a, F> = (&'p BertTensorPass<'a, F>, &'p [usize], &'p [f64]);

impl BertTensorEngine {
    /// The stacked integration (see `attribution::bert`'s `gradients`) of several
    /// requests at once: at layer d every group L < d of every request is one batch, each
    /// request's sequences a block of their own length (attention is per block, the
    /// dense products on all rows); the head runs once for all; the backward comes down
    /// the same way, a group leaving where it entered.
    pub(super) fn gradients<F: Real>(
        &self,
        requests: &[Request<'_, '_, F>],
        gold: usize,
    ) -> Ops<Vec<Vec<LayerGradients<F>>>> {
        let h = self.hidden;
        let top = self.blocks.len() - 1;
        let Some(&first) = requests.iter().filter_map(|r| r.1.first()).min() else {
            return Ok(requests.iter().map(|_| Vec::new()).collect());
        };
        let group_of = |r: usize, layer: usize| requests[r].1.iter().position(|&l| l == layer);
        let own = requests
            .iter()
            .map(|(pass, layers, alphas)| {
                layers
                    .iter()
                    .map(|&layer| pass.own_forward(layer, alphas))
                    .collect::<Ops<Vec<_>>>()
            })
            .collect::<Ops<Vec<_>>>()?;

        let mut blocks = Blocks::new(requests.len());
        let mut x: Option<Tensor> = None;
        let mut caches = Vec::new();
        for depth in first + 1..=top {
            let new = (0..requests.len())
                .map(|r| {
                    group_of(r, depth - 1)
                        .map(|g| requests[r].0.with_mask_rows(depth, &own[r][g].0))
                        .transpose()
                })
                .collect::<Ops<Vec<_>>>()?;
            let input = blocks.push(x.take(), &new)?;
            let parts: Vec<Part> = requests
                .iter()
                .zip(&blocks.rows)
                .filter(|(_, &rows)| rows > 0)
                .map(|((pass, _, _), &rows)| Part {
                    n: rows / pass.seq,
                    seq: pass.seq,
                    only: (depth == top).then_some(pass.mask),
                })
                .collect();
            let (out, cache, _, _) = self.block_forward(&self.blocks[depth], &input, &parts)?;
            caches.push((depth, cache, blocks.clone()));
            if depth == top {
                for (rows, (pass, _, _)) in blocks.rows.iter_mut().zip(requests) {
                    *rows /= pass.seq;
                }
            }
            x = Some(out);
        }
        let new: Vec<Option<Tensor>> = (0..requests.len())
            .map(|r| group_of(r, top).map(|g| own[r][g].0.clone()))
            .collect();
        let head_rows = blocks.push(x, &new)?;
        // Block r's rows at the head: its groups in order, `b` rows each.
        let head_spans = blocks.spans();
        let (probs, head_cache) = self.head_forward(&head_rows)?;
        let (gold_p, d_logits) = gold_probability_gradient(&probs, gold)?;
        drop(probs);
        let d = self.head_backward(&d_logits, &head_cache)?;
        drop(d_logits);

        let mut d_own: Vec<Vec<Option<Tensor>>> =
            requests.iter().map(|r| vec![None; r.1.len()]).collect();
        let own_backward = |r: usize, g: usize, d_rows: &Tensor| -> Ops<Tensor> {
            let block = &self.blocks[requests[r].1[g]];
            block
                .down
                .backward_input(&block.out_norm.backward(d_rows, &own[r][g].1)?)
        };
        // Takes the groups of `layer` off the ends of the blocks of `d`, to their own
        // layer's backward: `seq` rows a point (the mask's row kept) below the top, one
        // row a point at it.
        let mut leave = |blocks: &mut Blocks, d: &Tensor, layer: usize| -> Ops<Option<Tensor>> {
            let rows_per_point = |r: usize| if layer == top { 1 } else { requests[r].0.seq };
            let take: Vec<usize> = (0..requests.len())
                .map(|r| group_of(r, layer).map_or(0, |_| requests[r].2.len() * rows_per_point(r)))
                .collect();
            let (rest, taken) = blocks.pop(d, &take)?;
            for (r, rows) in taken.iter().enumerate() {
                if let (Some(rows), Some(g)) = (rows, group_of(r, layer)) {
                    let (pass, b) = (requests[r].0, requests[r].2.len());
                    let rows = if layer == top {
                        rows.clone()
                    } else {
                        rows.reshape((b, pass.seq, h))?
                            .narrow(1, pass.mask, 1)?
                            .reshape((b, h))?
                    };
                    d_own[r][g] = Some(own_backward(r, g, &rows)?);
                }
            }
            Ok(rest)
        };
        let mut d = leave(&mut blocks, &d, top)?;
        while let Some((depth, cache, entered)) = caches.pop() {
            let d_out = d.take().expect("groups below the top stay in the stack");
            let d_in = self.block_backward(&self.blocks[depth], &cache, &d_out)?;
            drop(cache);
            blocks = entered;
            d = leave(&mut blocks, &d_in, depth - 1)?;
        }
        let points: Vec<usize> = requests.iter().map(|r| r.2.len()).collect();
        layer_results(&gold_p, &head_spans, &points, d_own)
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
}

impl<F: Real> TensorPass<F> for BertTensorPass<'_, F> {
    fn host(&self) -> (&[Vec<F>], &[F]) {
        (&self.neurons, &self.probabilities)
    }

    /// Bytes of device memory one integration point takes when all layers are stacked:
    /// each layer's cache (q, k, v, two norms, the slopes, the attention probabilities)
    /// for the groups below it, the head's logits; twice, for what the products hold
    /// while they run.
    fn bytes_per_point(&self) -> usize {
        let e = self.engine;
        let (h, i, n, seq) = (e.hidden, e.intermediate, e.blocks.len(), self.seq);
        let row = 5 * h + i + e.heads * seq;
        let groups = n * n.saturating_sub(1) / 2;
        2 * (groups * seq * row + n * 3 * e.vocab) * e.dtype.size_in_bytes()
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
