//! Trains the bundled fact model: a small BERT masked LM (Hugging Face layout, kn's own
//! BERT code) that memorises a fixed set of ParaRel facts, with some patterns of every
//! relation held out of training to measure paraphrase generalisation.
//!
//! ```sh
//! cargo run --release --example train-fact-model -- --out data/fact-model [--seed 0]
//! ```
//!
//! Writes into `--out`: `config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `model.safetensors` (names as `BertForMaskedLM.save_pretrained` writes them),
//! `training.json` (the settings and accuracy figures) and `TRAINING.log` (this run's
//! log); and `--facts` (default `data/facts.jsonl`): every fact with all its prompts and
//! the held-out ones in `held_out_prompts`.
//!
//! The facts come from ParaRel (`--pararel`, default `data/pararel` in the
//! repository). Everything random (initial weights, batch order) comes from `--seed`
//! through kn's SplitMix64; the choice of facts is fixed (draw seed 0), so runs with
//! other seeds train on the same facts. candle's CPU kernels are deterministic: two runs
//! with the same seed wrote the same `model.safetensors` byte for byte.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use serde::Serialize;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, Tokenizer,
};

use kn::data::pararel::{draw, ParaRelDirs, ParaRelFact, Relation, Triple};
use kn::model::random::{random_tensors, write_checkpoint, Layout};
use kn::model::{BertMaskedLm, Config, LoadedModel, MaskTokenizer, ModelFiles, ModelSource};
use kn::predict::mask_distribution;
use kn::rng::SplitMix64;

/// The relations the model learns: at least 4 patterns each, and subjects of different
/// kinds (regions, cities, people, organisations, software, TV shows), so that a
/// subject names one fact.
const RELATIONS: &[&str] = &[
    "P36",   // capital: Cook County → Chicago
    "P37",   // official language: Padasjoki → Finnish
    "P103",  // native language: Pierre Messmer → French
    "P159",  // headquarters location: OMERS → Toronto
    "P178",  // developer: macOS → Apple
    "P413",  // position played: Johan Santana → pitcher
    "P449",  // original network: The Rousters → NBC
    "P740",  // location of formation: Barren Earth → Helsinki
    "P1303", // instrument: Nigel Pulsford → guitar
    "P1376", // capital of: Ankara → Turkey
];

/// Facts drawn per relation.
const FACTS_PER_RELATION: usize = 40;

/// Seed of the draw of facts: fixed, so that `--seed` changes only the training.
const DATA_SEED: u64 = 0;

/// Pattern `i` of a relation with `n` patterns is held out of training when this says so:
/// every fifth pattern, and the last one of relations with fewer than five.
fn held_out(i: usize, n: usize) -> bool {
    i % 5 == 4 || (n < 5 && i + 1 == n)
}

/// The special tokens, with ids 0..5 in this order.
const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

#[derive(Debug, Parser)]
#[command(about = "Train the bundled fact model on ParaRel facts")]
struct Args {
    /// Output model directory.
    #[arg(long, default_value = "data/fact-model")]
    out: PathBuf,
    /// Where to write the facts (all prompts, and which are held out).
    #[arg(long, default_value = "data/facts.jsonl")]
    facts: PathBuf,
    /// ParaRel (with patterns/ and facts/).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/pararel"))]
    pararel: PathBuf,
    /// Seed of the initial weights and of the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Passes over the training prompts.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Prompts per optimiser step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak learning rate (AdamW; linear warm-up over the first epoch, then linear decay to 0).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Residual stream width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
}

/// A fact of the training set: its output line and which prompts are held out.
#[derive(Debug, Serialize)]
struct FactLine {
    #[serde(flatten)]
    fact: ParaRelFact,
    /// The prompts of the held-out patterns (also in `prompts`).
    held_out_prompts: Vec<String>,
}

/// A prompt ready for the model.
#[derive(Debug, Clone)]
struct Example {
    ids: Vec<u32>,
    mask_position: usize,
    answer_id: u32,
}

/// The settings and figures of a run, written as `training.json`.
#[derive(Debug, Serialize)]
struct TrainingRecord {
    command: String,
    seed: u64,
    relations: Vec<String>,
    facts: usize,
    train_prompts: usize,
    held_out_prompts: usize,
    train_correct: usize,
    held_out_correct: usize,
    train_accuracy: f64,
    held_out_accuracy: f64,
    epochs: usize,
    batch: usize,
    lr: f64,
    weight_decay: f64,
    held_out_patterns: Vec<HeldOut>,
    training_seconds: f64,
    weights_sha256: String,
}

/// The patterns of a relation held out of training.
#[derive(Debug, Serialize)]
struct HeldOut {
    relation: String,
    patterns: Vec<String>,
}

