//! Integrated gradients over FFN neurons (Dai et al. 2022; docs/guide/attribute.md).
//!
//! For one prompt and one layer L: let `w` be L's neurons at the `[MASK]` position in the
//! normal forward pass. Replace that whole vector by `α·w` (other positions and layers
//! untouched) and let `P(α)` be the probability of the gold token at the mask. Then
//!
//! ```text
//! Attr_i = w_i · Σ_k c_k · ∂P(α_k·w)/∂w_i        (≈ w_i ∫₀¹ ∂P(α·w)/∂w_i dα)
//! ```
//!
//! with quadrature nodes `α_k` and weights `c_k` from a [`Rule`]. The released code uses
//! the left Riemann sum (`α_k = k/m`, `c_k = 1/m`). Completeness: `Σ_i Attr_i` should
//! equal `P(1) − P(0)`; the gap tells whether `m` is large enough.
//!
//! The loop below does, per prompt: one normal forward pass (kept: every layer's input,
//! neurons and FFN input at the mask), then for each layer L the batch of scaled points
//! from layer L up only, and a backward pass to L's neurons only (no weight gradients),
//! in chunks of at most `chunk` points to bound memory. The engine runs all layers' L
//! batches of a chunk together ([`PromptPass::gradients`]), whatever the architecture.
//! An engine that can ([`PromptPasses::joint`]: the tensor engine, for GPUs) also takes
//! the points of a fact's several prompts in one chunk; each prompt's integral stays its
//! own, so the scores are the same as one prompt at a time, to rounding.

use serde::{Deserialize, Serialize};

use super::engine::{PromptPass, PromptPasses, Real, Request};
use crate::error::{Error, Result};

/// A quadrature rule on [0, 1] for the IG integral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// `α_k = k/m`, k = 0..m−1: the released code.
    Left,
    /// `α_k = (k+1)/m`: the paper's formula.
    Right,
    /// `α_k = (k+½)/m`: far more accurate for the same m.
    Midpoint,
    /// m-point Gauss–Legendre: exact for polynomials of degree 2m−1.
    Gauss,
    /// Adaptive Gauss–Kronrod: 15 points on [0, 1] (exact to degree 22), the embedded
    /// 7-point Gauss rule's difference as the error estimate, and intervals halved, per
    /// layer, until every score's estimated error is below [`IgOptions::tolerance`].
    GaussKronrod,
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "left" => Ok(Self::Left),
            "right" => Ok(Self::Right),
            "midpoint" => Ok(Self::Midpoint),
            "gauss" | "gauss-legendre" => Ok(Self::Gauss),
            "gauss-kronrod" | "kronrod" => Ok(Self::GaussKronrod),
            _ => Err(format!(
                "unknown rule {s:?} (left, right, midpoint, gauss, gauss-kronrod)"
            )),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Left => "left",
            Self::Right => "right",
            Self::Midpoint => "midpoint",
            Self::Gauss => "gauss",
            Self::GaussKronrod => "gauss-kronrod",
        })
    }
}

impl Rule {
    /// The `m` nodes `α_k` and weights `c_k` (summing to 1). Gauss–Kronrod has 15
    /// nodes whatever `m` (its first interval, before any halving).
    pub fn nodes(self, m: usize) -> Vec<(f64, f64)> {
        let w = 1.0 / m as f64;
        match self {
            Self::Left => (0..m).map(|k| (k as f64 * w, w)).collect(),
            Self::Right => (1..=m).map(|k| (k as f64 * w, w)).collect(),
            Self::Midpoint => (0..m).map(|k| ((k as f64 + 0.5) * w, w)).collect(),
            Self::Gauss => gauss_legendre(m),
            Self::GaussKronrod => kronrod_nodes(0.0, 1.0)
                .into_iter()
                .map(|(alpha, kronrod, _)| (alpha, kronrod))
                .collect(),
        }
    }
}

