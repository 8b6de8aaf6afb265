//! `kn predict`.

use std::path::PathBuf;

use clap::Args;

use super::{report, ModelArgs, Outcome};
use crate::data::{JsonlInput, JsonlWriter};
use crate::predict::{run_predict, PredictOptions};

#[derive(Debug, Args)]
pub(super) struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL prompts: {"prompt": "… [MASK] …"} or {"prompts": [...]}, optional "answer"
    /// and "id". `-` reads stdin.
    #[arg(long, default_value = "-", value_name = "FILE|-")]
    input: PathBuf,
    /// Number of predictions to list per prompt.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: u64,
    /// Stop at the first bad input line.
    #[arg(long)]
    fail_fast: bool,
    /// Prompts per padded batch, across input lines (1: one at a time; the numbers are
    /// the same to rounding). Output waits until a batch is full or the input ends.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
}

pub(super) fn run(args: PredictArgs) -> anyhow::Result<Outcome> {
    // Open the input first: a missing file is reported before a slow model load.
    let input = JsonlInput::open(&args.input)?;
    let lm = args.model.load(&[])?;
    let options = PredictOptions {
        top_k: args.top_k as usize,
        fail_fast: args.fail_fast,
        batch: args.batch as usize,
    };
    let stdout = std::io::stdout().lock();
    let mut out = JsonlWriter::new(stdout, "<stdout>");
    let summary = run_predict(&lm, input, &mut out, &options, &mut report)?;
    Ok(if summary.failed > 0 {
        Outcome::Failed(summary.failed)
    } else {
        Outcome::Clean
    })
}
