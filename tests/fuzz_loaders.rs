//! Loaders against corrupt input: truncated and randomly mutated `config.json`s and
//! safetensors files (headers especially) of every architecture are errors, never
//! panics. (GGUF files get the same treatment in `model::gguf`'s unit tests.)

use crate::common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kn::model::random::Layout;
use kn::model::{LoadedModel, ModelFiles, ModelSource};
use kn::rng::SplitMix64;

/// One model directory per architecture and layout: BERT, GPT-2 and Llama tied and
/// untied, Qwen2.
fn sources(tmp: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![common::tiny_model(&tmp.join("bert"), Layout::default())];
    for name in [
        "gpt2-tied",
        "gpt2-untied",
        "llama-tied",
        "llama-untied",
        "qwen2-untied",
    ] {
        dirs.push(common::tiny_decoder(name));
    }
    dirs
}

/// Loads `dir`; `Err(message)` for a load error, and a test failure for a panic.
fn try_load(dir: &Path, what: &str) -> Result<(), String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let files = ModelFiles::locate(&ModelSource::Local(dir.to_path_buf()))
            .map_err(|e| e.to_string())?;
        LoadedModel::load(files, DType::F32, &Device::Cpu)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }));
    match outcome {
        Ok(result) => result,
        Err(_) => panic!("loading {} panicked ({what})", dir.display()),
    }
}

/// A copy of `source` in `into` with `name` replaced by `bytes`.
fn with_file(source: &Path, into: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let _ = std::fs::remove_dir_all(into);
    common::copy_dir(source, into);
    std::fs::write(into.join(name), bytes).unwrap();
    into.to_path_buf()
}

/// A mutation of `bytes`: a few random bytes replaced, or a random run of them, biased
/// to the first `hot` bytes (a safetensors header; all of a config.json).
fn mutate(rng: &mut SplitMix64, bytes: &[u8], hot: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let hot = hot.clamp(1, out.len());
    let edits = 1 + (rng.next_u64() % 4) as usize;
    for _ in 0..edits {
        let at = (rng.next_u64() as usize) % hot;
        match rng.next_u64() % 4 {
            0 => out[at] ^= 1 << (rng.next_u64() % 8),
            1 => out[at] = rng.next_u64() as u8,
            2 => out[at] = b"0123456789-9e\"{}[],:"[(rng.next_u64() % 20) as usize],
            _ => {
                let end = (at + 8).min(out.len());
                for b in &mut out[at..end] {
                    *b = 0xff;
                }
            }
        }
    }
    out
}

#[test]
fn corrupt_configs_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(2026);
    for (n, source) in sources(tmp.path()).iter().enumerate() {
        let config = std::fs::read(source.join("config.json")).unwrap();
        let work = tmp.path().join(format!("config-{n}"));
        assert!(try_load(&with_file(source, &work, "config.json", &config), "as is").is_ok());
        for len in (0..config.len()).step_by(7) {
            let dir = with_file(source, &work, "config.json", &config[..len]);
            let error = try_load(&dir, &format!("config.json cut at {len}")).unwrap_err();
            assert!(error.contains("config.json"), "{error}");
        }
        for round in 0..100 {
            let mutated = mutate(&mut rng, &config, config.len());
            let dir = with_file(source, &work, "config.json", &mutated);
            let _ = try_load(&dir, &format!("config.json mutation {round}"));
        }
        // Absurd sizes are refused by name before anything is allocated for them.
        let json: serde_json::Value = serde_json::from_slice(&config).unwrap();
        for field in [
            "hidden_size",
            "n_embd",
            "num_hidden_layers",
            "n_layer",
            "vocab_size",
        ] {
            if json.get(field).is_none() {
                continue;
            }
            for value in [0u64, 1 << 40] {
                let mut changed = json.clone();
                changed[field] = value.into();
                let dir = with_file(source, &work, "config.json", changed.to_string().as_bytes());
                let error = try_load(&dir, &format!("{field} = {value}")).unwrap_err();
                assert!(error.contains("config.json"), "{field} = {value}: {error}");
            }
        }
    }
}

#[test]
fn corrupt_safetensors_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(7);
    for (n, source) in sources(tmp.path()).iter().enumerate() {
        let weights = std::fs::read(source.join("model.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
        let work = tmp.path().join(format!("weights-{n}"));
        // Every cut through the header, and some through the data.
        let cuts = (0..header.min(weights.len())).chain((header..weights.len()).step_by(4099));
        for len in cuts {
            let dir = with_file(source, &work, "model.safetensors", &weights[..len]);
            let error = try_load(&dir, &format!("cut at {len}")).unwrap_err();
            assert!(error.contains("model.safetensors"), "{error}");
        }
        for round in 0..100 {
            let mutated = mutate(&mut rng, &weights, header);
            let dir = with_file(source, &work, "model.safetensors", &mutated);
            let _ = try_load(&dir, &format!("header mutation {round}"));
        }
        // A header length past the end of the file, or of any sane size.
        for length in [u64::MAX, 1 << 40, weights.len() as u64] {
            let mut bad = weights.clone();
            bad[..8].copy_from_slice(&length.to_le_bytes());
            let dir = with_file(source, &work, "model.safetensors", &bad);
            assert!(try_load(&dir, &format!("header length {length}")).is_err());
        }
    }
}