/// Gauss–Kronrod 7–15 on [−1, 1] (QUADPACK's qk15): the Kronrod abscissae from the
/// outside in (0 last), their weights, and the weights of the 7-point Gauss rule, whose
/// nodes are the odd-numbered abscissae (1, 3, 5 and 0).
const KRONROD_X: [f64; 8] = [
    0.991_455_371_120_812_6,
    0.949_107_912_342_758_5,
    0.864_864_423_359_769_1,
    0.741_531_185_599_394_4,
    0.586_087_235_467_691_1,
    0.405_845_151_377_397_2,
    0.207_784_955_007_898_5,
    0.0,
];
const KRONROD_W: [f64; 8] = [
    0.022_935_322_010_529_22,
    0.063_092_092_629_978_55,
    0.104_790_010_322_250_2,
    0.140_653_259_715_525_9,
    0.169_004_726_639_267_9,
    0.190_350_578_064_785_4,
    0.204_432_940_075_298_9,
    0.209_482_141_084_727_8,
];
const GAUSS7_W: [f64; 4] = [
    0.129_484_966_168_869_7,
    0.279_705_391_489_276_7,
    0.381_830_050_505_118_9,
    0.417_959_183_673_469_4,
];

/// The 15 nodes on [a, b], ascending: (α, Kronrod weight, embedded Gauss weight or 0),
/// weights scaled to the interval (they sum to b − a).
fn kronrod_nodes(a: f64, b: f64) -> Vec<(f64, f64, f64)> {
    let (centre, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let mut out = Vec::with_capacity(15);
    for (j, (&x, &w)) in KRONROD_X.iter().zip(&KRONROD_W).enumerate() {
        // Odd j (1, 3, 5, 7) are the Gauss nodes; 7 is the centre.
        let g = if j % 2 == 1 { GAUSS7_W[j / 2] } else { 0.0 };
        if x == 0.0 {
            out.push((centre, w * half, g * half));
        } else {
            out.push((centre - half * x, w * half, g * half));
            out.push((centre + half * x, w * half, g * half));
        }
    }
    out.sort_by(|p, q| p.0.total_cmp(&q.0));
    out
}

/// Gauss–Legendre nodes and weights mapped from [−1, 1] to [0, 1] (Newton's method on
/// the Legendre polynomial, from the Chebyshev guesses).
fn gauss_legendre(m: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(m);
    for i in 0..m {
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (m as f64 + 0.5)).cos();
        let mut derivative = 0.0;
        for _ in 0..100 {
            // P_m(x) and P_{m-1}(x) by the three-term recurrence.
            let (mut p0, mut p1) = (1.0, x);
            for n in 2..=m {
                let p2 = ((2 * n - 1) as f64 * x * p1 - (n - 1) as f64 * p0) / n as f64;
                p0 = p1;
                p1 = p2;
            }
            let pm = if m == 1 { x } else { p1 };
            let pm1 = if m == 1 { 1.0 } else { p0 };
            derivative = m as f64 * (x * pm - pm1) / (x * x - 1.0);
            let step = pm / derivative;
            x -= step;
            if step.abs() < 1e-15 {
                break;
            }
        }
        let weight = 2.0 / ((1.0 - x * x) * derivative * derivative);
        out.push(((1.0 - x) / 2.0, weight / 2.0));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// How to integrate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IgOptions {
    /// Number of quadrature points m.
    pub steps: usize,
    /// Quadrature rule.
    pub rule: Rule,
    /// At most this many points per batch; `None`: as many as keep the cached
    /// activations within [`CACHE_BUDGET`]. Bounds memory; results do not depend on it
    /// beyond rounding.
    pub chunk: Option<usize>,
    /// [`Rule::GaussKronrod`] only: every score's estimated integration error stays
    /// below `tolerance × P(gold)` (see [`integrated_gradients`]).
    pub tolerance: Option<f64>,
    /// Bytes of cached activations a batch may take when `chunk` is `None`; `None`:
    /// [`CACHE_BUDGET`] (the CPU's). A GPU's is its memory (`--gpu-memory`).
    pub budget: Option<usize>,
}

/// Gauss–Kronrod halves an interval at most this many times (16 intervals, 240 points
/// a layer); past it the error estimate is recorded as it is.
pub const MAX_HALVINGS: usize = 4;

/// The tolerance when [`Rule::GaussKronrod`] is asked for without one.
pub const DEFAULT_TOLERANCE: f64 = 1e-3;

/// Bytes of cached activations a batch of integration points may take when the batch
/// size is left to kn: for bert-base prompts of about 11 tokens, three batches of 7 of
/// the paper's 20 points, and peak memory under 1 GB with both copies of the weights
/// (see `engine::Dense`). Larger batches gain little: the stacked products have
/// hundreds of rows either way.
pub const CACHE_BUDGET: usize = 160 << 20;

/// Σ attributions against `P(1) − P(0)` for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Completeness {
    /// The layer.
    pub layer: usize,
    /// `Σ_i Attr_i`.
    pub sum: f64,
    /// `P(1) − P(0)`.
    pub target: f64,
}

