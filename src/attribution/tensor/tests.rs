//! The tensor engine against the flat engines on tiny random models of every
//! architecture (f64, CPU device): the normal pass, and P and dP/d(neurons) of every
//! layer's integration, alone and stacked, to 1e-10.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device};

use super::TensorEngine;
use crate::attribution::engine::{LayerGradients, PromptPass, PromptPasses, Request};
use crate::attribution::flat::Engine;
use crate::attribution::ig::{
    integrated_gradients, integrated_gradients_of_prompts, IgOptions, PromptAttribution, Rule,
};
use crate::error::Error;
use crate::model::load::model_from_tensors;
use crate::model::random::{
    random_decoder_tensors, random_tensors, tiny_config, tiny_decoder_config, tiny_rope_configs,
    Layout,
};
use crate::model::LanguageModel;

/// Tiny random models: BERT (erf GELU), Llama (grouped-query, tied and untied), Qwen2
/// (q/k/v biases), GPT-2 (tied and untied), Llamas with llama3, yarn and dynamic rope
/// scaling, with a prompt and the answer position.
fn models() -> Vec<(String, LanguageModel, Vec<u32>, usize)> {
    models_of(0.5)
}

/// [`models`] with weights of standard deviation `sigma` (0.5 there: rough models, on
/// which rounding errors grow fast).
fn models_of(sigma: f32) -> Vec<(String, LanguageModel, Vec<u32>, usize)> {
    let bert_cfg = tiny_config(18, 16, 3, 24);
    let bert = model_from_tensors(
        random_tensors(&bert_cfg, Layout::default(), 5, sigma).unwrap(),
        &bert_cfg,
        DType::F64,
        &Device::Cpu,
        Path::new("bert"),
    )
    .unwrap();
    let mut out = vec![(
        "bert".to_string(),
        LanguageModel::Bert(bert),
        vec![2, 5, 6, 7, 4, 13, 9, 3],
        4,
    )];
    let decoders = [
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
    // Rotary scaling (llama3, yarn's factor on cos and sin, dynamic past 4 positions).
    .chain(tiny_rope_configs(29, 16, 3, 24).unwrap());
    for (name, cfg) in decoders {
        let tensors = random_decoder_tensors(&cfg, 7, sigma).unwrap();
        let model =
            LanguageModel::from_tensors(tensors, &cfg, DType::F64, &Device::Cpu, Path::new(&name))
                .unwrap();
        let ids = vec![3, 17, 5, 22, 9, 14, 2];
        let last = ids.len() - 1;
        out.push((name, model, ids, last));
    }
    out
}

fn close(name: &str, what: &str, a: &[f64], b: &[f64], tolerance: f64) {
    assert_eq!(a.len(), b.len(), "{name}: {what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tolerance,
            "{name}: {what}[{i}]: tensor {x} vs flat {y}"
        );
    }
}

/// The same normal pass, and the same P(α) and gradients for every layer (all layers
/// stacked, and subsets: the top layer alone, two layers apart) to 1e-10.
#[test]
fn tensor_engine_equals_flat_engine_in_f64() {
    let alphas = [0.0, 0.3, 0.75, 1.0];
    for (name, model, ids, position) in models() {
        let flat = Engine::<f64>::from_model(model.clone()).unwrap();
        let tensor = TensorEngine::<f64>::from_model(model).unwrap();
        assert_eq!(tensor.layers(), flat.layers());
        assert_eq!(tensor.intermediate(), flat.intermediate());
        let (f, t) = (
            flat.prepare(&ids, position).unwrap(),
            tensor.prepare(&ids, position).unwrap(),
        );
        close(&name, "P", t.probabilities(), f.probabilities(), 1e-12);
        for (l, (a, b)) in t.neurons().iter().zip(f.neurons()).enumerate() {
            close(&name, &format!("neurons {l}"), a, b, 1e-12);
        }
        let n = flat.layers();
        let all: Vec<usize> = (0..n).collect();
        for layers in [all, vec![n - 1], vec![0, n - 1], vec![1]] {
            let want = f.gradients(&layers, &alphas, 10).unwrap();
            let got = t.gradients(&layers, &alphas, 10).unwrap();
            assert_eq!(got.len(), layers.len());
            for ((l, g), w) in layers.iter().zip(&got).zip(&want) {
                let what = format!("layers {layers:?}, layer {l}");
                close(&name, &what, &g.probabilities, &w.probabilities, 1e-12);
                let scale = w.gradients.iter().fold(0f64, |m, x| m.max(x.abs()));
                assert!(scale > 1e-6, "{name}: {what}: gradient ~0");
                close(
                    &name,
                    &what,
                    &g.gradients,
                    &w.gradients,
                    1e-10 * scale.max(1.0),
                );
            }
        }
    }
}

