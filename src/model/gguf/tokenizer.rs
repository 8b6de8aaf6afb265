//! The tokenizer from the `tokenizer.ggml.*` metadata, built as transformers 4.47.1's
//! GGUF converters build it.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::metadata::{Arch, Meta};
use crate::error::Result;

/// The `tokenizer.ggml.*` metadata.
pub(super) struct TokenizerMeta {
    pub(super) model: String,
    pub(super) tokens: Vec<String>,
    token_types: Option<Vec<i64>>,
    pub(super) merges: Option<Vec<String>>,
    scores: Option<Vec<f32>>,
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    unk: Option<u32>,
    add_space_prefix: Option<bool>,
}

/// `tokenizer.ggml.token_type` of a control token.
const TOKEN_CONTROL: i64 = 3;
/// `tokenizer.ggml.token_type` of a user-defined token.
const TOKEN_USER_DEFINED: i64 = 4;

impl TokenizerMeta {
    pub(super) fn read(meta: &Meta<'_>) -> Result<Self> {
        let model = meta.string_req("tokenizer.ggml.model")?.to_string();
        let tokens = meta
            .strings_opt("tokenizer.ggml.tokens")?
            .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
        let n = tokens.len();
        let check_len = |key: &str, len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(meta.err(format!(
                    "GGUF metadata {key} has {len} entries, tokenizer.ggml.tokens {n}"
                )))
            }
        };
        let token_types = match meta.array_opt("tokenizer.ggml.token_type")? {
            None => None,
            Some(a) => {
                check_len("tokenizer.ggml.token_type", a.len())?;
                Some(
                    a.iter()
                        .map(|v| match *v {
                            Value::I32(x) => Ok(i64::from(x)),
                            Value::U32(x) => Ok(i64::from(x)),
                            Value::I8(x) => Ok(i64::from(x)),
                            Value::U8(x) => Ok(i64::from(x)),
                            ref v => Err(meta.wrong(
                                "tokenizer.ggml.token_type",
                                "an array of integers",
                                v,
                            )),
                        })
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let scores = match meta.array_opt("tokenizer.ggml.scores")? {
            None => None,
            Some(a) => {
                check_len("tokenizer.ggml.scores", a.len())?;
                Some(
                    a.iter()
                        .map(|v| match *v {
                            Value::F32(x) => Ok(x),
                            ref v => Err(meta.wrong("tokenizer.ggml.scores", "an array of f32", v)),
                        })
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let merges = meta.strings_opt("tokenizer.ggml.merges")?;
        let id = |key: &str| -> Result<Option<u32>> {
            match meta.u64_opt(key)? {
                None => Ok(None),
                Some(id) if (id as usize) < n && id < u64::from(u32::MAX) => Ok(Some(id as u32)),
                Some(id) => Err(meta.err(format!(
                    "GGUF metadata {key} is {id}, beyond the {n} tokens"
                ))),
            }
        };
        Ok(Self {
            model,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_space_prefix: meta.bool_opt("tokenizer.ggml.add_space_prefix")?,
            tokens,
            token_types,
            merges,
            scores,
        })
    }

    pub(super) fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }
}

/// Qwen2's pre-tokenizer regex (transformers' `Qwen2Converter`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the tokenizer as transformers 4.47.1 does from a GGUF file: the converter is
/// chosen by the architecture (`GGUFLlamaConverter` for llama, `GGUFQwen2Converter`,
/// `GGUFGPTConverter`), `tokenizer.ggml.pre` is not used.
pub(super) fn build_tokenizer(
    v: &TokenizerMeta,
    arch: Arch,
) -> std::result::Result<Tokenizer, String> {
    let fail = |e: String| format!("cannot build the tokenizer: {e}");
    let byte_level = || json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let add_prefix_space = v.add_space_prefix.unwrap_or(true);
    let (mut tokenizer, normalizer, pre_tokenizer, decoder, add_bos) = match (
        arch,
        v.model.as_str(),
    ) {
        (_, "gpt2") => {
            let merges = v
                .merges
                .as_deref()
                .ok_or("GGUF metadata key tokenizer.ggml.merges is missing")?;
            let merges = parse_merges(merges)?;
            let llama = arch == Arch::Llama;
            let mut bpe = BPE::builder()
                .vocab_and_merges(vocab(&v.tokens), merges)
                .fuse_unk(llama)
                .byte_fallback(llama);
            if llama {
                if let Some(unk) = v.token(v.unk) {
                    bpe = bpe.unk_token(unk.to_string());
                }
            }
            let bpe = bpe.build().map_err(|e| fail(e.to_string()))?;
            match arch {
                // transformers' "llama 3" path of GGUFLlamaConverter.
                Arch::Llama => {
                    let mut decoders = vec![
                        json!({"type": "ByteFallback"}),
                        json!({"type": "Fuse"}),
                        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    ];
                    if add_prefix_space {
                        decoders
                            .push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                    }
                    (
                        Tokenizer::new(bpe),
                        None,
                        Some(byte_level()),
                        json!({"type": "Sequence", "decoders": decoders}),
                        true,
                    )
                }
                Arch::Qwen2 => (
                    Tokenizer::new(bpe),
                    Some(json!({"type": "NFC"})),
                    Some(json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
                    ]})),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    false,
                ),
                Arch::Gpt2 => (
                    Tokenizer::new(bpe),
                    None,
                    Some(byte_level()),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    false,
                ),
            }
        }
        // SentencePiece vocabularies (Llama 2): GGUFLlamaConverter's BPE with byte
        // fallback, merges derived from the scores when the file has none.
        (Arch::Llama, "llama") => {
            let merges = match &v.merges {
                Some(m) => parse_merges(m)?,
                None => {
                    let scores = v.scores.as_ref().ok_or(
                        "GGUF metadata key tokenizer.ggml.scores is missing (needed without \
                             tokenizer.ggml.merges)",
                    )?;
                    merges_from_scores(&v.tokens, scores)?
                }
            };
            let mut bpe = BPE::builder()
                .vocab_and_merges(vocab(&v.tokens), merges)
                .fuse_unk(true)
                .byte_fallback(true);
            if let Some(unk) = v.token(v.unk) {
                bpe = bpe.unk_token(unk.to_string());
            }
            let bpe = bpe.build().map_err(|e| fail(e.to_string()))?;
            let mut normalizers = Vec::new();
            if add_prefix_space {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let mut decoders = vec![
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            ];
            if add_prefix_space {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                Tokenizer::new(bpe),
                Some(json!({"type": "Sequence", "normalizers": normalizers})),
                None,
                json!({"type": "Sequence", "decoders": decoders}),
                true,
            )
        }
        (_, "llama") => {
            return Err(format!(
                "GGUF tokenizer model \"llama\" (tokenizer.ggml.model) is not supported for \
                     architecture {arch:?}"
            ))
        }
        (_, other) => {
            return Err(format!(
                "GGUF tokenizer model {other:?} (tokenizer.ggml.model) is not supported \
                     (gpt2, llama)"
            ))
        }
    };
    if let Some(n) = normalizer {
        let n: NormalizerWrapper = serde_json::from_value(n).map_err(|e| fail(e.to_string()))?;
        tokenizer.with_normalizer(Some(n));
    }
    if let Some(p) = pre_tokenizer {
        let p: PreTokenizerWrapper = serde_json::from_value(p).map_err(|e| fail(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(p));
    }
    let d: DecoderWrapper = serde_json::from_value(decoder).map_err(|e| fail(e.to_string()))?;
    tokenizer.with_decoder(Some(d));

    // Special added tokens: the control tokens (token_type 3), and the unknown, BOS and
    // EOS tokens (which transformers' tokenizer classes register as special tokens).
    // User-defined tokens (4) are plain added tokens, as in a Hugging Face tokenizer.json
    // (transformers' GGUF loader ignores them).
    let mut special = Vec::new();
    let mut added = Vec::new();
    if let Some(types) = &v.token_types {
        for (tok, ty) in v.tokens.iter().zip(types) {
            match *ty {
                TOKEN_CONTROL => special.push(tok.as_str()),
                TOKEN_USER_DEFINED if !tok.is_empty() => {
                    added.push(AddedToken::from(tok.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
    }
    special.extend(
        [v.token(v.unk), v.token(v.bos), v.token(v.eos)]
            .into_iter()
            .flatten(),
    );
    let mut unique = HashSet::new();
    let special: Vec<AddedToken> = special
        .into_iter()
        .filter(|t| !t.is_empty() && unique.insert(*t))
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&added);

    // transformers' LlamaTokenizerFast always prepends BOS (add_bos_token=True, whatever
    // tokenizer.ggml.add_bos_token says) and never appends EOS; its GPT-2 and Qwen2
    // tokenizers add neither.
    let post = match v.bos.zip(v.token(v.bos)) {
        Some(bos) if add_bos => template(bos),
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let post: PostProcessorWrapper =
        serde_json::from_value(post).map_err(|e| fail(e.to_string()))?;
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// The TemplateProcessing of transformers' `LlamaTokenizerFast.update_post_processor`
/// with add_bos_token and without add_eos_token: `bos $A`, and `bos $A bos $B` for pairs.
fn template((id, bos): (u32, &str)) -> serde_json::Value {
    let special = |type_id: u32| json!({"SpecialToken": {"id": bos, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    json!({
        "type": "TemplateProcessing",
        "single": [special(0), seq("A", 0)],
        "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
        "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}},
    })
}

/// `tokenizer.ggml.merges` ("a b" strings) as pairs.
fn parse_merges(merges: &[String]) -> std::result::Result<Vec<(String, String)>, String> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("tokenizer.ggml.merges[{i}] {m:?} is not \"a b\""))
        })
        .collect()
}

/// A score that `total_cmp` orders as Python compares floats: -0 and 0 equal, NaN (which
/// Python cannot order) lowest.
fn sortable(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// Token → id, a later duplicate winning (as a Python dict comprehension).
pub(super) fn vocab(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// The merges transformers' `GGUFTokenizerSkeleton` derives from a SentencePiece vocabulary:
/// every split of every token into two tokens, ordered by the merged token's score
/// (highest first), ties by the pieces' scores.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
) -> std::result::Result<Vec<(String, String)>, String> {
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        score.insert(t.as_str(), *s);
    }
    // Each token costs its length squared (the substrings hashed): bounded, so that a
    // crafted vocabulary of huge tokens cannot stall the reader.
    let mut budget: u64 = 1 << 32;
    let mut seen = HashSet::with_capacity(tokens.len());
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let len = t.len() as u64;
        budget = budget.checked_sub(len * len).ok_or(
            "tokenizer.ggml.tokens holds tokens too long to derive merges from the scores",
        )?;
        let piece_score = score.get(t.as_str()).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, f32)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| t.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .map(|(l, r)| (l, r, piece_score))
            .collect();
        // Python's sorted(..., reverse=True) is stable, as sort_by is.
        local.sort_by(|a, b| {
            let key = |x: &(&str, &str, f32)| {
                (
                    sortable(score.get(x.0).copied().unwrap_or(0.0)),
                    sortable(score.get(x.1).copied().unwrap_or(0.0)),
                )
            };
            let (ka, kb) = (key(a), key(b));
            kb.0.total_cmp(&ka.0).then(kb.1.total_cmp(&ka.1))
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| sortable(b.2).total_cmp(&sortable(a.2)));
    Ok(merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::test_files::*;

    #[test]
    fn gguf_sentencepiece_tokenizer_matches_transformers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spec, _) = llama_spec(32, 32, 1, true);
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        let mut types: Vec<i32> = vec![2, 3, 3];
        types.extend([6; 256]);
        let pieces: [(&str, f32); 22] = [
            ("\u{2581}", -1.0),
            ("h", -2.0),
            ("e", -3.0),
            ("l", -4.0),
            ("o", -5.0),
            ("w", -6.0),
            ("r", -7.0),
            ("d", -8.0),
            ("he", -20.0),
            ("ll", -21.0),
            ("\u{2581}h", -22.0),
            ("\u{2581}he", -23.0),
            ("hell", -24.0),
            ("\u{2581}hell", -25.0),
            ("\u{2581}hello", -26.0),
            ("\u{2581}w", -27.0),
            ("or", -28.0),
            ("\u{2581}wor", -29.0),
            ("ld", -30.0),
            ("\u{2581}world", -31.0),
            ("lo", -19.0),
            ("llo", -32.0),
        ];
        let mut scores = vec![0.0f32; tokens.len()];
        for (p, sc) in pieces {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(sc);
        }
        let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
        spec.set("tokenizer.ggml.model", s("llama"));
        spec.remove("tokenizer.ggml.pre");
        spec.remove("tokenizer.ggml.merges");
        spec.remove("tokenizer.ggml.add_bos_token");
        spec.set("tokenizer.ggml.tokens", strings(&toks));
        spec.set(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        spec.set(
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        spec.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
        let mut rng = SplitMix64::new(1);
        spec.tensor(
            "token_embd.weight",
            &randn(&mut rng, &[tokens.len(), 32]),
            GgmlDType::F32,
        );
        let ck = read(&spec.write(dir.path(), "spm.gguf")).expect("read");
        // The ids transformers 4.47.1 gives (merges built from the scores, byte fallback).
        assert_eq!(encode(&ck, "hello world"), [1, 273, 278]);
        assert_eq!(encode(&ck, "Hello world"), [1, 259, 75, 261, 280, 278]);
        assert_eq!(encode(&ck, "h\u{e9}llo"), [1, 269, 198, 172, 280]);
        assert_eq!(encode(&ck, "<s>hello"), [1, 1, 273]);
        assert_eq!(encode(&ck, "hello  world"), [1, 273, 259, 278]);
        assert_eq!(encode(&ck, " hello"), [1, 259, 273]);
        assert_eq!(encode(&ck, "hellollo"), [1, 273, 280]);
        let decoded = ck
            .tokenizer
            .decode(&[1, 259, 75, 261, 280, 278], true)
            .expect("decode");
        assert_eq!(decoded, "Hello world");
    }
}
