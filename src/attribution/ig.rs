//! Integrated gradients over FFN neurons (Dai et al. 2022; README, `kn attribute`).
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

use serde::{Deserialize, Serialize};

use super::engine::{PromptPass, Real};
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
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "left" => Ok(Self::Left),
            "right" => Ok(Self::Right),
            "midpoint" => Ok(Self::Midpoint),
            "gauss" | "gauss-legendre" => Ok(Self::Gauss),
            _ => Err(format!("unknown rule {s:?} (left, right, midpoint, gauss)")),
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
        })
    }
}

impl Rule {
    /// The `m` nodes `α_k` and weights `c_k` (summing to 1).
    pub fn nodes(self, m: usize) -> Vec<(f64, f64)> {
        let w = 1.0 / m as f64;
        match self {
            Self::Left => (0..m).map(|k| (k as f64 * w, w)).collect(),
            Self::Right => (1..=m).map(|k| (k as f64 * w, w)).collect(),
            Self::Midpoint => (0..m).map(|k| ((k as f64 + 0.5) * w, w)).collect(),
            Self::Gauss => gauss_legendre(m),
        }
    }
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
    /// Bytes of cached activations a batch may take when `chunk` is `None`; `None`:
    /// [`CACHE_BUDGET`] (the CPU's). A GPU's is its memory (`--gpu-memory`).
    pub budget: Option<usize>,
}

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
}

/// Integrated gradients of every neuron of every layer for one prompt.
///
/// A batch the device has no memory for ([`Error::OutOfMemory`]) is redone in halves,
/// down to one point; the scores do not depend on the batch size beyond rounding.
pub fn integrated_gradients<F: Real>(
    pass: &dyn PromptPass<F>,
    gold: usize,
    options: &IgOptions,
) -> Result<PromptAttribution> {
    let p1 = pass.probabilities()[gold].to_f64().unwrap_or(f64::NAN);
    let mut points = options.rule.nodes(options.steps);
    // P(0) for the completeness check: a point of weight 0 unless the rule has α = 0.
    if !points.iter().any(|&(alpha, _)| alpha == 0.0) {
        points.push((0.0, 0.0));
    }
    let neurons = pass.neurons();
    let width = neurons[0].len();
    let layers: Vec<usize> = (0..neurons.len()).collect();
    // Σ_k c_k ∂P(α_k·w)/∂w per layer, and P(0) (from the point α = 0).
    let mut gradient_sums = vec![vec![0f64; width]; layers.len()];
    let mut p0 = vec![f64::NAN; layers.len()];
    // Equal batches, as few as the size limit allows.
    let budget = options.budget.unwrap_or(CACHE_BUDGET);
    let limit = options
        .chunk
        .unwrap_or_else(|| budget / pass.cache_bytes_per_point().max(1))
        .max(1);
    let mut size = points.len().div_ceil(points.len().div_ceil(limit));
    let mut start = 0;
    while start < points.len() {
        let chunk = &points[start..(start + size).min(points.len())];
        let alphas: Vec<F> = chunk.iter().map(|&(a, _)| F::of(a)).collect();
        // All layers at once: the engine stacks them (see `Engine::gradients`).
        let results = match pass.gradients(&layers, &alphas, gold) {
            Ok(results) => results,
            Err(Error::OutOfMemory { .. }) if size > 1 => {
                size = size.div_ceil(2);
                continue;
            }
            Err(e) => return Err(e),
        };
        for (layer, result) in results.iter().enumerate() {
            for (b, &(alpha, weight)) in chunk.iter().enumerate() {
                if alpha == 0.0 {
                    p0[layer] = result.probabilities[b].to_f64().unwrap_or(f64::NAN);
                }
                let row = &result.gradients[b * width..(b + 1) * width];
                for (sum, &g) in gradient_sums[layer].iter_mut().zip(row) {
                    *sum += weight * g.to_f64().unwrap_or(f64::NAN);
                }
            }
        }
        start += chunk.len();
    }
    let (scores, completeness) = layers
        .iter()
        .map(|&layer| {
            let layer_scores: Vec<f64> = neurons[layer]
                .iter()
                .zip(&gradient_sums[layer])
                .map(|(&w, &g)| w.to_f64().unwrap_or(f64::NAN) * g)
                .collect();
            let completeness = Completeness {
                layer,
                sum: layer_scores.iter().sum(),
                target: p1 - p0[layer],
            };
            (
                layer_scores.into_iter().map(|s| s as f32).collect(),
                completeness,
            )
        })
        .unzip();
    Ok(PromptAttribution {
        gold_probability: p1,
        scores,
        completeness,
    })
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::engine::{Engine, LayerGradients};

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
        for rule in [Rule::Left, Rule::Right, Rule::Midpoint, Rule::Gauss] {
            let total: f64 = rule.nodes(13).iter().map(|&(_, c)| c).sum();
            assert!((total - 1.0).abs() < 1e-13, "{rule}");
        }
    }
}
