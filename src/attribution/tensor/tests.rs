//! The tensor engine against the flat engines on tiny random models of every
//! architecture (f64, CPU device): the normal pass, and P and dP/d(neurons) of every
//! layer's integration, alone and stacked, to 1e-10.

use std::path::Path;

use candle_core::{DType, Device};

use super::TensorEngine;
use crate::attribution::engine::Engine;
use crate::model::load::model_from_tensors;
use crate::model::random::{
    random_decoder_tensors, random_tensors, tiny_config, tiny_decoder_config, Layout,
};
use crate::model::LanguageModel;

/// Tiny random models: BERT (erf GELU), Llama (grouped-query, tied and untied), Qwen2
/// (q/k/v biases), GPT-2 (tied and untied), with a prompt and the answer position.
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
    for (kind, tied) in [
        ("llama", true),
        ("llama", false),
        ("qwen2", false),
        ("gpt2", true),
        ("gpt2", false),
    ] {
        let cfg = tiny_decoder_config(kind, 29, 16, 3, 24, tied).unwrap();
        let tensors = random_decoder_tensors(&cfg, 7, sigma).unwrap();
        let model =
            LanguageModel::from_tensors(tensors, &cfg, DType::F64, &Device::Cpu, Path::new(kind))
                .unwrap();
        let ids = vec![3, 17, 5, 22, 9, 14, 2];
        let last = ids.len() - 1;
        out.push((format!("{kind} tied={tied}"), model, ids, last));
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