/// f32 on the tensor engine is within 1e-4 of the max of f64's gradient.
#[test]
fn tensor_engine_f32_is_close_to_f64() {
    for (name, model, ids, position) in models() {
        let t64 = TensorEngine::<f64>::from_model(model.clone()).unwrap();
        let t32 = TensorEngine::<f32>::from_model(model).unwrap();
        let (p64, p32) = (
            t64.prepare(&ids, position).unwrap(),
            t32.prepare(&ids, position).unwrap(),
        );
        let layers: Vec<usize> = (0..t64.layers()).collect();
        let g64 = p64.gradients(&layers, &[0.5], 10).unwrap();
        let g32 = p32.gradients(&layers, &[0.5], 10).unwrap();
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

/// bf16 and f16 weight products (mixed precision) stay within their rounding of f64's
/// gradients, and really are 16-bit: their error is well above f32's. (Smoother models
/// than the others' σ = 0.5, where f32's own error is 50–100 times its rounding and
/// bf16's reaches the gradient's size on the Qwen2 model.)
#[test]
fn sixteen_bit_products_are_close_to_f64() {
    for (name, model, ids, position) in models_of(0.2) {
        let layers: Vec<usize> = (0..model.config().num_hidden_layers).collect();
        let gradients = |engine: TensorEngine<f32>| {
            let pass = engine.prepare(&ids, position).unwrap();
            let g = pass.gradients(&layers, &[0.5, 1.0], 10).unwrap();
            g.iter()
                .map(|l| {
                    l.gradients
                        .iter()
                        .map(|&x| f64::from(x))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        let t64 = TensorEngine::<f64>::from_model(model.clone()).unwrap();
        let p64 = t64.prepare(&ids, position).unwrap();
        let want = p64.gradients(&layers, &[0.5, 1.0], 10).unwrap();
        let error = |got: &[Vec<f64>]| {
            want.iter()
                .zip(got)
                .map(|(w, g)| {
                    let scale = w.gradients.iter().fold(0f64, |m, x| m.max(x.abs()));
                    let gap = w
                        .gradients
                        .iter()
                        .zip(g)
                        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                    gap / scale
                })
                .fold(0f64, f64::max)
        };
        let f32_error = error(&gradients(TensorEngine::from_model(model.clone()).unwrap()));
        for (dtype, tolerance) in [(DType::BF16, 5e-2), (DType::F16, 5e-3)] {
            let engine = TensorEngine::<f32>::with_products(model.clone(), dtype).unwrap();
            let e = error(&gradients(engine));
            eprintln!("{name}: {dtype:?} products: {e:.2e} of the largest gradient (f32: {f32_error:.2e})");
            assert!(e <= tolerance, "{name}: {dtype:?}: {e:e}");
            assert!(
                e > 10.0 * f32_error,
                "{name}: {dtype:?}: {e:e} is f32's {f32_error:e}"
            );
        }
    }
}

/// Bad prompts are errors, as on the flat engine.
#[test]
fn bad_prompts_are_errors() {
    for (name, model, ids, position) in models() {
        let vocab = model.config().vocab_size as u32;
        let causal = name != "bert";
        let engine = TensorEngine::<f32>::from_model(model).unwrap();
        assert!(engine.prepare(&[2, vocab], 1).is_err(), "{name}: id");
        assert!(engine.prepare(&[2; 33], 32).is_err(), "{name}: too long");
        if causal {
            assert!(
                engine.prepare(&ids, position - 1).is_err(),
                "{name}: not last"
            );
        } else {
            assert!(engine.prepare(&ids, ids.len()).is_err(), "{name}: mask");
        }
    }
}

/// Prompts of other lengths than [`models`]' (one token: a causal model's prompt with
/// no cached positions), at their answer positions.
fn more_prompts(name: &str, ids: Vec<u32>, position: usize) -> Vec<(Vec<u32>, usize)> {
    if name == "bert" {
        vec![
            (ids, position),
            (vec![2, 8, 4, 11, 3], 2),
            (vec![2, 4, 3], 1),
        ]
    } else {
        vec![(ids, position), (vec![4, 8, 1], 2), (vec![6], 0)]
    }
}

/// One joint batch of several prompts' requests (prompts of different lengths, other
/// layers and points each, one prompt twice) gives what the flat engine gives for each
/// request alone, to 1e-10.
#[test]
fn joint_batches_equal_each_prompt_alone() {
    for (name, model, ids, position) in models() {
        let prompts = more_prompts(&name, ids, position);
        let inputs: Vec<(&[u32], usize)> = prompts.iter().map(|(i, p)| (&i[..], *p)).collect();
        let flat = Engine::<f64>::from_model(model.clone()).unwrap();
        let tensor = TensorEngine::<f64>::from_model(model).unwrap();
        let passes = tensor.prepare_all(&inputs).unwrap();
        assert!(passes.joint(), "{name}: the tensor engine batches prompts");
        let n = flat.layers();
        let all: Vec<usize> = (0..n).collect();
        let asked: [(usize, Vec<usize>, Vec<f64>); 5] = [
            (0, all, vec![0.0, 0.3, 0.75, 1.0]),
            (1, vec![n - 1], vec![0.5]),
            (1, vec![0], vec![0.4, 0.8]),
            (2, vec![0, n - 1], vec![0.2, 0.9]),
            (0, vec![1], vec![0.6]),
        ];
        let requests: Vec<Request<'_, f64>> = asked
            .iter()
            .map(|(prompt, layers, alphas)| Request {
                prompt: *prompt,
                layers,
                alphas,
            })
            .collect();
        let got = passes.gradients(&requests, 10).unwrap();
        assert_eq!(got.len(), asked.len(), "{name}");
        for ((prompt, layers, alphas), got) in asked.iter().zip(&got) {
            let (ids, position) = &prompts[*prompt];
            let want = flat
                .prepare(ids, *position)
                .unwrap()
                .gradients(layers, alphas, 10)
                .unwrap();
            assert_eq!(got.len(), layers.len(), "{name}");
            for ((l, g), w) in layers.iter().zip(got).zip(&want) {
                let what = format!("prompt {prompt}, layers {layers:?}, layer {l}");
                close(&name, &what, &g.probabilities, &w.probabilities, 1e-12);
                let scale = w.gradients.iter().fold(0f64, |m, x| m.max(x.abs()));
                assert!(scale > 1e-6, "{name}: {what}: gradient ~0");
                let tolerance = 1e-10 * scale.max(1.0);
                close(&name, &what, &g.gradients, &w.gradients, tolerance);
            }
        }
    }
}

/// Joint passes that hold at most `fits` points per batch, all prompts together.
struct Limited<'a> {
    inner: Box<dyn PromptPasses<f64> + 'a>,
    fits: usize,
    /// Each batch asked for: its points, and the prompts it holds.
    batches: Mutex<Vec<(usize, Vec<usize>)>>,
}

impl PromptPasses<f64> for Limited<'_> {
    fn prompts(&self) -> usize {
        self.inner.prompts()
    }

    fn pass(&self, prompt: usize) -> &dyn PromptPass<f64> {
        self.inner.pass(prompt)
    }

    fn joint(&self) -> bool {
        true
    }

    fn gradients(
        &self,
        requests: &[Request<'_, f64>],
        gold: usize,
    ) -> crate::error::Result<Vec<Vec<LayerGradients<f64>>>> {
        let points = requests.iter().map(|r| r.alphas.len()).sum();
        let prompts = requests.iter().map(|r| r.prompt).collect();
        self.batches.lock().unwrap().push((points, prompts));
        if points > self.fits {
            return Err(Error::OutOfMemory {
                device: "test".into(),
                reason: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            });
        }
        self.inner.gradients(requests, gold)
    }
}

/// Integrated gradients of a fact's prompts in joint batches (small enough that batches
/// cross from one prompt to the next; out of memory, halved) equal the flat engine's,
/// prompt by prompt, for a fixed rule and the adaptive one.
#[test]
fn joint_integration_equals_one_prompt_at_a_time() {
    for (name, model, ids, position) in models() {
        let prompts = more_prompts(&name, ids, position);
        let inputs: Vec<(&[u32], usize)> = prompts.iter().map(|(i, p)| (&i[..], *p)).collect();
        let flat = Engine::<f64>::from_model(model.clone()).unwrap();
        let tensor = TensorEngine::<f64>::from_model(model).unwrap();
        for (rule, chunk) in [(Rule::Left, 8), (Rule::GaussKronrod, 40)] {
            let options = IgOptions {
                steps: 5,
                rule,
                chunk: Some(chunk),
                tolerance: Some(1e-3),
                budget: None,
            };
            let limited = Limited {
                inner: tensor.prepare_all(&inputs).unwrap(),
                fits: 5,
                batches: Mutex::new(Vec::new()),
            };
            let got = integrated_gradients_of_prompts(&limited, 10, &options).unwrap();
            let batches = limited.batches.into_inner().unwrap();
            // The first batch fails, and halves until they fit; some batch holds the
            // points of two prompts.
            assert!(batches[0].0 > 5, "{name} {rule}: {batches:?}");
            assert!(batches.iter().any(|(n, _)| *n <= 5), "{name} {rule}");
            let crosses = |(n, p): &(usize, Vec<usize>)| *n <= 5 && p.len() > 1 && p[0] != p[1];
            assert!(batches.iter().any(crosses), "{name} {rule}: {batches:?}");
            assert_eq!(got.len(), prompts.len());
            for (p, ((ids, position), got)) in prompts.iter().zip(&got).enumerate() {
                let pass = flat.prepare(ids, *position).unwrap();
                let want = integrated_gradients(pass.as_ref(), 10, &options).unwrap();
                let what = format!("{rule}, prompt {p}");
                assert_eq!(got.points, want.points, "{name}: {what}: points");
                let p1 = [got.gold_probability];
                close(&name, &what, &p1, &[want.gold_probability], 1e-12);
                // Each layer's Σ scores (f64) tightly, every score to its f32 storage.
                let sums = |a: &PromptAttribution| -> Vec<f64> {
                    a.completeness.iter().map(|c| c.sum).collect()
                };
                let scale = sums(&want).iter().fold(0f64, |m, s| m.max(s.abs()));
                assert!(scale > 1e-8, "{name}: {what}: scores ~0");
                close(&name, &what, &sums(got), &sums(&want), 1e-9 * scale);
                let wide = |s: &[f32]| -> Vec<f64> { s.iter().map(|&x| f64::from(x)).collect() };
                for (l, (g, w)) in got.scores.iter().zip(&want.scores).enumerate() {
                    let what = format!("{what}, layer {l}");
                    close(&name, &what, &wide(g), &wide(w), 1e-6 * scale);
                }
            }
        }
    }
}