impl Completeness {
    /// `|sum − target| / |target|` (0 when both are 0).
    pub fn relative_error(&self) -> f64 {
        let gap = (self.sum - self.target).abs();
        if gap == 0.0 {
            0.0
        } else {
            gap / self.target.abs()
        }
    }
}

/// Attributions of one prompt.
#[derive(Debug, Clone)]
pub struct PromptAttribution {
    /// `P(gold)` in the normal forward pass.
    pub gold_probability: f64,
    /// `scores[layer][neuron]`.
    pub scores: Vec<Vec<f32>>,
    /// Per layer (integrated gradients only).
    pub completeness: Vec<Completeness>,
    /// Integration points evaluated, summed over the layers (integrated gradients only).
    pub points: usize,
    /// [`Rule::GaussKronrod`]: the largest estimated error of a score (over the layers),
    /// as a fraction of `P(gold)`.
    pub error_estimate: Option<f64>,
}

/// Integrated gradients of every neuron of every layer for one prompt.
///
/// With [`Rule::GaussKronrod`] each layer's integral is adaptive: the 15-point Kronrod
/// sum on an interval is accepted when, for every neuron, `w_i · |K_i − G_i|` (G the
/// embedded 7-point Gauss sum, far less exact than K) is at most
/// `tolerance · P(gold) · (b − a)`; otherwise the interval is halved (at most
/// [`MAX_HALVINGS`] times). So every score's error is below `tolerance · P(gold)`
/// unless `error_estimate` says otherwise. The other rules use their `m` nodes.
pub fn integrated_gradients<F: Real>(
    pass: &dyn PromptPass<F>,
    gold: usize,
    options: &IgOptions,
) -> Result<PromptAttribution> {
    let mut out = integrated_gradients_of_prompts(&One(pass), gold, options)?;
    Ok(out.pop().expect("one prompt"))
}

/// [`integrated_gradients`] of every prompt of `passes` (one fact: one gold answer).
/// Each prompt's integral is its own; an engine that evaluates several prompts in one
/// batch ([`PromptPasses::joint`]) gets batches filled across the prompts, which give
/// the same scores as one prompt at a time to rounding.
pub fn integrated_gradients_of_prompts<F: Real>(
    passes: &dyn PromptPasses<F>,
    gold: usize,
    options: &IgOptions,
) -> Result<Vec<PromptAttribution>> {
    let p1: Vec<f64> = (0..passes.prompts())
        .map(|p| {
            passes.pass(p).probabilities()[gold]
                .to_f64()
                .unwrap_or(f64::NAN)
        })
        .collect();
    let batches = Batches::new(passes, gold, options);
    let integrals = match options.rule {
        Rule::GaussKronrod => {
            let tolerance = options.tolerance.unwrap_or(DEFAULT_TOLERANCE);
            let tolerances: Vec<f64> = p1.iter().map(|p| tolerance * p).collect();
            gauss_kronrod(&batches, &tolerances)?
        }
        rule => fixed_rule(&batches, &rule.nodes(options.steps))?,
    };
    Ok(integrals
        .into_iter()
        .zip(p1)
        .enumerate()
        .map(|(prompt, (integrals, p1))| attribution(passes.pass(prompt), p1, integrals))
        .collect())
}

