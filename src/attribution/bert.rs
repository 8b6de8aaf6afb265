//! The BERT attribution engine: a forward and backward pass on plain buffers that
//! computes only what integrated gradients needs: gradients with respect to
//! *activations* (never weights), outputs and input gradients only at the rows that are
//! read, and the integration of every layer stacked into one pass
//! ([`BertEngine::gradients`]). The IG loop itself is in [`super::ig`]; the kernels in
//! [`super::kernels`].
//!
//! Shapes: `B` batch (sequences: integration points, of every stacked layer), `S`
//! sequence, `Q` query rows (all `S`, or only the mask row in the top layer), `H`
//! hidden, `I` intermediate (neurons), `V` vocabulary. Matrices are row-major; weights
//! keep PyTorch's `[out, in]` layout.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::error::Result;
use crate::model::config::Activation;
use crate::model::BertMaskedLm;

use super::engine::{LayerGradients, PromptPass};
use super::kernels::{
    activate, add_in_place, gold_probability_gradient, matmul, repeat_rows, softmax_rows, Dense,
    Norm, NormCache, Real, ELEMENTS_PER_TASK, ROWS_PER_TASK,
};

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
    /// f'(pre-activation) of the FFN neurons, `[B·Q, I]`.
    slope: Vec<F>,
    out_norm: NormCache<F>,
}

/// The model's weights as flat buffers, and the shapes.
#[derive(Debug, Clone)]
pub struct BertEngine<F> {
    embeddings: Embeddings<F>,
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

/// The input embeddings (segment 0), summed and normalised.
#[derive(Debug, Clone)]
struct Embeddings<F> {
    /// `[V, H]`; `None` when the decoder is the same matrix (tied weights): kept once.
    words: Option<Vec<F>>,
    /// `[max_positions, H]`
    positions: Vec<F>,
    /// `[H]`: token type 0.
    segment: Vec<F>,
    norm: Norm<F>,
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

impl<F: Real> BertEngine<F> {
    /// Copies the weights of a loaded model (any dtype, any device) into flat buffers.
    pub fn new(model: &BertMaskedLm) -> Result<Self> {
        // Cloning a candle model only clones handles to its tensors.
        Self::from_model(model.clone())
    }

    /// As [`Self::new`], releasing each layer of `model` once it is copied, so that the
    /// model's weights are never held twice in full.
    pub fn from_model(model: BertMaskedLm) -> Result<Self> {
        let BertMaskedLm {
            config: cfg,
            embeddings,
            layers,
            head,
        } = model;
        let tied = embeddings.word_embeddings.id() == head.decoder_weight.id();
        let embeddings = Embeddings {
            words: if tied {
                None
            } else {
                Some(F::from_tensor(&embeddings.word_embeddings)?)
            },
            positions: F::from_tensor(&embeddings.position_embeddings)?,
            segment: F::from_tensor(&embeddings.token_type_embeddings.get(0)?)?,
            norm: Norm::from(&embeddings.layer_norm)?,
        };
        let blocks = layers
            .into_iter()
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
        Ok(Self {
            embeddings,
            blocks,
            head_dense: Dense::from(&head.transform)?,
            head_norm: Norm::from(&head.layer_norm)?,
            decoder: F::from_tensor(&head.decoder_weight)?,
            decoder_bias: F::from_tensor(&head.decoder_bias)?,
            activation: cfg.activation(),
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            vocab: cfg.vocab_size,
        })
    }

    /// The embedding output `[S, H]` of a prompt's token ids (segment 0).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<F>> {
        let h = self.hidden;
        let e = &self.embeddings;
        let positions = e.positions.len() / h;
        crate::attribution::engine::check_token_ids(ids, positions, self.vocab)?;
        let words = e.words.as_ref().unwrap_or(&self.decoder);
        let mut summed = Vec::with_capacity(ids.len() * h);
        for (position, &id) in ids.iter().enumerate() {
            let word = &words[id as usize * h..][..h];
            let place = &e.positions[position * h..][..h];
            summed.extend(
                word.iter()
                    .zip(place)
                    .zip(&e.segment)
                    .map(|((&w, &p), &s)| w + p + s),
            );
        }
        Ok(e.norm.forward(&summed).0)
    }

