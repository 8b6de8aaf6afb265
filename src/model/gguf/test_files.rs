//! Test support shared by the GGUF parts' unit tests: a tiny vocabulary, a GGUF file
//! builder ([`Spec`]), tiny Llama checkpoints, and checks of what [`read`] gives.

pub(super) use super::{read, GgufCheckpoint};
pub(super) use crate::rng::SplitMix64;
pub(super) use candle_core::quantized::gguf_file::Value;
pub(super) use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
pub(super) use candle_core::{DType, Device, Tensor};
pub(super) use serde_json::json;
pub(super) use std::path::{Path, PathBuf};

/// A tiny byte-level BPE vocabulary: "hello world" is two tokens.
pub(super) const TOKENS: [&str; 24] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "h",
    "e",
    "l",
    "o",
    "\u{120}",
    "w",
    "r",
    "d",
    "he",
    "ll",
    "hell",
    "hello",
    "\u{120}w",
    "or",
    "\u{120}wor",
    "ld",
    "\u{120}world",
    "<user>",
    "1",
    "2",
    "12",
];
pub(super) const MERGES: [&str; 10] = [
    "h e",
    "l l",
    "he ll",
    "hell o",
    "\u{120} w",
    "o r",
    "\u{120}w or",
    "l d",
    "\u{120}wor ld",
    "1 2",
];
/// Control tokens 0-2, user-defined token 20.
pub(super) fn token_types() -> Vec<i32> {
    (0..TOKENS.len())
        .map(|i| match i {
            0..=2 => 3,
            20 => 4,
            _ => 1,
        })
        .collect()
}

pub(super) fn s(x: &str) -> Value {
    Value::String(x.to_string())
}

pub(super) fn strings(xs: &[&str]) -> Value {
    Value::Array(xs.iter().map(|x| s(x)).collect())
}

/// A GGUF file to be: metadata and tensors, in order.
pub(super) struct Spec {
    pub(super) meta: Vec<(String, Value)>,
    pub(super) tensors: Vec<(String, QTensor)>,
}

impl Spec {
    pub(super) fn set(&mut self, key: &str, value: Value) {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), value));
    }

    pub(super) fn remove(&mut self, key: &str) {
        self.meta.retain(|(k, _)| k != key);
    }

    pub(super) fn tensor(&mut self, name: &str, t: &Tensor, dtype: GgmlDType) {
        self.tensors.retain(|(n, _)| n != name);
        let q = QTensor::quantize(t, dtype).expect("quantize");
        self.tensors.push((name.to_string(), q));
    }

    pub(super) fn bytes(&self) -> Vec<u8> {
        let meta: Vec<(&str, &Value)> = self.meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> =
            self.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut out, &meta, &tensors).expect("write gguf");
        out.into_inner()
    }

    pub(super) fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).expect("write file");
        path
    }
}

pub(super) fn randn(rng: &mut SplitMix64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// convert_hf_to_gguf.py's `LlamaModel.permute`:
/// `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
pub(super) fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, 2, dims[0] / n_head / 2, rest))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape(dims))
        .expect("permute")
}

pub(super) fn tokenizer_meta(spec: &mut Spec) {
    spec.set("tokenizer.ggml.model", s("gpt2"));
    spec.set("tokenizer.ggml.pre", s("smollm"));
    spec.set("tokenizer.ggml.tokens", strings(&TOKENS));
    spec.set(
        "tokenizer.ggml.token_type",
        Value::Array(token_types().into_iter().map(Value::I32).collect()),
    );
    spec.set("tokenizer.ggml.merges", strings(&MERGES));
    spec.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    spec.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    spec.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
}

/// The expected Hugging Face tensors, with the tolerance of their GGUF type.
pub(super) type Expected = Vec<(String, Tensor, f32)>;

pub(super) fn tol(dtype: GgmlDType) -> f32 {
    match dtype {
        GgmlDType::F32 => 0.0,
        GgmlDType::Q8_0 => 0.03,
        GgmlDType::Q4_1 => 0.3,
        _ => 1.0,
    }
}

