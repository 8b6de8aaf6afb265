//! `kn attribute` and `kn refine`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{check_output, claim_output, open_output, report, ModelArgs, Outcome};
use crate::attribution::ig::{IgOptions, Rule};
use crate::attribution::record::{FactRecord, Method, Precision};
use crate::attribution::refine::{reselect, Reselect};
use crate::attribution::run::{
    count_pending, prepare_resume, run_attribute, Progress, RunOptions, Shard,
};
use crate::attribution::{AttributeOptions, Attributor, EngineChoice};
use crate::data::jsonl::RECORD_LINE_LIMIT;
use crate::data::output::{self, PartialFile};
use crate::data::{JsonlInput, JsonlWriter, SeenIds};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MethodArg {
    /// Integrated gradients (the paper's method).
    Ig,
    /// Raw activation at the mask (the paper's baseline; default threshold 0.5).
    Activation,
}

#[derive(Debug, Args)]
pub(super) struct AttributeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL facts: {"id", "relation", "answer", "prompts": [...]}; `-` reads stdin.
    #[arg(long, value_name = "FILE|-")]
    fact: PathBuf,
    /// Output JSONL; `-` writes stdout.
    #[arg(long, default_value = "-", value_name = "FILE|-")]
    out: PathBuf,
    /// Scoring method.
    #[arg(long, value_enum, default_value = "ig")]
    method: MethodArg,
    /// Integrated-gradients points m.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Quadrature rule: left (the released code), right (the paper's formula), midpoint,
    /// gauss, gauss-kronrod (adaptive to --tolerance; --steps is not used) [default: left].
    #[arg(long)]
    rule: Option<Rule>,
    /// The accurate mode: adaptive Gauss–Kronrod per prompt and layer (implies
    /// --rule gauss-kronrod), adding points until every score's estimated integration
    /// error is below this fraction of the prompt's P(gold) [gauss-kronrod's default: 1e-3].
    #[arg(long, value_name = "FRACTION")]
    tolerance: Option<f64>,
    /// Coarse threshold t: keep neurons with score ≥ t × the prompt's max
    /// [default: 0.2 for ig, 0.5 for activation].
    #[arg(long)]
    threshold: Option<f64>,
    /// Refinement share p: keep neurons coarse in ≥ max(p × prompts, --min-prompts) prompts.
    #[arg(long, default_value_t = 0.7)]
    share: f64,
    /// Refinement floor in prompts.
    #[arg(long, default_value_t = 3)]
    min_prompts: usize,
    /// Also store neurons down to keep × max, so `kn refine` can lower the threshold to it.
    #[arg(long, default_value_t = 0.1)]
    keep: f64,
    /// Smaller records: no `kept` lists (keep = the threshold), about half the bytes;
    /// `kn refine` can then raise the threshold but not lower it.
    #[arg(long, conflicts_with = "keep")]
    compact: bool,
    /// At most this many integration points per batch (default: as many as fit in
    /// 160 MiB of cached activations; on the tensor engine, the points of all the fact's
    /// prompts together). Lower it to bound memory.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    chunk: Option<u64>,
    /// The engine's float type: f32 (vectorised), or f64 (about twice the time; scores
    /// agree with a float64 reference to ~1e-8 rather than ~1e-4). bf16 and f16 (tensor
    /// engine only): the weight products in 16 bits, everything else in f32, for GPUs'
    /// 16-bit matrix units; scores agree with f32's less closely (see docs/gpu.md).
    #[arg(long, default_value = "f32", value_name = "f32|f64|bf16|f16")]
    precision: Precision,
    /// Attribution engine: auto (tensor on CUDA, flat on the CPU), flat (kn's CPU
    /// kernels, the faster there), or tensor (candle ops on the device: what runs on a
    /// GPU, to check a GPU run against the CPU on your own facts).
    #[arg(long, default_value = "auto", value_name = "auto|flat|tensor")]
    engine: EngineChoice,
    /// Device memory in MiB the tensor engine's batches of integration points may take
    /// (default on CUDA: 8192; elsewhere the CPU's 160), the points of all the fact's
    /// prompts together. Out of memory, a batch is redone in halves.
    #[arg(long, value_name = "MiB", value_parser = clap::value_parser!(u64).range(1..))]
    gpu_memory: Option<u64>,
    /// Append to an existing --out, skipping facts already there (same parameters only).
    #[arg(long)]
    resume: bool,
    /// Overwrite an existing --out.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Only the K-th of N disjoint parts of the facts (1 ≤ K ≤ N), chosen by id.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Stop at the first bad fact.
    #[arg(long)]
    fail_fast: bool,
}