/// A prompt's scores `w_i · ∫ ∂P/∂w_i` and completeness from its integrals.
fn attribution<F: Real>(
    pass: &dyn PromptPass<F>,
    p1: f64,
    integrals: Integrals,
) -> PromptAttribution {
    let (scores, completeness) = pass
        .neurons()
        .iter()
        .enumerate()
        .map(|(layer, w)| {
            let layer_scores: Vec<f64> = w
                .iter()
                .zip(&integrals.gradients[layer])
                .map(|(&w, &g)| w.to_f64().unwrap_or(f64::NAN) * g)
                .collect();
            let completeness = Completeness {
                layer,
                sum: layer_scores.iter().sum(),
                target: p1 - integrals.p0[layer],
            };
            (
                layer_scores.into_iter().map(|s| s as f32).collect(),
                completeness,
            )
        })
        .unzip();
    PromptAttribution {
        gold_probability: p1,
        scores,
        completeness,
        points: integrals.points,
        error_estimate: integrals.error.map(|e| e / p1),
    }
}

/// One prompt's pass as [`PromptPasses`].
struct One<'a, F>(&'a dyn PromptPass<F>);

impl<F: Real> PromptPasses<F> for One<'_, F> {
    fn prompts(&self) -> usize {
        1
    }

    fn pass(&self, _: usize) -> &dyn PromptPass<F> {
        self.0
    }
}

/// `∫₀¹ ∂P(α·w)/∂w dα` per layer, as a rule computed it.
struct Integrals {
    /// `gradients[layer][neuron]`.
    gradients: Vec<Vec<f64>>,
    /// `P(0)` per layer, for the completeness check.
    p0: Vec<f64>,
    /// Points evaluated, summed over the layers.
    points: usize,
    /// Gauss–Kronrod: the largest estimated error of a score over the layers.
    error: Option<f64>,
}

/// A fixed rule's nodes, every layer of every prompt at once.
fn fixed_rule<F: Real>(batches: &Batches<'_, F>, nodes: &[(f64, f64)]) -> Result<Vec<Integrals>> {
    let prompts = batches.passes.prompts();
    let layers = batches.passes.pass(0).neurons().len();
    let mut weighted: Vec<Node> = nodes
        .iter()
        .map(|&(alpha, c)| Node {
            alpha,
            interval: 0,
            weights: [c, 0.0],
        })
        .collect();
    // P(0) for the completeness check: a point of weight 0 unless the rule has α = 0.
    if !nodes.iter().any(|&(alpha, _)| alpha == 0.0) {
        weighted.push(Node {
            alpha: 0.0,
            interval: 0,
            weights: [0.0, 0.0],
        });
    }
    let jobs: Vec<Job> = (0..prompts)
        .map(|prompt| Job {
            prompt,
            layers: (0..layers).collect(),
            nodes: weighted.clone(),
            intervals: 1,
        })
        .collect();
    Ok(batches
        .weighted_gradients(&jobs)?
        .into_iter()
        .map(|mut sums| {
            let [gradients, _] = sums.pop().expect("one interval");
            Integrals {
                gradients: gradients.sums,
                p0: gradients.p0,
                points: nodes.len() * layers,
                error: None,
            }
        })
        .collect())
}

/// A part `(a, b)` of [0, 1].
type Interval = (f64, f64);

/// One prompt's adaptive integration in progress.
struct Adaptive {
    out: Integrals,
    /// The estimated error of each layer's accepted intervals, summed.
    error: Vec<f64>,
    /// Each interval still open, with the layers that still integrate over it.
    open: Vec<(Interval, Vec<usize>)>,
    /// Absolute (already times the prompt's `P(gold)`).
    tolerance: f64,
}

