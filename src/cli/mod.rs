//! The command line: clap structs, their translation into library options, and one
//! function per subcommand. Only this module and `main.rs` touch stdout, stderr and
//! exit codes.

mod attribute;
mod edit;
mod generate;
mod merge;
mod pararel;
mod predict;
mod probe;
mod report;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::data::output;
use crate::error::Error;
use crate::model::{DeviceChoice, LoadedModel, ModelFiles, ModelSource};

/// Find and edit knowledge neurons in transformer language models (BERT masked LMs;
/// Llama-family and GPT-2 decoders, also from GGUF files).
#[derive(Debug, Parser)]
#[command(name = "kn", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Score every FFN neuron of every fact by integrated gradients; write coarse and
    /// refined knowledge neurons (JSONL in, JSONL out).
    Attribute(attribute::AttributeArgs),
    /// Redo neuron selection (threshold, share, adaptive share) on `kn attribute` output.
    Refine(attribute::RefineArgs),
    /// Fill-mask (BERT) or next-token (decoders) predictions for cloze prompts (JSONL
    /// in, JSONL out).
    Predict(predict::PredictArgs),
    /// Suppress or amplify facts' knowledge neurons and measure the gold probability,
    /// beside control neurons.
    Probe(probe::ProbeArgs),
    /// Update facts or erase relations through their neurons' value slots; write the
    /// edited model (or restore the original with --revert).
    Edit(edit::EditArgs),
    /// The paper's analyses as tables, plots and JSON (report.md, report.json) from
    /// kn attribute / refine, probe and edit outputs; a short summary on stdout.
    Report(report::ReportArgs),
    /// ParaRel's patterns and facts as kn fact JSONL: every fact with every pattern of
    /// its relation.
    Pararel(pararel::PararelArgs),
    /// Merge the shards of one kn attribute run (--shard K/N outputs) into one file:
    /// one model and one set of parameters, each fact once.
    Merge(merge::MergeArgs),
    /// Print a shell completion script (bash, zsh, fish) on stdout.
    Completions(generate::CompletionsArgs),
    /// Print kn's man page (roff) on stdout.
    Man(generate::ManArgs),
}

/// Which model to load, and where to run it.
#[derive(Debug, Args)]
struct ModelArgs {
    /// Model: a local directory in Hugging Face layout, a GGUF file, or a hub id
    /// (`bert-base-cased`, `org/name`) fetched into the Hugging Face cache (HF_HOME,
    /// HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE are honoured).
    #[arg(long, value_name = "DIR|FILE.gguf|HUB_ID")]
    model: String,
    /// Hub revision (branch, tag or commit) for a hub id.
    #[arg(long)]
    revision: Option<String>,
    /// Where to run: cpu, cuda, cuda:N, or auto (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]|auto")]
    device: DeviceChoice,
    /// Print nothing on stderr but errors.
    #[arg(long, short)]
    quiet: bool,
}

impl ModelArgs {
    /// Loads the model, first refusing it when one of `outputs` is one of its files.
    fn load(&self, outputs: &[&Path]) -> anyhow::Result<LoadedModel> {
        load_model(
            &self.model,
            self.revision.as_deref(),
            self.device,
            self.quiet,
            outputs,
        )
    }
}

/// Finds, downloads if needed, and loads a model; says what was loaded unless `quiet`.
/// Refuses, before loading, a model one of whose files is one of `outputs`.
fn load_model(
    spec: &str,
    revision: Option<&str>,
    device: DeviceChoice,
    quiet: bool,
    outputs: &[&Path],
) -> anyhow::Result<LoadedModel> {
    let source = ModelSource::parse(spec, revision)?;
    let device = device.open()?;
    let files = ModelFiles::locate(&source)?;
    let model_paths = files.paths();
    for out in outputs {
        output::refuse_inputs(out, &model_paths)?;
    }
    let lm = LoadedModel::load(files, candle_core::DType::F32, &device)
        .with_context(|| format!("loading model {source}"))?;
    if !quiet {
        eprintln!(
            "kn: model {source}: {} layers × {} neurons, vocabulary {}, on {}",
            lm.config.num_hidden_layers,
            lm.config.intermediate_size,
            lm.config.vocab_size,
            device_name(&device)
        );
    }
    Ok(lm)
}