/// A tiny llama (hidden 64, 4 heads of 16, 2 kv heads, ffn 96, 2 layers, vocab 24),
/// written as llama.cpp writes it: q/k permuted, dims innermost first.
pub(super) fn llama_spec(hidden: usize, ffn: usize, layers: usize, tied: bool) -> (Spec, Expected) {
    let (n_head, n_kv, head_dim) = (hidden / 16, hidden / 32, 16);
    let mut rng = SplitMix64::new(7);
    let mut spec = Spec {
        meta: Vec::new(),
        tensors: Vec::new(),
    };
    spec.set("general.architecture", s("llama"));
    spec.set("general.name", s("tiny"));
    spec.set("llama.block_count", Value::U32(layers as u32));
    spec.set("llama.context_length", Value::U32(128));
    spec.set("llama.embedding_length", Value::U32(hidden as u32));
    spec.set("llama.feed_forward_length", Value::U32(ffn as u32));
    spec.set("llama.attention.head_count", Value::U32(n_head as u32));
    spec.set("llama.attention.head_count_kv", Value::U32(n_kv as u32));
    spec.set("llama.rope.freq_base", Value::F32(100000.0));
    spec.set("llama.rope.dimension_count", Value::U32(head_dim as u32));
    spec.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    tokenizer_meta(&mut spec);
    let mut expected = Vec::new();
    let v = TOKENS.len();
    let mut add = |spec: &mut Spec, gguf: &str, hf: &str, t: Tensor, stored: Tensor, dt| {
        spec.tensor(gguf, &stored, dt);
        expected.push((hf.to_string(), t, tol(dt)));
    };
    let t = randn(&mut rng, &[v, hidden]);
    add(
        &mut spec,
        "token_embd.weight",
        "model.embed_tokens.weight",
        t.clone(),
        t,
        GgmlDType::Q8_0,
    );
    for n in 0..layers {
        let hf = |p: &str| format!("model.layers.{n}.{p}");
        let g = |p: &str| format!("blk.{n}.{p}");
        let norm = randn(&mut rng, &[hidden]);
        add(
            &mut spec,
            &g("attn_norm.weight"),
            &hf("input_layernorm.weight"),
            norm.clone(),
            norm,
            GgmlDType::F32,
        );
        let q = randn(&mut rng, &[n_head * head_dim, hidden]);
        let stored = llama_cpp_permute(&q, n_head);
        // Layer 0 exact (f32), layer 1 through a quantized type.
        let qt = if n == 0 {
            GgmlDType::F32
        } else {
            GgmlDType::Q8_0
        };
        add(
            &mut spec,
            &g("attn_q.weight"),
            &hf("self_attn.q_proj.weight"),
            q,
            stored,
            qt,
        );
        let k = randn(&mut rng, &[n_kv * head_dim, hidden]);
        let stored = llama_cpp_permute(&k, n_kv);
        add(
            &mut spec,
            &g("attn_k.weight"),
            &hf("self_attn.k_proj.weight"),
            k,
            stored,
            qt,
        );
        let w = randn(&mut rng, &[n_kv * head_dim, hidden]);
        add(
            &mut spec,
            &g("attn_v.weight"),
            &hf("self_attn.v_proj.weight"),
            w.clone(),
            w,
            GgmlDType::Q4_1,
        );
        let w = randn(&mut rng, &[hidden, n_head * head_dim]);
        add(
            &mut spec,
            &g("attn_output.weight"),
            &hf("self_attn.o_proj.weight"),
            w.clone(),
            w,
            GgmlDType::Q8_0,
        );
        let w = randn(&mut rng, &[hidden]);
        add(
            &mut spec,
            &g("ffn_norm.weight"),
            &hf("post_attention_layernorm.weight"),
            w.clone(),
            w,
            GgmlDType::F32,
        );
        let w = randn(&mut rng, &[ffn, hidden]);
        add(
            &mut spec,
            &g("ffn_gate.weight"),
            &hf("mlp.gate_proj.weight"),
            w.clone(),
            w,
            GgmlDType::Q4_1,
        );
        let w = randn(&mut rng, &[ffn, hidden]);
        add(
            &mut spec,
            &g("ffn_up.weight"),
            &hf("mlp.up_proj.weight"),
            w.clone(),
            w,
            GgmlDType::Q8_0,
        );
        let w = randn(&mut rng, &[hidden, ffn]);
        add(
            &mut spec,
            &g("ffn_down.weight"),
            &hf("mlp.down_proj.weight"),
            w.clone(),
            w,
            GgmlDType::F32,
        );
    }
    let w = randn(&mut rng, &[hidden]);
    add(
        &mut spec,
        "output_norm.weight",
        "model.norm.weight",
        w.clone(),
        w,
        GgmlDType::F32,
    );
    if !tied {
        let w = randn(&mut rng, &[v, hidden]);
        add(
            &mut spec,
            "output.weight",
            "lm_head.weight",
            w.clone(),
            w,
            GgmlDType::Q4_1,
        );
    }
    (spec, expected)
}

pub(super) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all());
    d.and_then(|d| d.max(0))
        .and_then(|m| m.to_scalar::<f32>())
        .expect("diff")
}

pub(super) fn check_tensors(ck: &GgufCheckpoint, expected: &Expected) {
    let names: Vec<&str> = ck.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, want);
    for ((name, got), (_, want, tol)) in ck.tensors.iter().zip(expected) {
        assert_eq!(got.dims(), want.dims(), "{name}");
        assert_eq!(got.dtype(), DType::F32, "{name}");
        let diff = max_abs_diff(got, want);
        assert!(diff <= *tol, "{name}: max |diff| {diff} > {tol}");
    }
}

pub(super) fn encode(ck: &GgufCheckpoint, text: &str) -> Vec<u32> {
    ck.tokenizer
        .encode(text, true)
        .expect("encode")
        .get_ids()
        .to_vec()
}

pub(super) fn err_of(path: &Path) -> String {
    match read(path) {
        Ok(_) => panic!("{} read without error", path.display()),
        Err(e) => e.to_string(),
    }
}