/// Adaptive Gauss–Kronrod per layer (see [`integrated_gradients`]) for every prompt, in
/// rounds of halving that all prompts go through together.
fn gauss_kronrod<F: Real>(batches: &Batches<'_, F>, tolerances: &[f64]) -> Result<Vec<Integrals>> {
    let passes = batches.passes;
    let mut states: Vec<Adaptive> = tolerances
        .iter()
        .enumerate()
        .map(|(prompt, &tolerance)| {
            let neurons = passes.pass(prompt).neurons();
            Adaptive {
                out: Integrals {
                    gradients: vec![vec![0f64; neurons[0].len()]; neurons.len()],
                    p0: vec![f64::NAN; neurons.len()],
                    points: 0,
                    error: Some(0.0),
                },
                error: vec![0f64; neurons.len()],
                open: vec![((0.0, 1.0), (0..neurons.len()).collect())],
                tolerance,
            }
        })
        .collect();
    for halvings in 0..=MAX_HALVINGS {
        // The intervals of a round that integrate the same layers go to the engine
        // together: one pass over the weights for all their points (both halves of an
        // interval always share their layers; on a decoder, whose points are one row
        // each, the passes, not the points, are most of the cost). Halving makes every
        // interval of a round distinct, so no interval is evaluated twice.
        let mut jobs: Vec<Job> = Vec::new();
        let mut job_intervals: Vec<Vec<Interval>> = Vec::new();
        for (prompt, state) in states.iter_mut().enumerate() {
            let mut groups: Vec<(Vec<usize>, Vec<Interval>)> = Vec::new();
            for (interval, layers) in std::mem::take(&mut state.open) {
                match groups.iter_mut().find(|(l, _)| *l == layers) {
                    Some((_, intervals)) => intervals.push(interval),
                    None => groups.push((layers, vec![interval])),
                }
            }
            for (layers, intervals) in groups {
                let mut nodes: Vec<Node> = Vec::with_capacity(15 * intervals.len() + 1);
                for (j, &(a, b)) in intervals.iter().enumerate() {
                    nodes.extend(kronrod_nodes(a, b).into_iter().map(|(alpha, k, g)| Node {
                        alpha,
                        interval: j,
                        weights: [k, g],
                    }));
                }
                if halvings == 0 {
                    nodes.push(Node {
                        alpha: 0.0,
                        interval: 0,
                        weights: [0.0, 0.0],
                    });
                }
                jobs.push(Job {
                    prompt,
                    layers,
                    nodes,
                    intervals: intervals.len(),
                });
                job_intervals.push(intervals);
            }
        }
        if jobs.is_empty() {
            break;
        }
        let results = batches.weighted_gradients(&jobs)?;
        for ((job, intervals), sums) in jobs.iter().zip(&job_intervals).zip(&results) {
            let state = &mut states[job.prompt];
            let neurons = passes.pass(job.prompt).neurons();
            for (&(a, b), [kronrod, gauss]) in intervals.iter().zip(sums) {
                state.out.points += 15 * job.layers.len();
                let mut halve = Vec::new();
                for (i, &layer) in job.layers.iter().enumerate() {
                    if halvings == 0 {
                        state.out.p0[layer] = kronrod.p0[i];
                    }
                    let estimate = neurons[layer]
                        .iter()
                        .zip(kronrod.sums[i].iter().zip(&gauss.sums[i]))
                        .map(|(&w, (k, g))| (w.to_f64().unwrap_or(f64::NAN) * (k - g)).abs())
                        .fold(0.0, f64::max);
                    if estimate <= state.tolerance * (b - a) || halvings == MAX_HALVINGS {
                        for (sum, k) in state.out.gradients[layer].iter_mut().zip(&kronrod.sums[i])
                        {
                            *sum += k;
                        }
                        state.error[layer] += estimate;
                    } else {
                        halve.push(layer);
                    }
                }
                if !halve.is_empty() {
                    let middle = (a + b) / 2.0;
                    state.open.push(((a, middle), halve.clone()));
                    state.open.push(((middle, b), halve));
                }
            }
        }
    }
    Ok(states
        .into_iter()
        .map(|mut state| {
            state.out.error = Some(state.error.into_iter().fold(0.0, f64::max));
            state.out
        })
        .collect())
}