fn device_name(device: &candle_core::Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

/// Opens `--out`: stdout for `-`; an existing file is appended to with `append`, replaced
/// with `force`, and refused otherwise (`resumable`: the command has `--resume`, which
/// the message then offers).
fn open_output(
    path: &Path,
    append: bool,
    force: bool,
    resumable: bool,
) -> anyhow::Result<Box<dyn Write>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::stdout().lock()));
    }
    if !append && !force && path.exists() {
        let resume = if resumable {
            "use --resume to continue it, or "
        } else {
            "use "
        };
        bail!(
            "{}: exists; {resume}--force to overwrite it",
            path.display()
        );
    }
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .with_context(|| format!("{}: cannot open for writing", path.display()))?;
    Ok(Box::new(file))
}

/// Refuses, before any long work (loading a model), an `--out` that cannot be written:
/// its folder missing or not a folder, or the file not creatable there. A file created by
/// the check is removed again.
fn check_output(path: &Path) -> anyhow::Result<()> {
    if path == Path::new("-") {
        return Ok(());
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        bail!(
            "{}: cannot write it: the folder {} does not exist (or is not a folder)",
            path.display(),
            folder.display()
        );
    }
    let existed = path.exists();
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open for writing", path.display()))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Claims `out` for the whole run, before anything is opened for writing: refused when
/// it is one of `inputs`, locked against other kn runs on it (the lock is held until
/// the returned value is dropped), and cleaned of what killed runs left beside it.
/// `None` for stdout.
fn claim_output(
    out: &Path,
    inputs: &[PathBuf],
    quiet: bool,
) -> anyhow::Result<Option<output::OutputLock>> {
    // An output whose folder is missing can be no input, and cannot be written: the
    // command's own check says so in its words.
    if output::is_stdout(out) || output::resolve(out).is_err() {
        return Ok(None);
    }
    output::refuse_inputs(out, inputs)?;
    let lock = output::OutputLock::acquire(out)?;
    for note in output::recover_leftovers(out)? {
        if !quiet {
            eprintln!("kn: {note}");
        }
    }
    Ok(Some(lock))
}

/// Prints a per-line error as ripgrep does: once, prefixed, on stderr.
fn report(error: &Error) {
    eprintln!("kn: {error}");
}

/// What a subcommand run ended with.
enum Outcome {
    /// Everything was processed.
    Clean,
    /// Some input lines failed (each already reported).
    Failed(usize),
}

/// Parses the command line, runs it, prints any error once and maps it to an exit code:
/// 0 success (also when stdout is a closed pipe), 1 errors, 2 usage errors.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Attribute(args) => attribute::run(args),
        Command::Refine(args) => attribute::refine(args),
        Command::Predict(args) => predict::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Edit(args) => edit::run(args),
        Command::Report(args) => report::run(args),
        Command::Pararel(args) => pararel::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Completions(args) => generate::completions(args),
        Command::Man(args) => generate::man(args),
    };
    match outcome {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Failed(n)) => {
            eprintln!("kn: {n} input line(s) could not be processed (see above)");
            ExitCode::from(1)
        }
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kn: {}", message(&err));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, `: `-separated as `{:#}` writes them, but without a cause
/// whose text the message already holds (kn's own errors print their source).
fn message(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let err = anyhow::Error::from(crate::error::Error::io("out.jsonl", io))
            .context("writing the report");
        let text = super::message(&err);
        assert_eq!(text.matches("os error 28").count(), 1, "{text}");
        assert!(
            text.starts_with("writing the report: out.jsonl: "),
            "{text}"
        );
    }

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
