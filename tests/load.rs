//! Loading every checkpoint and tokenizer variant, and refusing broken ones.

use crate::common;

use std::path::Path;

use candle_core::{DType, Device};
use kn::model::random::Layout;
use kn::model::{LoadedModel, ModelFiles, ModelSource, TokenizerFiles};
use kn::predict::mask_distribution;

fn load(dir: &Path) -> kn::Result<LoadedModel> {
    let files = ModelFiles::locate(&ModelSource::Local(dir.to_path_buf()))?;
    LoadedModel::load(files, DType::F32, &Device::Cpu)
}

const PROMPT: &str = "the capital of france is [MASK] .";

fn probabilities(dir: &Path) -> Vec<f32> {
    let lm = load(dir).unwrap();
    mask_distribution(&lm, PROMPT, &()).unwrap().probabilities
}

/// The same weights under every naming convention give bit-identical outputs.
#[test]
fn weight_name_layouts_load_identically() {
    let root = tempfile::tempdir().unwrap();
    let base = probabilities(&common::tiny_model(
        &root.path().join("base"),
        Layout::default(),
    ));
    assert!(base.iter().all(|p| p.is_finite()));
    assert!((base.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    let layouts = [
        Layout {
            explicit_decoder: true,
            ..Layout::default()
        },
        Layout {
            bert_prefix: false,
            gamma_beta: true,
            ..Layout::default()
        },
        Layout {
            decoder_bias: true,
            ..Layout::default()
        },
        Layout {
            bert_prefix: false,
            gamma_beta: true,
            explicit_decoder: true,
            decoder_bias: true,
        },
    ];
    for (i, layout) in layouts.into_iter().enumerate() {
        let dir = common::tiny_model(&root.path().join(format!("v{i}")), layout);
        assert_eq!(probabilities(&dir), base, "{layout:?}");
    }
}

/// An untied `cls.predictions.decoder.weight` is used instead of the word embeddings.
#[test]
fn untied_decoder_is_used() {
    let root = tempfile::tempdir().unwrap();
    let cfg = common::tiny();
    let layout = Layout {
        explicit_decoder: true,
        ..Layout::default()
    };
    let mut tensors = kn::model::random::random_tensors(&cfg, layout, 42, 0.5).unwrap();
    let tied = root.path().join("tied");
    kn::model::random::write_checkpoint(&tied, &cfg, common::TINY_VOCAB, &tensors).unwrap();
    let decoder = tensors["cls.predictions.decoder.weight"].clone();
    tensors.insert(
        "cls.predictions.decoder.weight".into(),
        (decoder * -1.0).unwrap(),
    );
    let untied = root.path().join("untied");
    kn::model::random::write_checkpoint(&untied, &cfg, common::TINY_VOCAB, &tensors).unwrap();
    let (a, b) = (probabilities(&tied), probabilities(&untied));
    let moved = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "negating the decoder changed nothing ({moved})"
    );
}

/// `tokenizer.json` and the WordPiece tokenizer kn builds from `vocab.txt` +
/// `tokenizer_config.json` agree, on bert-base-uncased's real files.
#[test]
fn tokenizer_json_and_vocab_txt_agree_on_bert_base_uncased() {
    let minilm = common::minilm();
    let root = tempfile::tempdir().unwrap();
    let cfg = kn::model::random::tiny_config(30522, 16, 2, 32);
    let tensors = kn::model::random::random_tensors(&cfg, Layout::default(), 1, 0.5).unwrap();
    let json_dir = root.path().join("json");
    kn::model::random::write_checkpoint(&json_dir, &cfg, &[], &tensors).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(minilm.join(f), json_dir.join(f)).unwrap();
    }
    let vocab_dir = root.path().join("vocab");
    kn::model::random::write_checkpoint(&vocab_dir, &cfg, &[], &tensors).unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(minilm.join(f), vocab_dir.join(f)).unwrap();
    }
    let from_json = load(&json_dir).unwrap();
    let from_vocab = load(&vocab_dir).unwrap();
    assert!(matches!(from_json.files.tokenizer, TokenizerFiles::Json(_)));
    assert!(matches!(
        from_vocab.files.tokenizer,
        TokenizerFiles::Vocab { .. }
    ));

    let e = from_json
        .tokenizer
        .encode_prompt("The capital of France is [MASK].")
        .unwrap();
    assert_eq!(e.ids, [101, 1996, 3007, 1997, 2605, 2003, 103, 1012, 102]);
    assert_eq!(e.mask_position, 6);
    for prompt in [
        "The capital of France is [MASK].",
        "Straße, café and naïve words: [MASK]!",
        "Unbelievably, [MASK] was born in Zürich in 1879.",
        "  spaces\tand\ttabs [MASK]  ",
    ] {
        let a = from_json.tokenizer.encode_prompt(prompt).unwrap();
        let b = from_vocab.tokenizer.encode_prompt(prompt).unwrap();
        assert_eq!(a, b, "{prompt}");
    }
    assert_eq!(from_json.tokenizer.answer_id("Paris").unwrap(), 3000);
    assert_eq!(from_vocab.tokenizer.answer_id("Paris").unwrap(), 3000);
    let err = from_json
        .tokenizer
        .answer_id("Ouagadougou")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r###"["ou", "##aga", "##dou", "##go", "##u"]"###),
        "{err}"
    );
}

/// Without `tokenizer_config.json`, a vocabulary with only upper-case words (a cased or
/// protein model) is not lower-cased, so AntiBERTy still reads its residues.
#[test]
fn cased_vocabulary_without_tokenizer_config_is_not_lowercased() {
    let dir = tempfile::tempdir().unwrap();
    common::copy_dir(&common::antiberty(), dir.path());
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let lm = load(dir.path()).unwrap();
    let e = lm.tokenizer.encode_prompt("E V Q [MASK] V E").unwrap();
    assert_eq!(e.ids, [2, 8, 22, 18, 4, 22, 8, 3]);
}

#[test]
fn encoder_without_mlm_head_is_refused() {
    let err = load(&common::minilm()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("no masked-LM head"), "{err}");
}

#[test]
fn config_that_disagrees_with_weights_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(dir.path(), Layout::default());
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"intermediate_size\": 32", "\"intermediate_size\": 48"),
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("does not match config.json"), "{err}");
    assert!(err.contains("intermediate.dense.weight"), "{err}");
}
