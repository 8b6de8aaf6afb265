//! Prints the paper's findings table measured on a model and its facts beside the paper's
//! (Dai et al. 2022): refined neurons per fact and their layers, shared
//! neurons, suppress and amplify against random neurons and the activation baseline,
//! updates against random neurons, erasing each relation.
//!
//! `cargo run --release --example findings -- [MODEL_DIR] [FACTS.jsonl] [--per-relation N]
//! [--json OUT]` (default: the bundled data/fact-model and data/facts.jsonl, every fact;
//! `--per-relation N` keeps the first N facts of each relation).

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use kn::attribution::record::FactLine;
use kn::attribution::run::{fact_id, into_fact};
use kn::findings::{measure, FindingsOptions};
use kn::model::{LoadedModel, ModelFiles, ModelSource};

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let json = match args.iter().position(|a| a == "--json") {
        Some(i) => {
            let path = args.get(i + 1).context("--json needs a file")?.clone();
            args.drain(i..=i + 1);
            Some(PathBuf::from(path))
        }
        None => None,
    };
    let per_relation = match args.iter().position(|a| a == "--per-relation") {
        Some(i) => {
            let n: usize = args
                .get(i + 1)
                .context("--per-relation needs a number")?
                .parse()?;
            args.drain(i..=i + 1);
            n
        }
        None => usize::MAX,
    };
    let model = PathBuf::from(args.first().map_or("data/fact-model", String::as_str));
    let facts_path = PathBuf::from(args.get(1).map_or("data/facts.jsonl", String::as_str));
    let files = ModelFiles::in_directory(&model, ModelSource::Local(model.clone()), None)?;
    let lm = LoadedModel::load(files, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", model.display()))?;
    let text = std::fs::read_to_string(&facts_path)
        .with_context(|| format!("reading {}", facts_path.display()))?;
    let facts = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, text)| {
            let at = || format!("{}:{}", facts_path.display(), n + 1);
            let line: FactLine = serde_json::from_str(text).with_context(at)?;
            let id = fact_id(&line, n + 1);
            into_fact(line, id).map_err(|reason| anyhow::anyhow!("{}: {reason}", at()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut taken = std::collections::HashMap::new();
    let facts: Vec<_> = facts
        .into_iter()
        .filter(|f| {
            let count = taken.entry(f.relation.clone()).or_insert(0usize);
            *count += 1;
            *count <= per_relation
        })
        .collect();
    let options = FindingsOptions {
        updates: 40,
        eval_per_relation: 5,
        seed: 0,
    };
    let start = std::time::Instant::now();
    let findings = measure(&lm, &facts, &options, &mut |stage| {
        eprintln!("findings: {stage} ({:.0} s)", start.elapsed().as_secs_f64())
    })?;
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&findings)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", findings.table());
    eprintln!("findings: done in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
