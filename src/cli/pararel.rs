//! `kn pararel`: ParaRel's patterns and facts to kn's fact JSONL, with a summary of what
//! was kept and dropped on stderr.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::{claim_output, Outcome};
use crate::data::output::{self, PartialFile};
use crate::data::pararel::{
    convert, AnswerVocab, BundledDir, ConvertOptions, DataDir, ParaRelDirs, Summary,
};
use crate::data::JsonlWriter;
use crate::model::{MaskTokenizer, ModelSource, TokenizerFiles};

#[derive(Debug, Args)]
pub(super) struct PararelArgs {
    /// ParaRel's patterns directory: one P<id>.jsonl per relation, lines {"pattern": "[X] … [Y] …"}
    /// [default: the copy built into kn, the repository's data/pararel/patterns].
    #[arg(long, value_name = "DIR")]
    patterns: Option<PathBuf>,
    /// ParaRel's facts directory: one P<id>.jsonl per relation, lines {"sub_label", "obj_label", "uuid"}
    /// [default: the copy built into kn, the repository's data/pararel/facts].
    #[arg(long, value_name = "DIR")]
    facts: Option<PathBuf>,
    /// Only these relations, comma-separated [default: every relation with both files].
    #[arg(long, value_delimiter = ',', value_name = "P36,P19")]
    relations: Vec<String>,
    /// Drop relations with fewer distinct patterns (the paper keeps those with more than 3).
    #[arg(long, default_value_t = 4)]
    min_patterns: usize,
    /// Drop (and count) facts whose object is not one token of this model's tokenizer:
    /// a model directory, GGUF file or hub id (only its tokenizer files are read or
    /// fetched). For a causal model the object is tokenized after a space (" Paris"),
    /// and --object-last is implied.
    #[arg(long, value_name = "DIR|FILE|HUB_ID")]
    vocab: Option<String>,
    /// Keep only the patterns whose [Y] ends the sentence (a causal model reads the
    /// prompt up to the answer); --min-patterns counts the patterns kept.
    #[arg(long)]
    object_last: bool,
    /// At most N facts per relation, drawn at random (--seed) among the facts kept, and
    /// written in file order [default: every fact].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Seed of the --limit draw: the same seed draws the same facts [default: 0].
    #[arg(long, value_name = "S", requires = "limit")]
    seed: Option<u64>,
    /// Output JSONL; `-` writes stdout.
    #[arg(long, default_value = "-", value_name = "FILE|-")]
    out: PathBuf,
    /// Overwrite an existing --out.
    #[arg(long)]
    force: bool,
    /// Print nothing on stderr but errors (no summary).
    #[arg(long, short)]
    quiet: bool,
}

impl PararelArgs {
    fn options(&self) -> anyhow::Result<ConvertOptions> {
        let relations: Vec<String> = self
            .relations
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        if !self.relations.is_empty() && relations.is_empty() {
            bail!("--relations names no relation");
        }
        Ok(ConvertOptions {
            dirs: ParaRelDirs {
                patterns: dir_or_bundled(&self.patterns, BundledDir::Patterns),
                facts: dir_or_bundled(&self.facts, BundledDir::Facts),
            },
            relations: (!relations.is_empty()).then_some(relations),
            min_patterns: self.min_patterns,
            object_last: self.object_last,
            limit: self.limit.map(|n| n as usize),
            seed: self.seed.unwrap_or(0),
        })
    }
}

/// The directory given, or the copy of ParaRel built into kn.
fn dir_or_bundled(given: &Option<PathBuf>, bundled: BundledDir) -> DataDir {
    given
        .clone()
        .map_or(DataDir::Bundled(bundled), DataDir::Path)
}

pub(super) fn run(args: PararelArgs) -> anyhow::Result<Outcome> {
    let mut options = args.options()?;
    let inputs: Vec<PathBuf> = [&args.patterns, &args.facts]
        .into_iter()
        .flatten()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|entry| entry.path())
        .collect();
    let _lock = claim_output(&args.out, &inputs, args.quiet)?;
    // Refuse an existing --out before the (longer) reading, and write it only once every
    // input line has been checked, so that bad input leaves no partial file.
    if !output::is_stdout(&args.out) && args.out.exists() && !args.force {
        bail!(
            "{}: exists; use --force to overwrite it",
            args.out.display()
        );
    }
    let vocab = match &args.vocab {
        Some(spec) => {
            let source = ModelSource::parse(spec, None)?;
            let files = TokenizerFiles::locate(&source)?;
            output::refuse_inputs(&args.out, &files.paths())?;
            let tokenizer = MaskTokenizer::for_model(&files)
                .with_context(|| format!("loading the tokenizer of {source}"))?;
            Some(tokenizer)
        }
        None => None,
    };
    if vocab.as_ref().is_some_and(MaskTokenizer::is_causal) {
        options.object_last = true;
    }
    let conversion = convert(&options, vocab.as_ref().map(|v| v as &dyn AnswerVocab))?;
    if output::is_stdout(&args.out) {
        let mut out = JsonlWriter::new(std::io::stdout().lock(), "<stdout>");
        for fact in &conversion.facts {
            out.write(fact)?;
        }
    } else {
        // Whole or not at all: a full disk leaves no partial --out to be --forced over.
        let partial = PartialFile::create(&args.out)?;
        let mut out = JsonlWriter::new(std::io::BufWriter::new(partial.file()), &args.out);
        for fact in &conversion.facts {
            out.write(fact)?;
        }
        drop(out);
        partial.commit()?;
    }
    if !args.quiet {
        print_summary(&conversion.summary, args.vocab.as_deref());
    }
    Ok(Outcome::Clean)
}

/// One line per relation, then the totals, on stderr.
fn print_summary(summary: &Summary, vocab: Option<&str>) {
    for (name, reason) in summary.dropped() {
        eprintln!("kn: {name}: dropped: {reason}");
    }
    for (name, c) in summary.kept() {
        let mut line = format!("kn: {name}: {} patterns", c.patterns);
        if c.duplicate_patterns > 0 {
            line += &format!(" ({} duplicate lines dropped)", c.duplicate_patterns);
        }
        if c.object_not_last > 0 {
            line += &format!(" ({} with text after [Y] dropped)", c.object_not_last);
        }
        line += &format!(", {} facts", c.facts);
        if c.duplicate_facts > 0 {
            line += &format!(" ({} duplicate lines dropped)", c.duplicate_facts);
        }
        if let Some(vocab) = vocab {
            line += &format!(
                ", {} dropped (object not one token of {vocab})",
                c.not_one_token
            );
        }
        line += &format!(", {} written", c.written);
        eprintln!("{line}");
    }
    let kept = summary.kept().count();
    let dropped = summary.dropped().count();
    let mut total = format!(
        "kn: {kept} relations kept, {dropped} dropped; {} facts ({} prompts) written",
        summary.written(),
        summary.prompts()
    );
    if let Some(vocab) = vocab {
        total += &format!(
            "; {} facts dropped because their object is not one token of {vocab}",
            summary.not_one_token()
        );
    }
    eprintln!("{total}");
}