/// Writes every line to stderr and to the log file.
struct Log {
    lines: Vec<String>,
}

impl Log {
    fn line(&mut self, text: String) {
        eprintln!("{text}");
        self.lines.push(text);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut log = Log { lines: Vec::new() };
    let command = format!(
        "cargo run --release --example train-fact-model -- --out {} --seed {}",
        args.out.display(),
        args.seed
    );
    log.line(format!("train-fact-model: {command}"));

    let (relations, facts) = choose_facts(&ParaRelDirs::under(&args.pararel))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let vocabulary = write_tokenizer(&args.out, &facts)?;

    let config = Config {
        vocab_size: vocabulary,
        hidden_size: args.hidden,
        num_hidden_layers: args.layers,
        num_attention_heads: args.heads,
        intermediate_size: 4 * args.hidden,
        hidden_act: "gelu".into(),
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        position_embedding_type: "absolute".into(),
        model_type: Some("bert".into()),
        num_key_value_heads: args.heads,
        head_dim: args.hidden / args.heads,
        ..Config::default()
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let tokenizer = MaskTokenizer::load(&kn::model::TokenizerFiles::Json(
        args.out.join("tokenizer.json"),
    ))?;
    let (train, held) = examples(&tokenizer, &facts, &config)?;
    log.line(format!(
        "{} relations, {} facts, {} training prompts, {} held-out prompts; vocabulary {vocabulary}; \
         {} layers × {} neurons, hidden {}",
        relations.len(),
        facts.len(),
        train.len(),
        held.len(),
        config.num_hidden_layers,
        config.intermediate_size,
        config.hidden_size
    ));

    let device = Device::Cpu;
    let varmap = initial_weights(&config, args.seed)?;
    let model = BertMaskedLm::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &config,
    )?;
    log.line(format!(
        "{} parameters",
        varmap
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().elem_count())
            .sum::<usize>()
    ));

    let mut optimiser = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let steps_per_epoch = train.len().div_ceil(args.batch);
    let total_steps = steps_per_epoch * args.epochs;
    let mut rng = SplitMix64::new(args.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut step = 0usize;
    let training = Instant::now();
    for epoch in 1..=args.epochs {
        rng.shuffle(&mut order);
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for chunk in order.chunks(args.batch) {
            let batch: Vec<&Example> = chunk.iter().map(|&i| &train[i]).collect();
            optimiser.set_learning_rate(learning_rate(args.lr, step, steps_per_epoch, total_steps));
            let (logits, targets) = forward(&model, &batch, &device)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            optimiser.backward_step(&loss)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?) * batch.len() as f64;
            correct += count_correct(&logits, &batch)?;
            step += 1;
        }
        let held_correct = accuracy(&model, &held, &device)?;
        log.line(format!(
            "epoch {epoch:>3}  loss {:.4}  train top-1 {:.1}% (during the epoch)  held-out top-1 {:.1}%  {:.0} s",
            loss_sum / train.len() as f64,
            percent(correct, train.len()),
            percent(held_correct, held.len()),
            training.elapsed().as_secs_f64()
        ));
    }
    let training_seconds = training.elapsed().as_secs_f64();

    save_weights(&varmap, &config, &args.out)?;
    write_facts(&args.facts, &facts)?;

    // The figures are measured on the saved model, loaded the way `kn` loads it, one
    // prompt at a time with kn's own prediction code: what a user would get.
    let lm = LoadedModel::load(
        ModelFiles::locate(&ModelSource::Local(args.out.clone()))?,
        DType::F32,
        &device,
    )?;
    let (mut train_correct, mut held_correct, mut train_prompts, mut held_prompts) = (0, 0, 0, 0);
    for fact in &facts {
        let answer = lm.tokenizer.answer_id(&fact.fact.answer)?;
        for prompt in &fact.fact.prompts {
            let top = mask_distribution(&lm, prompt, &())?.top_k(1)[0].0;
            let hit = usize::from(top == answer);
            if fact.held_out_prompts.contains(prompt) {
                held_prompts += 1;
                held_correct += hit;
            } else {
                train_prompts += 1;
                train_correct += hit;
            }
        }
    }
    let record = TrainingRecord {
        command,
        seed: args.seed,
        relations: relations.iter().map(|r| r.name.clone()).collect(),
        facts: facts.len(),
        train_prompts,
        held_out_prompts: held_prompts,
        train_correct,
        held_out_correct: held_correct,
        train_accuracy: train_correct as f64 / train_prompts as f64,
        held_out_accuracy: held_correct as f64 / held_prompts as f64,
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        weight_decay: args.weight_decay,
        held_out_patterns: relations
            .iter()
            .map(|r| {
                let n = r.patterns.len();
                HeldOut {
                    relation: r.name.clone(),
                    patterns: (0..n)
                        .filter(|&i| held_out(i, n))
                        .map(|i| r.patterns[i].clone())
                        .collect(),
                }
            })
            .collect(),
        training_seconds,
        weights_sha256: lm.files.weights_sha256()?,
    };
    log.line(format!(
        "saved model: top-1 {train_correct}/{train_prompts} = {:.1}% on training prompts, \
         {held_correct}/{held_prompts} = {:.1}% on held-out patterns; training {training_seconds:.0} s, \
         total {:.0} s; weights sha256 {}",
        100.0 * record.train_accuracy,
        100.0 * record.held_out_accuracy,
        started.elapsed().as_secs_f64(),
        record.weights_sha256
    ));
    let json = serde_json::to_string_pretty(&record)? + "\n";
    std::fs::write(args.out.join("training.json"), json)?;
    std::fs::write(args.out.join("TRAINING.log"), log.lines.join("\n") + "\n")?;
    Ok(())
}