    /// Bytes [`Self::gradients`] keeps for the backward pass per integration point, when
    /// all layers of a prompt of `seq` tokens are stacked.
    pub fn cache_bytes_per_point(&self, seq: usize) -> usize {
        let (h, i, n) = (self.hidden, self.intermediate, self.blocks.len());
        // Per row: q, k, v, two normalised copies, the activation slopes, attention.
        let row = 5 * h + i + self.heads * seq;
        // Layer d (below the top) holds d groups of seq rows; the top layer keeps k and v
        // of every row and the rest of the mask row only; the head two rows of logits.
        let below_top = n.saturating_sub(2) * n.saturating_sub(1) / 2 * seq * row;
        let top = n.saturating_sub(1) * (2 * h * seq + row);
        let head = n * 2 * self.vocab;
        (below_top + top + head) * std::mem::size_of::<F>()
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// Neurons per layer.
    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    /// The unscaled forward of one prompt from its embedding output `[S, H]`
    /// ([`Self::embed`]).
    pub fn base_forward(&self, embedded: Vec<F>, mask: usize) -> BaseForward<F> {
        let h = self.hidden;
        let seq = embedded.len() / h;
        let mut inputs = vec![embedded];
        let mut attended = Vec::new();
        let mut neurons = Vec::new();
        for block in &self.blocks {
            let x = inputs.last().expect("input");
            let (out, cache, activated) = self.block_forward(block, x, 1, seq, Rows::All);
            // The FFN input at the mask, from the normalised row LayerNorm kept.
            let xhat = &cache.attn_norm.xhat[mask * h..(mask + 1) * h];
            let norm = &block.attn_norm;
            attended.push(
                xhat.iter()
                    .zip(norm.gamma.iter().zip(&norm.beta))
                    .map(|(&x, (&g, &b))| x * g + b)
                    .collect(),
            );
            let width = self.intermediate;
            neurons.push(activated[mask * width..(mask + 1) * width].to_vec());
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
        let result = self
            .gradients(base, &[layer], alphas, gold)
            .pop()
            .expect("one layer");
        (result.probabilities, result.gradients)
    }

    /// [`Self::scaled_gradients`] for several layers (ascending, distinct) in one pass.
    ///
    /// Each layer L is a *group* of `B` sequences (one per α) that differ from the normal
    /// forward pass from L's mask row on. The groups go up the model stacked: at layer d
    /// every group with L < d is one batch, so each weight matrix is read once per layer
    /// for all groups, the products are large enough to keep every core busy, and the
    /// MLM head (its vocabulary-sized decoder) runs once for all groups. The backward
    /// pass comes down the same way; a group leaves the stack at the layer it entered.
    pub fn gradients(
        &self,
        base: &BaseForward<F>,
        layers: &[usize],
        alphas: &[F],
        gold: usize,
    ) -> Vec<LayerGradients<F>> {
        assert!(
            layers.windows(2).all(|w| w[0] < w[1]),
            "layers ascending, distinct"
        );
        let Some(&first) = layers.first() else {
            return Vec::new();
        };
        let (h, seq, mask) = (self.hidden, base.seq, base.mask);
        let batch = alphas.len();
        let last = self.blocks.len() - 1;
        let group_of = |layer: usize| layers.iter().position(|&l| l == layer);

        // Each group's own layer from its neurons on, at the mask row only: the other
        // rows of that layer's output do not depend on the neurons at the mask.
        let own: Vec<(Vec<F>, NormCache<F>)> = layers
            .iter()
            .map(|&layer| {
                let block = &self.blocks[layer];
                let w = &base.neurons[layer];
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
                block.out_norm.forward(&pre)
            })
            .collect();

        // Up: at layer d the group of layer d − 1 joins the stack (the normal input of d
        // with its mask rows), after the groups already there. The top layer computes
        // only the mask rows, which are all the head reads.
        let mut x: Vec<F> = Vec::new();
        let mut stacked = 0;
        let mut caches = Vec::new();
        for depth in first + 1..=last {
            if let Some(g) = group_of(depth - 1) {
                let normal = &base.inputs[depth];
                for row in own[g].0.chunks(h) {
                    x.extend_from_slice(&normal[..mask * h]);
                    x.extend_from_slice(row);
                    x.extend_from_slice(&normal[(mask + 1) * h..]);
                }
                stacked += 1;
            }
            let rows = if depth == last {
                Rows::One(mask)
            } else {
                Rows::All
            };
            let (out, cache, _) =
                self.block_forward(&self.blocks[depth], &x, stacked * batch, seq, rows);
            caches.push((depth, stacked, cache));
            x = out;
        }
        // The head's rows, group by group: those of the stack, then the top layer's own.
        let mut top = x;
        if let Some(g) = group_of(last) {
            top.extend_from_slice(&own[g].0);
        }

        // Head and the gold probability's gradient, dP_gold/dz_j = P_gold (δ_gold,j − p_j).
        let rows = layers.len() * batch;
        let (mut d_logits, head_cache) = self.head_probabilities(&top, rows);
        let v = self.vocab;
        let gold_p = gold_probability_gradient(&mut d_logits, v, gold);
        let mut d = self.head_backward(&d_logits, &head_cache, rows);
        drop(d_logits);

        // Down: at the layer where a group joined, its gradient at the mask rows goes
        // into its own layer, and the group leaves the stack.
        let mut d_own: Vec<Option<Vec<F>>> = vec![None; layers.len()];
        let mut own_backward = |g: usize, d_mask_rows: &[F]| {
            let block = &self.blocks[layers[g]];
            let d_pre = block.out_norm.backward(d_mask_rows, &own[g].1);
            let mut d_neurons = vec![F::zero(); batch * self.intermediate];
            block
                .down
                .backward_input(&d_pre, batch, &mut d_neurons, false);
            d_own[g] = Some(d_neurons);
        };
        if let Some(g) = group_of(last) {
            own_backward(g, &d[g * batch * h..]);
            d.truncate(g * batch * h);
        }
        while let Some((depth, stacked, cache)) = caches.pop() {
            // The group that joined here needs its gradient at the mask rows only.
            let joined = group_of(depth - 1);
            let full = stacked - usize::from(joined.is_some());
            d = self.block_backward(
                &self.blocks[depth],
                &cache,
                &d,
                stacked * batch,
                full * batch,
                mask,
            );
            drop(cache);
            if let Some(g) = joined {
                let start = g * batch * seq * h;
                own_backward(g, &d[start..]);
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

    /// Head on `[B, H]` rows: probabilities `[B, V]` and what the backward needs.
    fn head_probabilities(&self, top: &[F], batch: usize) -> (Vec<F>, HeadCache<F>) {
        let (activated, slope) = activate(self.activation, &self.head_dense.forward(top, batch));
        let (normed, norm) = self.head_norm.forward(&activated);
        let v = self.vocab;
        let mut logits = repeat_rows(&self.decoder_bias, batch);
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
        softmax_rows(&mut logits, v);
        (logits, HeadCache { slope, norm })
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
        for (d, &s) in d_act.iter_mut().zip(&cache.slope) {
            *d = *d * s;
        }
        let mut d_top = vec![F::zero(); batch * h];
        self.head_dense
            .backward_input(&d_act, batch, &mut d_top, false);
        d_top
    }

    /// One block on `x [B·S, H]`; returns the output rows `[B·Q, H]`, its cache, and the
    /// FFN neurons `[B·Q, I]`.
    fn block_forward(
        &self,
        block: &Block<F>,
        x: &[F],
        batch: usize,
        seq: usize,
        rows: Rows,
    ) -> (Vec<F>, BlockCache<F>, Vec<F>) {
        let h = self.hidden;
        let (nq, x_q) = query_rows(x, batch, seq, h, rows);
        let q = block.query.forward(&x_q, batch * nq);
        let k = block.key.forward(x, batch * seq);
        let v = block.value.forward(x, batch * seq);
        let (context, probs) = self.attention(&q, &k, &v, batch, seq, nq);
        let mut attn = block.attn_out.forward(&context, batch * nq);
        add_in_place(&mut attn, &x_q);
        let (attended, attn_norm) = block.attn_norm.forward(&attn);
        let (activated, slope) =
            activate(self.activation, &block.up.forward(&attended, batch * nq));
        let mut out = block.down.forward(&activated, batch * nq);
        add_in_place(&mut out, &attended);
        let (out, out_norm) = block.out_norm.forward(&out);
        let cache = BlockCache {
            rows,
            seq,
            q,
            k,
            v,
            probs,
            attn_norm,
            slope,
            out_norm,
        };
        (out, cache, activated)
    }

    /// Gradient of a block's input from that of its output rows `[B·Q, H]`: `[full·S, H]`
    /// for the first `full` sequences, then `[B − full, H]`, row `only` of each of the
    /// others.
    fn block_backward(
        &self,
        block: &Block<F>,
        cache: &BlockCache<F>,
        d_out: &[F],
        batch: usize,
        full: usize,
        only: usize,
    ) -> Vec<F> {
        let (h, seq) = (self.hidden, cache.seq);
        let nq = cache.q.len() / (batch * h);
        let d_res2 = block.out_norm.backward(d_out, &cache.out_norm);
        // FFN: d_attended = d_res2 (residual) + (d_res2 · W_down ⊙ act') · W_up
        let mut d_act = vec![F::zero(); batch * nq * self.intermediate];
        block
            .down
            .backward_input(&d_res2, batch * nq, &mut d_act, false);
        d_act
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(cache.slope.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(d, s)| {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = *d * s;
                }
            });
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

        // Input gradients of the first `full` sequences at every row; of the others only
        // at row `only` (the rows below need no more).
        let (x_rows, q_rows) = (full * seq, full * nq);
        let mut d_x = vec![F::zero(); (x_rows + batch - full) * h];
        let (d_full, d_only) = d_x.split_at_mut(x_rows * h);
        block
            .key
            .backward_input(&d_k[..x_rows * h], x_rows, d_full, false);
        block
            .value
            .backward_input(&d_v[..x_rows * h], x_rows, d_full, true);
        // The query path and the residual reach only the query rows.
        let mut d_xq = d_res1[..q_rows * h].to_vec();
        block
            .query
            .backward_input(&d_q[..q_rows * h], q_rows, &mut d_xq, true);
        match cache.rows {
            Rows::All => add_in_place(d_full, &d_xq),
            Rows::One(p) => {
                for (sequence, g) in d_full.chunks_mut(seq * h).zip(d_xq.chunks(h)) {
                    for (d, &g) in sequence[p * h..(p + 1) * h].iter_mut().zip(g) {
                        *d += g;
                    }
                }
            }
        }
        if full < batch {
            // Row `only` of each remaining sequence, in x's rows and in the query rows.
            let pick = |m: &[F], per_sequence: usize, row: usize| -> Vec<F> {
                m.chunks(per_sequence * h)
                    .skip(full)
                    .flat_map(|sequence| sequence[row * h..(row + 1) * h].iter().copied())
                    .collect()
            };
            let q_row = match cache.rows {
                Rows::All => only,
                Rows::One(p) => {
                    assert_eq!(p, only, "the top layer computes only the row asked for");
                    0
                }
            };
            let rest = batch - full;
            d_only.copy_from_slice(&pick(&d_res1, nq, q_row));
            block
                .key
                .backward_input(&pick(&d_k, seq, only), rest, d_only, true);
            block
                .value
                .backward_input(&pick(&d_v, seq, only), rest, d_only, true);
            block
                .query
                .backward_input(&pick(&d_q, nq, q_row), rest, d_only, true);
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
                        *s = F::dot(qi, kj) * scale;
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
        (heads_to_rows(&per_head_ctx, heads, nq, d), probs)
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
                        dp[j] = F::dot(dc, vj);
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
            heads_to_rows(&d_q, heads, nq, d),
            heads_to_rows(&d_k, heads, seq, d),
            heads_to_rows(&d_v, heads, seq, d),
        )
    }
}

/// A BERT prompt's normal pass, with the engine that made it.
pub struct BertPass<'a, F> {
    engine: &'a BertEngine<F>,
    base: BaseForward<F>,
}

impl<F: Real> BertEngine<F> {
    /// The normal pass of a prompt's token ids with the mask at `mask`.
    pub fn prepare(&self, ids: &[u32], mask: usize) -> Result<BertPass<'_, F>> {
        Ok(BertPass {
            engine: self,
            base: self.base_forward(self.embed(ids)?, mask),
        })
    }
}

impl<F: Real> PromptPass<F> for BertPass<'_, F> {
    fn neurons(&self) -> &[Vec<F>] {
        &self.base.neurons
    }

    fn probabilities(&self) -> &[F] {
        &self.base.probabilities
    }

    fn cache_bytes_per_point(&self) -> usize {
        self.engine.cache_bytes_per_point(self.base.seq)
    }

    fn gradients(
        &self,
        layers: &[usize],
        alphas: &[F],
        gold: usize,
    ) -> Result<Vec<LayerGradients<F>>> {
        Ok(self.engine.gradients(&self.base, layers, alphas, gold))
    }
}

#[derive(Debug, Clone)]
struct HeadCache<F> {
    /// f'(pre-activation) of the transform.
    slope: Vec<F>,
    norm: NormCache<F>,
}

/// `[B, heads, R, d]` → `[B·R, heads·d]`.
fn heads_to_rows<F: Real>(x: &[F], heads: usize, rows: usize, d: usize) -> Vec<F> {
    let mut out = vec![F::zero(); x.len()];
    out.par_chunks_mut(rows * heads * d)
        .zip(x.par_chunks(heads * rows * d))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(out, x)| {
            for hd in 0..heads {
                for r in 0..rows {
                    out[r * heads * d + hd * d..][..d]
                        .copy_from_slice(&x[(hd * rows + r) * d..][..d]);
                }
            }
        });
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
    use crate::attribution::kernels::transpose;
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