impl AttributeArgs {
    fn options(&self) -> anyhow::Result<AttributeOptions> {
        let method = match self.method {
            MethodArg::Ig => Method::IntegratedGradients,
            MethodArg::Activation => Method::Activation,
        };
        let mut options = AttributeOptions::paper(method);
        let rule = match (self.tolerance, self.rule) {
            (Some(t), _) if !(t > 0.0 && t < 1.0) => {
                bail!("--tolerance must be between 0 and 1 (exclusive), not {t}")
            }
            (Some(_), None | Some(Rule::GaussKronrod)) => Rule::GaussKronrod,
            (Some(_), Some(other)) => {
                bail!("--tolerance is for --rule gauss-kronrod (its adaptive points), not {other}")
            }
            (None, rule) => rule.unwrap_or(Rule::Left),
        };
        let kronrod = rule == Rule::GaussKronrod;
        options.ig = IgOptions {
            // Gauss–Kronrod's points per interval, as recorded.
            steps: if kronrod { 15 } else { self.steps as usize },
            rule,
            chunk: self.chunk.map(|c| c as usize),
            tolerance: kronrod.then(|| {
                self.tolerance
                    .unwrap_or(crate::attribution::ig::DEFAULT_TOLERANCE)
            }),
            budget: self.gpu_memory.map(|m| (m as usize) << 20),
        };
        options.engine = self.engine;
        if let Some(t) = self.threshold {
            options.threshold = t;
        }
        options.share = self.share;
        options.min_prompts = self.min_prompts;
        // Compact: nothing below the threshold is stored, and the records say so.
        options.keep = if self.compact {
            options.threshold
        } else {
            self.keep
        };
        options.precision = self.precision;
        for (name, value) in [
            ("--threshold", options.threshold),
            ("--share", options.share),
            ("--keep", options.keep),
        ] {
            if !(0.0..=1.0).contains(&value) {
                bail!("{name} must be between 0 and 1, not {value}");
            }
        }
        Ok(options)
    }
}

/// The tensor engine's batch budget on a CUDA device when `--gpu-memory` is not given:
/// fits any GPU kn is likely to meet (16 GB and up) beside bert-base's or a 1B decoder's
/// weights; a batch that does not fit is redone in halves.
const DEFAULT_GPU_MEMORY_MIB: usize = 8192;

/// An indicatif bar on stderr, drawn only on a terminal.
struct Bar(ProgressBar);

impl Bar {
    fn new(quiet: bool) -> Self {
        let target = if quiet || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {pos} facts  {per_sec}  {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Self(bar)
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} facts  {per_sec}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }

    fn advance(&self) {
        self.0.inc(1);
    }
}

pub(super) fn run(args: AttributeArgs) -> anyhow::Result<Outcome> {
    let options = args.options()?;
    if args.resume && args.out == Path::new("-") {
        bail!("--resume needs --out FILE (it cannot resume stdout)");
    }
    // Held to the end of the run: no other kn writes --out meanwhile.
    let _lock = claim_output(
        &args.out,
        std::slice::from_ref(&args.fact),
        args.model.quiet,
    )?;
    if !args.resume && !args.force && args.out.exists() {
        // Said before the model loads (minutes for a hub model), not after.
        open_output(&args.out, false, false, true)?;
    }
    check_output(&args.out)?;
    let input = JsonlInput::open(&args.fact)?;
    let lm = args.model.load(&[&args.out])?;
    let cuda = lm.model.device().is_cuda();
    let mut options = options;
    let tensor = match options.engine {
        EngineChoice::Auto => cuda,
        EngineChoice::Flat => false,
        EngineChoice::Tensor => true,
    };
    if !tensor && args.gpu_memory.is_some() {
        bail!("--gpu-memory sizes the tensor engine's batches; the flat engine runs here (--engine tensor to use it)");
    }
    if tensor && cuda && options.ig.budget.is_none() {
        options.ig.budget = Some(DEFAULT_GPU_MEMORY_MIB << 20);
    }
    let attributor = Attributor::new(lm, options)?;
    if !args.model.quiet {
        eprintln!(
            "kn: {} engine, {}",
            attributor.engine_name(),
            attributor.options().precision.name()
        );
    }
    let mut run_options = RunOptions {
        shard: args.shard,
        fail_fast: args.fail_fast,
        ..RunOptions::default()
    };
    if args.resume {
        run_options.done = prepare_resume(
            &args.out,
            &attributor.options().params(),
            attributor.model_info(),
        )?;
        if !args.model.quiet && !run_options.done.is_empty() {
            eprintln!(
                "kn: resuming {}: {} facts already done",
                args.out.display(),
                run_options.done.len()
            );
        }
    }
    let out = open_output(&args.out, args.resume, args.force, true)?;
    let mut out = JsonlWriter::new(out, &args.out).resumable();
    let bar = Bar::new(args.model.quiet);
    if let Some(total) = count_pending(&args.fact, &run_options) {
        bar.set_total(total);
    }
    let started = std::time::Instant::now();
    let summary = run_attribute(&attributor, input, &mut out, &run_options, &bar, &mut |e| {
        bar.0.suspend(|| report(e))
    })?;
    bar.0.finish_and_clear();
    if !args.model.quiet && summary.prompts > 0 {
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "kn: {} facts, {} prompts in {seconds:.1} s ({} s per prompt, model load excluded)",
            summary.written,
            summary.prompts,
            seconds_per_prompt(seconds / summary.prompts as f64)
        );
    }
    Ok(if summary.failed > 0 {
        Outcome::Failed(summary.failed)
    } else {
        Outcome::Clean
    })
}