/// The relations and the facts the model learns: per relation, facts whose object is
/// one plain word (so a word-level tokenizer keeps it one token) and whose subject names
/// no other fact of the chosen relations (so every prompt has one right answer), then
/// [`FACTS_PER_RELATION`] of them drawn as `kn pararel --limit` draws.
fn choose_facts(dirs: &ParaRelDirs) -> anyhow::Result<(Vec<Relation>, Vec<FactLine>)> {
    let relations: Vec<Relation> = RELATIONS
        .iter()
        .map(|name| Relation::read(dirs, name))
        .collect::<Result<_, _>>()?;
    let mut subjects: HashMap<String, usize> = HashMap::new();
    for relation in &relations {
        for triple in &relation.facts {
            *subjects.entry(triple.subject.to_lowercase()).or_default() += 1;
        }
    }
    let mut lines = Vec::new();
    for relation in &relations {
        ensure!(
            relation.patterns.len() >= 4,
            "{} has {} patterns",
            relation.name,
            relation.patterns.len()
        );
        let usable: Vec<&Triple> = relation
            .facts
            .iter()
            .filter(|t| t.object.chars().all(char::is_alphanumeric))
            .filter(|t| subjects[&t.subject.to_lowercase()] == 1)
            .collect();
        let n = relation.patterns.len();
        for triple in draw(usable, FACTS_PER_RELATION, DATA_SEED, &relation.name) {
            let fact = relation.fact(triple);
            let held_out_prompts = (0..n)
                .filter(|&i| held_out(i, n))
                .map(|i| fact.prompts[i].clone())
                .collect();
            lines.push(FactLine {
                fact,
                held_out_prompts,
            });
        }
    }
    Ok((relations, lines))
}

/// The words of `text` as the tokenizer will split it (BERT's normaliser, lower-casing,
/// and pre-tokenizer).
fn words(text: &str, normalizer: &BertNormalizer) -> anyhow::Result<Vec<String>> {
    let mut normalized = NormalizedString::from(text);
    normalizer
        .normalize(&mut normalized)
        .map_err(anyhow::Error::msg)?;
    let mut split = PreTokenizedString::from(normalized);
    BertPreTokenizer
        .pre_tokenize(&mut split)
        .map_err(anyhow::Error::msg)?;
    Ok(split
        .get_splits(OffsetReferential::Normalized, OffsetType::Byte)
        .into_iter()
        .map(|(word, _, _)| word.to_string())
        .collect())
}

/// Writes a word-level tokenizer (BERT normalisation, lower-cased, BERT pre-tokenizer,
/// `[CLS] … [SEP]`) whose vocabulary is every word of every prompt, held-out ones
/// included, with each answer filled in; returns the vocabulary size.
fn write_tokenizer(dir: &Path, facts: &[FactLine]) -> anyhow::Result<usize> {
    let normalizer = BertNormalizer::new(true, true, None, true);
    let mut vocabulary: BTreeSet<String> = BTreeSet::new();
    for line in facts {
        for prompt in &line.fact.prompts {
            let sentence = prompt.replace("[MASK]", &line.fact.answer);
            vocabulary.extend(words(&sentence, &normalizer)?);
        }
    }
    // Ids: the special tokens first, then the words in sorted order (deterministic).
    let ids: serde_json::Map<String, serde_json::Value> = SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(
            vocabulary
                .into_iter()
                .filter(|w| !SPECIALS.contains(&w.as_str())),
        )
        .enumerate()
        .map(|(id, word)| (word, serde_json::Value::from(id)))
        .collect();
    let size = ids.len();
    let model: WordLevel =
        serde_json::from_str(&serde_json::json!({"vocab": ids, "unk_token": "[UNK]"}).to_string())?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 3),
        ("[CLS]".into(), 2),
    )));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(anyhow::Error::msg)?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "do_lower_case": true,
        "model_max_length": 64,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    Ok(size)
}