/// Per weight set: the weighted gradient sums of `layers` (in their order) and `P(0)`
/// where a node is α = 0 (else NaN).
struct WeightedSums {
    sums: Vec<Vec<f64>>,
    p0: Vec<f64>,
}

/// An integration point: its α, the interval whose sums it adds to, and its weight in
/// each of the interval's two weight sets (Kronrod and Gauss; a fixed rule's and 0).
#[derive(Debug, Clone, Copy)]
struct Node {
    alpha: f64,
    interval: usize,
    weights: [f64; 2],
}

/// A prompt's nodes over `intervals` intervals, for `layers`.
struct Job {
    prompt: usize,
    layers: Vec<usize>,
    nodes: Vec<Node>,
    intervals: usize,
}

/// How a fact's integration points go to the engine: in equal batches of at most
/// `limit` points (each prompt's own, or one for all prompts when the engine evaluates
/// them jointly), all layers of a batch at once (the engine stacks them; see
/// `PromptPass::gradients`); a batch out of device memory is redone in halves.
struct Batches<'a, F> {
    passes: &'a dyn PromptPasses<F>,
    gold: usize,
    /// Points per batch, per prompt.
    limits: Vec<usize>,
}

impl<'a, F: Real> Batches<'a, F> {
    fn new(passes: &'a dyn PromptPasses<F>, gold: usize, options: &IgOptions) -> Self {
        let budget = options.budget.unwrap_or(CACHE_BUDGET);
        let limit = |bytes: usize| {
            options
                .chunk
                .unwrap_or_else(|| budget / bytes.max(1))
                .max(1)
        };
        let bytes: Vec<usize> = (0..passes.prompts())
            .map(|p| passes.pass(p).cache_bytes_per_point())
            .collect();
        let limits = if passes.joint() {
            // A joint batch takes the longest prompt's share for every point.
            let widest = bytes.iter().copied().max().unwrap_or(1);
            vec![limit(widest); bytes.len()]
        } else {
            bytes.into_iter().map(limit).collect()
        };
        Self {
            passes,
            gold,
            limits,
        }
    }

