//! `kn merge`: shards of one `kn attribute` run into one file, checked (see
//! [`crate::attribution::merge`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::Outcome;
use crate::attribution::merge::merge;

#[derive(Debug, Args)]
pub(super) struct MergeArgs {
    /// `kn attribute` (or `kn refine`) outputs of one run: the shards, in any order.
    #[arg(required = true, value_name = "SHARD")]
    inputs: Vec<PathBuf>,
    /// Output JSONL; `-` writes stdout. A file is written whole or not at all.
    #[arg(long, default_value = "-", value_name = "FILE|-")]
    out: PathBuf,
    /// Overwrite an existing --out.
    #[arg(long)]
    force: bool,
    /// Print nothing on stderr but errors.
    #[arg(long, short)]
    quiet: bool,
}

pub(super) fn run(args: MergeArgs) -> anyhow::Result<Outcome> {
    let summary = if args.out == Path::new("-") {
        let mut stdout = std::io::stdout().lock();
        merge(&args.inputs, &mut stdout, &args.out)?
    } else {
        if args.inputs.iter().any(|i| same_file(i, &args.out)) {
            bail!(
                "{}: is also an input; write the merge elsewhere",
                args.out.display()
            );
        }
        if args.out.exists() && !args.force {
            bail!(
                "{}: exists; use --force to overwrite it",
                args.out.display()
            );
        }
        // Written beside --out and renamed into place when complete, so a refused or
        // failed merge leaves no output that looks whole.
        let partial = partial_path(&args.out);
        let result = (|| -> anyhow::Result<_> {
            let file = std::fs::File::create(&partial)
                .with_context(|| format!("{}: cannot open for writing", args.out.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            let summary = merge(&args.inputs, &mut writer, &args.out)?;
            let file = writer
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("{}: cannot write", args.out.display()))?;
            file.sync_all()
                .with_context(|| format!("{}: cannot write", args.out.display()))?;
            std::fs::rename(&partial, &args.out)
                .with_context(|| format!("{}: cannot write", args.out.display()))?;
            Ok(summary)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result?
    };
    if !args.quiet {
        eprintln!(
            "kn: merged {} file(s): {} records written, {} identical duplicate(s) dropped",
            summary.files, summary.written, summary.duplicates
        );
    }
    Ok(Outcome::Clean)
}

/// `.NAME.kn-partial-PID` beside `out`.
fn partial_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merge".into());
    out.with_file_name(format!(".{name}.kn-partial-{}", std::process::id()))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
