//! `kn merge`: shards of one `kn attribute` run into one file, checked (see
//! [`crate::attribution::merge`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::{claim_output, Outcome};
use crate::attribution::merge::merge;
use crate::data::output::{self, PartialFile};

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
    let _lock = claim_output(&args.out, &args.inputs, args.quiet)?;
    let summary = if output::is_stdout(&args.out) {
        let mut stdout = std::io::stdout().lock();
        merge(&args.inputs, &mut stdout, &args.out)?
    } else {
        if args.out.exists() && !args.force {
            bail!(
                "{}: exists; use --force to overwrite it",
                args.out.display()
            );
        }
        // Written beside --out and renamed into place when complete, so a refused or
        // failed merge leaves no output that looks whole.
        let partial = PartialFile::create(&args.out)
            .with_context(|| format!("{}: cannot open for writing", args.out.display()))?;
        let mut writer = std::io::BufWriter::new(partial.file());
        let summary = merge(&args.inputs, &mut writer, &args.out)?;
        writer
            .flush()
            .with_context(|| format!("{}: cannot write", args.out.display()))?;
        drop(writer);
        partial.commit()?;
        summary
    };
    if !args.quiet {
        eprintln!(
            "kn: merged {} file(s): {} records written, {} identical duplicate(s) dropped",
            summary.files, summary.written, summary.duplicates
        );
    }
    Ok(Outcome::Clean)
}
