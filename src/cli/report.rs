//! `kn report`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::{claim_output, Outcome};
use crate::report::{self, Format, Inputs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FormatArg {
    /// Bitmap images.
    Png,
    /// Vector images.
    Svg,
}

#[derive(Debug, Args)]
pub(super) struct ReportArgs {
    /// `kn attribute` / `kn refine` records; several files (shards of one run) merge;
    /// `-` reads stdin.
    #[arg(long, required = true, num_args = 1.., value_name = "FILE|-")]
    neurons: Vec<PathBuf>,
    /// The activation baseline's records (`kn attribute --method activation`): its
    /// neuron statistics beside the knowledge neurons'.
    #[arg(long, num_args = 1.., value_name = "FILE|-")]
    baseline: Vec<PathBuf>,
    /// `kn probe` records: suppress and amplify runs, random and other-relation
    /// controls, of the knowledge neurons and of the baseline's.
    #[arg(long, num_args = 1.., value_name = "FILE|-")]
    probe: Vec<PathBuf>,
    /// `kn edit --report` files, one table row each.
    #[arg(long = "edit-report", num_args = 1.., value_name = "FILE|-")]
    edit_report: Vec<PathBuf>,
    /// Directory for report.md, report.json and the plots (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Image format of the plots.
    #[arg(long, value_enum, default_value = "png")]
    format: FormatArg,
    /// The model's number of layers [default: from the records' completeness entries,
    /// else the highest layer seen + 1].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    layers: Option<u64>,
    /// Write into a --out directory that is not empty (report files there are replaced).
    #[arg(long)]
    force: bool,
    /// Print nothing on stderr but errors.
    #[arg(long, short)]
    quiet: bool,
}

/// What `--out` was before the run: what a failed run must put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Before {
    /// Missing: created by this run.
    Missing,
    /// An empty directory.
    Empty,
    /// A directory with files (`--force`): report files there are replaced.
    Full,
}

/// Creates `dir`, or accepts an empty one (or any, with `force`).
fn prepare_out(dir: &Path, force: bool) -> anyhow::Result<Before> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{}: exists and is not a directory", dir.display());
        }
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))?;
        if entries.next().is_none() {
            return Ok(Before::Empty);
        }
        if !force {
            bail!(
                "{}: exists and is not empty; use --force to write the report into it",
                dir.display()
            );
        }
        return Ok(Before::Full);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    Ok(Before::Missing)
}

/// After a failed write (a full disk), leaves `dir` as it was when it was missing or
/// empty, so that a rerun needs no `--force`. Report files written into a full directory
/// with `--force` stay: they were to replace files the user had given up.
fn undo_out(dir: &Path, before: Before) {
    match before {
        Before::Missing => {
            let _ = std::fs::remove_dir_all(dir);
        }
        Before::Empty => {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
        Before::Full => {}
    }
}

pub(super) fn run(args: ReportArgs) -> anyhow::Result<Outcome> {
    let inputs = Inputs {
        neurons: args.neurons,
        baseline: args.baseline,
        probe: args.probe,
        edit_reports: args.edit_report,
    };
    let all_inputs: Vec<PathBuf> = [
        &inputs.neurons,
        &inputs.baseline,
        &inputs.probe,
        &inputs.edit_reports,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    let _lock = claim_output(&args.out, &all_inputs, args.quiet)?;
    let format = match args.format {
        FormatArg::Png => Format::Png,
        FormatArg::Svg => Format::Svg,
    };
    // Every input is read and checked before --out is touched: a refused input leaves
    // no half-made report behind.
    let mut report = report::build(&inputs, args.layers.map(|n| n as usize))?;
    let before = prepare_out(&args.out, args.force)?;
    let written = match report::write(&mut report, &args.out, format) {
        Ok(written) => written,
        Err(e) => {
            undo_out(&args.out, before);
            return Err(e.into());
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(report::format::summary(&report).as_bytes())?;
    stdout.flush()?;
    if !args.quiet {
        eprintln!(
            "kn: wrote {} files into {} (open report.md)",
            written.len(),
            args.out.display()
        );
    }
    Ok(Outcome::Clean)
}
