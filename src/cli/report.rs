//! `kn report`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::Outcome;
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

/// Creates `dir`, or accepts an empty one (or any, with `force`).
fn prepare_out(dir: &Path, force: bool) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{}: exists and is not a directory", dir.display());
        }
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))?;
        if !force && entries.next().is_some() {
            bail!(
                "{}: exists and is not empty; use --force to write the report into it",
                dir.display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))
}

pub(super) fn run(args: ReportArgs) -> anyhow::Result<Outcome> {
    let inputs = Inputs {
        neurons: args.neurons,
        baseline: args.baseline,
        probe: args.probe,
        edit_reports: args.edit_report,
    };
    let format = match args.format {
        FormatArg::Png => Format::Png,
        FormatArg::Svg => Format::Svg,
    };
    // Every input is read and checked before --out is touched: a refused input leaves
    // no half-made report behind.
    let mut report = report::build(&inputs, args.layers.map(|n| n as usize))?;
    prepare_out(&args.out, args.force)?;
    let written = report::write(&mut report, &args.out, format)?;
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