    /// For each job, `Σ_k c_k ∂P(α_k·w)/∂w` over each of its intervals' nodes, for both
    /// weight sets `c`. A node of α = 0 gives `P(0)` to its interval.
    fn weighted_gradients(&self, jobs: &[Job]) -> Result<Vec<Vec<[WeightedSums; 2]>>> {
        let width = self.passes.pass(0).neurons()[0].len();
        let mut out: Vec<Vec<[WeightedSums; 2]>> = jobs
            .iter()
            .map(|job| {
                let empty = || WeightedSums {
                    sums: vec![vec![0f64; width]; job.layers.len()],
                    p0: vec![f64::NAN; job.layers.len()],
                };
                (0..job.intervals).map(|_| [empty(), empty()]).collect()
            })
            .collect();
        // The points of a batch: (job, node) pairs; one job's alone unless joint.
        let points: Vec<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.nodes.len()).map(move |k| (j, k)))
            .collect();
        let runs: Vec<&[(usize, usize)]> = if self.passes.joint() {
            vec![&points[..]]
        } else {
            points.chunk_by(|a, b| a.0 == b.0).collect()
        };
        for run in runs {
            let limit = self.limits[jobs[run[0].0].prompt];
            let mut size = run.len().div_ceil(run.len().div_ceil(limit));
            let mut start = 0;
            while start < run.len() {
                let chunk = &run[start..(start + size).min(run.len())];
                match self.evaluate(jobs, chunk, &mut out, width) {
                    Ok(()) => start += chunk.len(),
                    Err(Error::OutOfMemory { .. }) if size > 1 => size = size.div_ceil(2),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// One batch: `chunk`'s points, one request per job, their weighted gradients added
    /// to `out`. Nothing is added when the engine fails.
    fn evaluate(
        &self,
        jobs: &[Job],
        chunk: &[(usize, usize)],
        out: &mut [Vec<[WeightedSums; 2]>],
        width: usize,
    ) -> Result<()> {
        let parts: Vec<&[(usize, usize)]> = chunk.chunk_by(|a, b| a.0 == b.0).collect();
        let alphas: Vec<Vec<F>> = parts
            .iter()
            .map(|part| {
                let nodes = &jobs[part[0].0].nodes;
                part.iter().map(|&(_, k)| F::of(nodes[k].alpha)).collect()
            })
            .collect();
        let requests: Vec<Request<'_, F>> = parts
            .iter()
            .zip(&alphas)
            .map(|(part, alphas)| {
                let job = &jobs[part[0].0];
                Request {
                    prompt: job.prompt,
                    layers: &job.layers,
                    alphas,
                }
            })
            .collect();
        let results = self.passes.gradients(&requests, self.gold)?;
        for (part, layer_results) in parts.iter().zip(results) {
            let (j, nodes) = (part[0].0, &jobs[part[0].0].nodes);
            for (i, result) in layer_results.iter().enumerate() {
                for (b, &(_, k)) in part.iter().enumerate() {
                    let node = nodes[k];
                    let row = &result.gradients[b * width..(b + 1) * width];
                    for (set, &weight) in out[j][node.interval].iter_mut().zip(&node.weights) {
                        if node.alpha == 0.0 {
                            set.p0[i] = result.probabilities[b].to_f64().unwrap_or(f64::NAN);
                        }
                        if weight == 0.0 {
                            continue;
                        }
                        for (sum, &g) in set.sums[i].iter_mut().zip(row) {
                            *sum += weight * g.to_f64().unwrap_or(f64::NAN);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The paper's baseline: each neuron's score is its activation at the mask.
pub fn activation_scores<F: Real>(pass: &dyn PromptPass<F>, gold: usize) -> PromptAttribution {
    PromptAttribution {
        gold_probability: pass.probabilities()[gold].to_f64().unwrap_or(f64::NAN),
        scores: pass
            .neurons()
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|v| v.to_f32().unwrap_or(f32::NAN))
                    .collect()
            })
            .collect(),
        completeness: Vec::new(),
        points: 0,
        error_estimate: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::engine::LayerGradients;
    use crate::attribution::flat::Engine;

    /// A pass whose device holds at most `fits` points per batch.
    struct Small<'a> {
        inner: Box<dyn PromptPass<f64> + 'a>,
        fits: usize,
        batches: std::sync::Mutex<Vec<usize>>,
    }

    impl PromptPass<f64> for Small<'_> {
        fn neurons(&self) -> &[Vec<f64>] {
            self.inner.neurons()
        }
        fn probabilities(&self) -> &[f64] {
            self.inner.probabilities()
        }
        fn cache_bytes_per_point(&self) -> usize {
            self.inner.cache_bytes_per_point()
        }
        fn gradients(
            &self,
            layers: &[usize],
            alphas: &[f64],
            gold: usize,
        ) -> Result<Vec<LayerGradients<f64>>> {
            self.batches.lock().unwrap().push(alphas.len());
            if alphas.len() > self.fits {
                return Err(Error::OutOfMemory {
                    device: "test".into(),
                    reason: "CUDA_ERROR_OUT_OF_MEMORY".into(),
                });
            }
            self.inner.gradients(layers, alphas, gold)
        }
    }

    /// Out of memory, a batch is redone in halves: the scores equal those of batches of
    /// the size that fits; when one point does not fit, the error comes out.
    #[test]
    fn out_of_memory_halves_the_batch() {
        use crate::model::load::model_from_tensors;
        use crate::model::random::{random_tensors, tiny_config, Layout};
        use candle_core::{DType, Device};
        let cfg = tiny_config(18, 16, 3, 24);
        let tensors = random_tensors(&cfg, Layout::default(), 5, 0.5).unwrap();
        let model = model_from_tensors(
            tensors,
            &cfg,
            DType::F64,
            &Device::Cpu,
            std::path::Path::new("tiny"),
        )
        .unwrap();
        let engine = Engine::<f64>::from_model(crate::model::LanguageModel::Bert(model)).unwrap();
        let ids = [2, 5, 6, 7, 4, 13, 9, 3];
        let options = |chunk| IgOptions {
            steps: 20,
            rule: Rule::Left,
            chunk,
            tolerance: None,
            budget: None,
        };
        let small = Small {
            inner: engine.prepare(&ids, 4).unwrap(),
            fits: 2,
            batches: Default::default(),
        };
        let halved = integrated_gradients(&small, 10, &options(Some(20))).unwrap();
        assert_eq!(
            small.batches.lock().unwrap()[..6],
            [20, 10, 5, 3, 2, 2],
            "20 points: 20, 10, 5 and 3 fail, then batches of 2"
        );
        let pass = engine.prepare(&ids, 4).unwrap();
        let twos = integrated_gradients(pass.as_ref(), 10, &options(Some(2))).unwrap();
        assert_eq!(halved.scores, twos.scores);
        assert!(halved.scores.iter().flatten().any(|&s| s != 0.0));
        let none = Small {
            inner: engine.prepare(&ids, 4).unwrap(),
            fits: 0,
            batches: Default::default(),
        };
        assert!(matches!(
            integrated_gradients(&none, 10, &options(None)),
            Err(Error::OutOfMemory { .. })
        ));
    }

    #[test]
    fn rules_integrate_polynomials_as_expected() {
        // ∫₀¹ x³ dx = 1/4
        let integral =
            |rule: Rule, m| -> f64 { rule.nodes(m).iter().map(|&(a, c)| c * a.powi(3)).sum() };
        assert!((integral(Rule::Gauss, 2) - 0.25).abs() < 1e-14);
        assert!((integral(Rule::Gauss, 7) - 0.25).abs() < 1e-14);
        // Σ_{k<20} (k/20)³/20 = 0.225625; the midpoint rule's error on x³ is −h²/8 = −3.125e-4.
        assert!((integral(Rule::Left, 20) - 0.225625).abs() < 1e-15);
        assert!((integral(Rule::Midpoint, 20) - (0.25 - 3.125e-4)).abs() < 1e-15);
        assert!(integral(Rule::Left, 20) < 0.25 && integral(Rule::Right, 20) > 0.25);
        // Kronrod 15 is exact to degree 22, its embedded Gauss 7 to degree 13 only, on any
        // interval: ∫_a^b x^k dx.
        let (a, b): (f64, f64) = (0.25, 0.75);
        let exact = |k: i32| (b.powi(k + 1) - a.powi(k + 1)) / f64::from(k + 1);
        let sums = |k: i32| {
            kronrod_nodes(a, b)
                .iter()
                .fold((0.0, 0.0), |(kr, g), &(x, wk, wg)| {
                    (kr + wk * x.powi(k), g + wg * x.powi(k))
                })
        };
        for k in [0, 5, 13, 22] {
            let (kronrod, gauss) = sums(k);
            assert!((kronrod - exact(k)).abs() < 1e-15, "degree {k}");
            if k <= 13 {
                assert!((gauss - exact(k)).abs() < 1e-15, "degree {k}");
            }
        }
        let (kronrod, gauss) = sums(16);
        assert!((kronrod - exact(16)).abs() < 1e-15 && (gauss - exact(16)).abs() > 1e-12);
        assert_eq!(
            kronrod_nodes(0.0, 1.0)
                .iter()
                .filter(|n| n.2 != 0.0)
                .count(),
            7
        );
        for rule in [
            Rule::Left,
            Rule::Right,
            Rule::Midpoint,
            Rule::Gauss,
            Rule::GaussKronrod,
        ] {
            let total: f64 = rule.nodes(13).iter().map(|&(_, c)| c).sum();
            assert!((total - 1.0).abs() < 1e-13, "{rule}");
        }
    }
}
