//! `kn probe`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;

use super::{claim_output, report, ModelArgs, Outcome};
use crate::attribution::model_info;
use crate::attribution::NeuronsFile;
use crate::data::output::{write_whole, PartialFile};
use crate::data::{JsonlInput, JsonlWriter, LineErrors};
use crate::probe::{run_probe, ControlKind, Effect, ProbeMode, ProbeOptions, ProbeSummary, Prober};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ControlArg {
    /// As many random neurons in the same layers.
    Random,
    /// The refined neurons of a random fact of another relation (the paper's control).
    OtherRelation,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["suppress", "amplify"]))]
pub(super) struct ProbeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Knowledge neurons: `kn attribute` output; `-` reads stdin.
    #[arg(long, value_name = "FILE|-")]
    neurons: PathBuf,
    /// Facts to probe (JSONL, matched to the neurons by id; prompts and answer may be
    /// left out and are then the neurons file's). Default: every fact of --neurons.
    #[arg(long, value_name = "FILE|-")]
    fact: Option<PathBuf>,
    /// Set the neurons to 0 at the mask.
    #[arg(long)]
    suppress: bool,
    /// Multiply the neurons by --factor at the mask.
    #[arg(long)]
    amplify: bool,
    /// Amplification factor.
    #[arg(long, default_value_t = 2.0, requires = "amplify")]
    factor: f64,
    /// Control neurons.
    #[arg(long, value_enum, default_value = "random")]
    control: ControlArg,
    /// Seed of the control draws (each fact's draw depends only on it and the fact id).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSONL, one line per fact; `-` writes stdout.
    #[arg(long, default_value = "-", value_name = "FILE|-")]
    out: PathBuf,
    /// Also write the per-relation summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Overwrite existing --out / --summary files.
    #[arg(long)]
    force: bool,
    /// Stop at the first bad fact.
    #[arg(long)]
    fail_fast: bool,
}

pub(super) fn run(args: ProbeArgs) -> anyhow::Result<Outcome> {
    if args.fact.as_deref() == Some(Path::new("-")) && args.neurons == Path::new("-") {
        bail!("--neurons and --fact cannot both read stdin");
    }
    if args.summary.is_some() && args.summary.as_ref() == Some(&args.out) {
        bail!("--out and --summary name the same file");
    }
    let inputs: Vec<PathBuf> = [Some(&args.neurons), args.fact.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let mut locks = Vec::new();
    for path in [Some(&args.out), args.summary.as_ref()]
        .into_iter()
        .flatten()
    {
        locks.push(claim_output(path, &inputs, args.model.quiet)?);
        if path != Path::new("-") && path.exists() && !args.force {
            bail!("{} exists; pass --force to overwrite it", path.display());
        }
    }
    let neurons = NeuronsFile::read(&args.neurons)?;
    let input = args.fact.as_deref().map(JsonlInput::open).transpose()?;
    let outputs: Vec<&Path> = [Some(args.out.as_path()), args.summary.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let lm = args.model.load(&outputs)?;
    let model = model_info(&lm)?;
    if !args.model.quiet
        && !neurons
            .model_hashes()
            .contains(model.weights_sha256.as_str())
    {
        eprintln!(
            "kn: note: the neurons in {} were found with other weights than {}'s",
            neurons.path.display(),
            model.source
        );
    }
    let options = ProbeOptions {
        mode: if args.suppress {
            ProbeMode::Suppress
        } else {
            ProbeMode::Amplify
        },
        factor: args.factor,
        control: match args.control {
            ControlArg::Random => ControlKind::Random,
            ControlArg::OtherRelation => ControlKind::OtherRelation,
        },
        seed: args.seed,
        fail_fast: args.fail_fast,
    };
    let prober = Prober::new(&lm, &neurons, options, model)?;
    let mut report_line = report;
    let mut errors = LineErrors::new(options.fail_fast, &mut report_line);
    let (run, summary) = if args.out == Path::new("-") {
        let mut out = JsonlWriter::new(std::io::stdout().lock(), "<stdout>");
        run_probe(&prober, input, &mut out, &mut errors)?
    } else {
        // Whole or not at all: renamed into place once every fact is done.
        let partial = PartialFile::create(&args.out)?;
        let mut out = JsonlWriter::new(std::io::BufWriter::new(partial.file()), &args.out);
        let done = run_probe(&prober, input, &mut out, &mut errors)?;
        drop(out);
        partial.commit()?;
        done
    };
    if let Some(path) = &args.summary {
        let text = serde_json::to_string_pretty(&summary)? + "\n";
        write_whole(path, text.as_bytes())?;
    }
    if !args.model.quiet {
        let mut stderr = std::io::stderr().lock();
        write_table(&mut stderr, &summary)?;
    }
    Ok(if run.failed > 0 {
        Outcome::Failed(run.failed)
    } else {
        Outcome::Clean
    })
}

/// The summary as a table: one row per relation, then all of them.
fn write_table(out: &mut impl Write, summary: &ProbeSummary) -> std::io::Result<()> {
    let what = match summary.mode {
        ProbeMode::Suppress => "suppress".to_string(),
        ProbeMode::Amplify => format!("amplify ×{}", summary.factor),
    };
    let control = match summary.control {
        ControlKind::Random => "random neurons",
        ControlKind::OtherRelation => "other relation's neurons",
    };
    writeln!(
        out,
        "kn: {what}: gold probability change, mean(after − before) / mean(before); control: {control}"
    )?;
    let width = summary
        .relations
        .iter()
        .map(|e| e.relation.as_deref().map_or(6, str::len))
        .max()
        .unwrap_or(0)
        .max(8);
    writeln!(
        out,
        "{:<width$} {:>6} {:>8} {:>10} {:>10} {:>10}",
        "relation", "facts", "prompts", "before", "neurons", "control"
    )?;
    let row = |out: &mut dyn Write, name: &str, e: &Effect| {
        writeln!(
            out,
            "{:<width$} {:>6} {:>8} {:>10.4} {:>+9.2}% {:>+9.2}%",
            name,
            e.facts,
            e.prompts,
            e.before,
            100.0 * e.change,
            100.0 * e.control_change
        )
    };
    for effect in &summary.relations {
        row(out, effect.relation.as_deref().unwrap_or("(none)"), effect)?;
    }
    row(out, "all", &summary.overall)?;
    if summary.skipped > 0 {
        writeln!(
            out,
            "kn: {} fact(s) skipped: no refined neurons",
            summary.skipped
        )?;
    }
    Ok(())
}