/// The training and held-out prompts, tokenized by kn's own tokenizer code; every
/// answer must be one token and every prompt fit the model.
fn examples(
    tokenizer: &MaskTokenizer,
    facts: &[FactLine],
    config: &Config,
) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for line in facts {
        let answer_id = tokenizer.answer_id(&line.fact.answer)?;
        for prompt in &line.fact.prompts {
            let encoded = tokenizer.encode_prompt(prompt)?;
            if encoded.ids.len() > config.max_position_embeddings {
                bail!("{prompt:?} is longer than the model's positions");
            }
            let example = Example {
                ids: encoded.ids,
                mask_position: encoded.mask_position,
                answer_id,
            };
            if line.held_out_prompts.contains(prompt) {
                held.push(example);
            } else {
                train.push(example);
            }
        }
    }
    Ok((train, held))
}

/// BERT's initialisation (weights N(0, 0.02), biases 0, LayerNorm 1 and 0) under the
/// names `BertMaskedLm::load` reads, drawn from `seed`.
fn initial_weights(config: &Config, seed: u64) -> anyhow::Result<VarMap> {
    let layout = Layout {
        bert_prefix: false,
        ..Layout::default()
    };
    let varmap = VarMap::new();
    let mut vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned lock"))?;
    for (name, tensor) in random_tensors(config, layout, seed, 0.02)? {
        let tensor = if name.contains("LayerNorm.weight") {
            tensor.ones_like()?
        } else if name.ends_with(".bias") {
            tensor.zeros_like()?
        } else {
            tensor
        };
        vars.insert(name, Var::from_tensor(&tensor)?);
    }
    drop(vars);
    Ok(varmap)
}

/// Linear warm-up over the first epoch, then linear decay to 0 at the last step.
fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        peak * (total - step) as f64 / (total - warmup).max(1) as f64
    }
}

/// Logits at the mask of each prompt of a padded batch, `[batch, vocab]`, and the answers.
fn forward(
    model: &BertMaskedLm,
    batch: &[&Example],
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let width = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * width);
    let mut mask = Vec::with_capacity(batch.len() * width);
    for example in batch {
        ids.extend(&example.ids);
        mask.extend(std::iter::repeat_n(1f32, example.ids.len()));
        let pad = width - example.ids.len();
        ids.extend(std::iter::repeat_n(0u32, pad));
        mask.extend(std::iter::repeat_n(0f32, pad));
    }
    let ids = Tensor::from_vec(ids, (batch.len(), width), device)?;
    let mask = Tensor::from_vec(mask, (batch.len(), width), device)?;
    let positions: Vec<usize> = batch.iter().map(|e| e.mask_position).collect();
    let logits = model.logits_at(&ids, Some(&mask), &positions, &())?;
    let targets: Vec<u32> = batch.iter().map(|e| e.answer_id).collect();
    Ok((logits, Tensor::new(targets, device)?))
}

/// How many rows of `logits` have their answer as the arg-max.
fn count_correct(logits: &Tensor, batch: &[&Example]) -> anyhow::Result<usize> {
    let top: Vec<u32> = logits.argmax(1)?.to_vec1()?;
    Ok(top
        .iter()
        .zip(batch)
        .filter(|(t, e)| **t == e.answer_id)
        .count())
}

/// Top-1 hits over `examples` (batched, no gradient kept).
fn accuracy(model: &BertMaskedLm, examples: &[Example], device: &Device) -> anyhow::Result<usize> {
    let mut correct = 0;
    for chunk in examples.chunks(256) {
        let batch: Vec<&Example> = chunk.iter().collect();
        let (logits, _) = forward(model, &batch, device)?;
        correct += count_correct(&logits.detach(), &batch)?;
    }
    Ok(correct)
}

/// Writes `config.json` and `model.safetensors` with `BertForMaskedLM`'s names
/// (`bert.` before everything but the `cls.` head).
fn save_weights(varmap: &VarMap, config: &Config, dir: &Path) -> anyhow::Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned lock"))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(name, var)| {
            let name = if name.starts_with("cls.") {
                name.clone()
            } else {
                format!("bert.{name}")
            };
            (name, var.as_tensor().detach())
        })
        .collect();
    write_checkpoint(dir, config, &[], &tensors)?;
    Ok(())
}

/// Writes the facts, one JSON line each.
fn write_facts(path: &Path, facts: &[FactLine]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path)
            .with_context(|| format!("{}: cannot create", path.display()))?,
    );
    for fact in facts {
        serde_json::to_writer(&mut out, fact)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}