/// Two decimals, or three significant digits below 0.1 s (small models take
/// milliseconds per prompt, which two decimals would print as 0.00).
fn seconds_per_prompt(seconds: f64) -> String {
    if seconds >= 0.1 || seconds <= 0.0 || !seconds.is_finite() {
        return format!("{seconds:.2}");
    }
    let decimals = (2 - seconds.log10().floor() as i32).clamp(2, 9) as usize;
    format!("{seconds:.decimals$}")
}

#[derive(Debug, Args)]
pub(super) struct RefineArgs {
    /// Records written by `kn attribute`; `-` reads stdin.
    #[arg(long, default_value = "-", value_name = "FILE|-")]
    input: PathBuf,
    /// Output JSONL; `-` writes stdout.
    #[arg(long, default_value = "-", value_name = "FILE|-")]
    out: PathBuf,
    /// New coarse threshold t (≥ the records' keep) [default: the records'].
    #[arg(long)]
    threshold: Option<f64>,
    /// New share p [default: the records'].
    #[arg(long)]
    share: Option<f64>,
    /// New floor in prompts [default: the records'].
    #[arg(long)]
    min_prompts: Option<usize>,
    /// The released code's adaptive p per relation (from --share or the records' p).
    #[arg(long)]
    adaptive: bool,
    /// Overwrite an existing --out.
    #[arg(long)]
    force: bool,
}

pub(super) fn refine(args: RefineArgs) -> anyhow::Result<Outcome> {
    let _lock = claim_output(&args.out, std::slice::from_ref(&args.input), true)?;
    if !args.force && !output::is_stdout(&args.out) && args.out.exists() {
        bail!(
            "{}: exists; use --force to overwrite it",
            args.out.display()
        );
    }
    let input = JsonlInput::open(&args.input)?.with_line_limit(RECORD_LINE_LIMIT);
    let mut records: Vec<FactRecord> = Vec::new();
    let mut seen = SeenIds::default();
    let mut lines = input;
    while let Some(item) = lines.next() {
        let (line, text) = item?;
        let record: FactRecord = lines.parse(line, &text)?;
        seen.check(&record.id, line)
            .map_err(|reason| lines.error(line, reason))?;
        records.push(record);
    }
    let how = Reselect {
        threshold: args.threshold,
        share: args.share,
        min_prompts: args.min_prompts,
        adaptive: args.adaptive,
    };
    let records = reselect(records, &how)?;
    if output::is_stdout(&args.out) {
        let mut out = JsonlWriter::new(std::io::stdout().lock(), "<stdout>");
        for record in &records {
            out.write(record)?;
        }
        return Ok(Outcome::Clean);
    }
    // Whole or not at all: a full disk leaves no half-written --out.
    let partial = PartialFile::create(&args.out)?;
    let mut out = JsonlWriter::new(std::io::BufWriter::new(partial.file()), &args.out);
    for record in &records {
        out.write(record)?;
    }
    drop(out);
    partial.commit()?;
    Ok(Outcome::Clean)
}

#[cfg(test)]
mod tests {
    use super::seconds_per_prompt;

    #[test]
    fn seconds_per_prompt_keeps_three_significant_digits_below_a_tenth() {
        assert_eq!(seconds_per_prompt(2.613), "2.61");
        assert_eq!(seconds_per_prompt(0.953), "0.95");
        assert_eq!(seconds_per_prompt(0.04912), "0.0491");
        assert_eq!(seconds_per_prompt(0.004912), "0.00491");
        assert_eq!(seconds_per_prompt(0.0), "0.00");
    }
}