    fn base(engine: &BertEngine<f64>, model: &BertMaskedLm) -> BaseForward<f64> {
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
        let engine = BertEngine::<f64>::new(&model).unwrap();
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
        let engine = BertEngine::<f64>::new(&model).unwrap();
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

    /// The engine's embeddings equal the candle model's; ids outside the vocabulary and
    /// prompts longer than the positions are errors, not panics.
    #[test]
    fn embeddings_match_the_candle_model() {
        let model = tiny(DType::F64);
        let engine = BertEngine::<f64>::new(&model).unwrap();
        let ids = Tensor::new(&IDS, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = f64::from_tensor(&model.embeddings.forward(&ids).unwrap()).unwrap();
        let got = engine.embed(&IDS).unwrap();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert!(engine.embed(&[2, engine.vocab as u32]).is_err());
        let positions = model.config.max_position_embeddings;
        assert!(engine.embed(&vec![2; positions]).is_ok());
        assert!(engine.embed(&vec![2; positions + 1]).is_err());
    }

    /// Stacking layers in one pass gives each layer what it gets alone.
    #[test]
    fn transposes_match_indexing() {
        // Edges past multiples of 8 (rows and columns) and bands past 64 columns.
        for (rows, cols) in [(1, 1), (8, 8), (13, 21), (16, 64), (9, 130), (70, 3)] {
            let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let (t, t64) = (transpose(&x, rows, cols), transpose(&x64, rows, cols));
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        x[r * cols + c],
                        "{rows}×{cols} at {r}, {c}"
                    );
                    assert_eq!(t64[c * rows + r], x64[r * cols + c]);
                }
            }
        }
    }

    #[test]
    fn stacked_layers_equal_single_layers() {
        let model = tiny(DType::F64);
        let engine = BertEngine::<f64>::new(&model).unwrap();
        let base = base(&engine, &model);
        let alphas = [0.0, 0.2, 0.7, 1.0];
        for layers in [vec![0, 1, 2], vec![0, 2], vec![1], vec![1, 2]] {
            let stacked = engine.gradients(&base, &layers, &alphas, GOLD);
            assert_eq!(stacked.len(), layers.len());
            for (&layer, result) in layers.iter().zip(&stacked) {
                let (p, g) = engine.scaled_gradients(&base, layer, &alphas, GOLD);
                assert_eq!(result.probabilities.len(), alphas.len());
                assert_eq!(result.gradients.len(), g.len());
                for (a, b) in result.probabilities.iter().zip(&p) {
                    assert!(
                        (a - b).abs() < 1e-13,
                        "{layers:?}, layer {layer}: P {a} vs {b}"
                    );
                }
                for (a, b) in result.gradients.iter().zip(&g) {
                    assert!(
                        (a - b).abs() < 1e-12,
                        "{layers:?}, layer {layer}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// The f32 engine (what kn runs) is close to the f64 one.
    #[test]
    fn f32_gradients_are_close_to_f64() {
        let model64 = tiny(DType::F64);
        let e64 = BertEngine::<f64>::new(&model64).unwrap();
        let e32 = BertEngine::<f32>::new(&model64).unwrap();
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
