//! `kn edit`: update facts, erase relations, or revert an edited model.

use std::io::{BufReader, Cursor, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::{claim_output, load_model, report, Outcome};
use crate::attribution::model_info;
use crate::attribution::run::fact_id;
use crate::attribution::NeuronsFile;
use crate::data::output::write_whole;
use crate::data::{JsonlInput, LineErrors, SeenIds};
use crate::edit::eval::{
    anchor_facts, build_report, encode_held_out, held_out_of, read_eval_facts, split_holdout,
    update_each_records, EditedFact, EvalFact, FactPrompts, ReportInputs,
};
use crate::edit::record::{
    EditReport, EditedMetrics, EditsFile, GroupMetrics, InputRecord, Operation, SourceRecord,
};
use crate::edit::records::parse_update;
use crate::edit::save::{revert, storage_dtype, write_edited_model};
use crate::edit::solve::{AnchorPool, SolveOptions};
use crate::edit::{
    apply_slots, plan_erase, plan_update_excluding, EditPlan, EraseOptions, EraseValue,
    UpdateOptions, UpdateRequest, UpdateRule,
};
use crate::model::files::sha256_bytes;
use crate::model::{DeviceChoice, LoadedModel};
use crate::predict::encode_prompts;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuleArg {
    /// The paper: λ1 = λ̂1·‖v‖/‖E_old‖, λ2 = λ̂2·‖v‖/‖E_new‖ (λ̂1 = 1, λ̂2 = 8).
    Scaled,
    /// EleutherAI's library: v − f·E_old + f·E_new (f = 2).
    Fixed,
    /// The smallest change of the fact's value slots that makes the new answer win on its
    /// prompts while other facts' outputs stay (the --solve-* knobs).
    Solve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EditControlArg {
    /// As many random neurons in the same layers as the fact's own, none of them.
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ValueArg {
    /// Zero.
    Zero,
    /// The [UNK] token's embedding.
    Unk,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("operation").required(true).args(["update", "erase", "revert"]))]
pub(super) struct EditArgs {
    /// Model to edit: a local directory or a hub id.
    #[arg(long, value_name = "DIR|HUB_ID", required_unless_present = "revert")]
    model: Option<String>,
    /// Hub revision for a hub id.
    #[arg(long)]
    revision: Option<String>,
    /// Where to run the evaluation: cpu, cuda, cuda:N, or auto.
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]|auto")]
    device: DeviceChoice,
    /// Knowledge neurons: `kn attribute` output; `-` reads stdin.
    #[arg(long, value_name = "FILE|-", required_unless_present = "revert")]
    neurons: Option<PathBuf>,
    /// Facts to update (JSONL): the neurons file's ids with "new_answer" (and optionally
    /// "answer", "relation", "prompts", "paraphrases", "locality"), or CounterFact or
    /// ZsRE records, one a line.
    #[arg(long, value_name = "FILE|-")]
    update: Option<PathBuf>,
    /// Relations to erase, comma-separated.
    #[arg(long, value_name = "RELATION[,…]", value_delimiter = ',')]
    erase: Vec<String>,
    /// Restore the model an edited directory was made from (into --out).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "neurons", "dry_run", "eval"])]
    revert: Option<PathBuf>,
    /// The edited model directory to write.
    #[arg(long, value_name = "DIR", required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// Edit in memory only: measure, write nothing but --report.
    #[arg(long)]
    dry_run: bool,
    /// Replace an existing --out directory or --report file.
    #[arg(long)]
    force: bool,
    /// Update rule.
    #[arg(long, value_enum, default_value = "scaled")]
    rule: RuleArg,
    /// λ̂1 of the scaled rule.
    #[arg(long, default_value_t = 1.0)]
    lambda_old: f64,
    /// λ̂2 of the scaled rule.
    #[arg(long, default_value_t = 8.0)]
    lambda_new: f64,
    /// f of the fixed rule.
    #[arg(long, default_value_t = 2.0)]
    fixed_factor: f64,
    /// Solve: most Adam steps per fact.
    #[arg(long, default_value_t = SolveOptions::default().steps, value_name = "N")]
    solve_steps: usize,
    /// Solve: Adam's first step, as a fraction of the layer's FFN output size.
    #[arg(long, default_value_t = SolveOptions::default().learning_rate, value_name = "X")]
    solve_rate: f64,
    /// Solve: each step is the last one's times this (small changes are tried first).
    #[arg(long, default_value_t = SolveOptions::default().growth, value_name = "X")]
    solve_growth: f64,
    /// Solve: stop once the new answer has this probability on every edit prompt.
    #[arg(long, default_value_t = SolveOptions::default().target, value_name = "P")]
    solve_target: f64,
    /// Solve: weight of the anchors' KL divergence (other facts' outputs kept).
    #[arg(long, default_value_t = SolveOptions::default().locality, value_name = "W")]
    solve_locality: f64,
    /// Solve: weight of the change's relative squared size.
    #[arg(long, default_value_t = SolveOptions::default().size, value_name = "W")]
    solve_size: f64,
    /// Solve: how many other facts' prompts are held to their outputs (one prompt a fact).
    #[arg(long, default_value_t = SolveOptions::default().anchors, value_name = "N")]
    solve_anchors: usize,
    /// Solve: facts (JSONL with relation and prompts) to draw the anchors from, instead
    /// of the --neurons file's; facts and prompts of --eval are never anchors.
    #[arg(long, value_name = "FILE")]
    anchors: Option<PathBuf>,
    /// Leave out neurons held by more than this share of the relation's facts.
    #[arg(long, default_value_t = 0.1)]
    max_relation_share: f64,
    /// Edit a fact only if the model's top-1 is its answer on at least this share of its prompts.
    #[arg(long, default_value_t = 0.5)]
    min_correct: f64,
    /// Update each fact alone, from the unedited model (the paper's protocol), and pool
    /// the metrics over the edits; needs --dry-run.
    #[arg(long, requires = "update", requires = "dry_run")]
    each: bool,
    /// The control of an update: edit as many random neurons, in the same layers, as
    /// each fact's own (drawn from --seed and the fact's id, as `kn probe` draws them).
    #[arg(long, value_enum, requires = "update")]
    control: Option<EditControlArg>,
    /// Hold each updated fact's last K prompts (in the order its line, or else its
    /// neurons record, lists them) out of the edit and score them as paraphrases
    /// (generalization). Every fact needs more than K prompts.
    #[arg(long, value_name = "K", default_value_t = 0, requires = "update")]
    holdout: usize,
    /// Seed of the --control draw.
    #[arg(long, default_value_t = 0, requires = "control")]
    seed: u64,
    /// Erase this many of each relation's most frequent refined neurons.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// What erased value slots become.
    #[arg(long, value_enum, default_value = "zero")]
    value: ValueArg,
    /// Facts (JSONL with relation, answer, prompts) to measure accuracy and perplexity
    /// on, before and after, in the edited relations and the others.
    #[arg(long, value_name = "FILE")]
    eval: Option<PathBuf>,
    /// Write the metrics as JSON to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Print nothing on stderr but errors.
    #[arg(long, short)]
    quiet: bool,
}

pub(super) fn run(args: EditArgs) -> anyhow::Result<Outcome> {
    if args.out.is_some() && args.out == args.report {
        bail!("--out and --report name the same path");
    }
    // Outputs are claimed (never an input, one writer) for the whole run, and existing
    // ones refused, before any slow work.
    let inputs: Vec<PathBuf> = [
        &args.neurons,
        &args.update,
        &args.eval,
        &args.revert,
        &args.anchors,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    let outputs: Vec<&Path> = [
        args.out.as_deref().filter(|_| !args.dry_run),
        args.report.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut locks = Vec::new();
    for out in &outputs {
        locks.push(claim_output(out, &inputs, args.quiet)?);
    }
    if let Some(out) = args.out.as_deref().filter(|_| !args.dry_run) {
        if out.exists() && !out.is_dir() {
            bail!(
                "{}: exists and is not a directory; --out names the edited model's directory \
                 (remove the file, or choose another --out)",
                out.display()
            );
        }
    }
    if let Some(out) = &args.out {
        if out.exists() && !args.force {
            bail!(
                "{} already exists; pass --force to replace it",
                out.display()
            );
        }
    }
    if let Some(path) = &args.report {
        if path.exists() && !args.force {
            bail!("{} exists; pass --force to overwrite it", path.display());
        }
    }
    if let Some(dir) = &args.revert {
        let out = args.out.as_deref().context("--revert needs --out")?;
        let edits = revert(dir, out, args.force)?;
        if !args.quiet {
            eprintln!(
                "kn: restored {} value slot(s) of {} into {} (weights sha256 {})",
                edits.slots.len(),
                edits.source.model.source,
                out.display(),
                edits.restored_sha256
            );
        }
        return Ok(Outcome::Clean);
    }
    let neurons_path = args.neurons.as_deref().context("--neurons is required")?;
    if args.update.as_deref() == Some(Path::new("-")) && neurons_path == Path::new("-") {
        bail!("--neurons and --update cannot both read stdin");
    }
    let neurons = NeuronsFile::read(neurons_path)?;
    let update_bytes = args.update.as_deref().map(read_input).transpose()?;
    let spec = args.model.as_deref().context("--model is required")?;
    let lm = load_model(
        spec,
        args.revision.as_deref(),
        args.device,
        args.quiet,
        &outputs,
    )?;
    neurons.check_model(&lm.config)?;
    let model = model_info(&lm)?;
    let storage = storage_dtype(&lm.files, lm.architecture())?;
    let mut inputs = vec![InputRecord {
        role: "neurons".into(),
        path: neurons_path.display().to_string(),
        sha256: neurons.sha256.clone(),
    }];

    // Everything the run needs is read and checked before anything is written.
    let mut report_line = report;
    let mut errors = LineErrors::new(false, &mut report_line);
    let (plan, rule, value, edited) = match (&args.update, update_bytes) {
        (Some(path), Some(bytes)) => {
            inputs.push(InputRecord {
                role: "update".into(),
                path: path.display().to_string(),
                sha256: sha256_bytes(&bytes),
            });
            let requests = read_updates(&lm, &neurons, path, bytes, args.holdout, &mut errors)?;
            let rule = match args.rule {
                RuleArg::Scaled => UpdateRule::Scaled {
                    lambda_old: args.lambda_old,
                    lambda_new: args.lambda_new,
                },
                RuleArg::Fixed => UpdateRule::Fixed {
                    factor: args.fixed_factor,
                },
                RuleArg::Solve => UpdateRule::Solve(solve_options(&args)?),
            };
            let options = UpdateOptions {
                rule,
                max_relation_share: args.max_relation_share,
                min_correct: args.min_correct,
                random_control: args.control.map(|EditControlArg::Random| args.seed),
            };
            if errors.failed > 0 {
                bail!(
                    "{} line(s) of {} are not usable (see above); nothing was written",
                    errors.failed,
                    path.display()
                );
            }
            let eval = read_eval(&lm, args.eval.as_deref())?;
            let anchors = anchor_pool(&lm, &neurons, &args, &rule, eval.as_deref())?;
            if args.each {
                let mut outcome = update_each_records(
                    &lm,
                    &neurons,
                    &requests,
                    &options,
                    storage,
                    eval.as_deref(),
                    &anchors,
                    model,
                )?;
                outcome.report.holdout = args.holdout;
                if let Some(path) = &args.report {
                    let text = serde_json::to_string_pretty(&outcome.report)? + "\n";
                    write_whole(path, text.as_bytes())?;
                }
                if !args.quiet {
                    let plan = EditPlan {
                        slots: Vec::new(),
                        facts: outcome.facts,
                        relations: Vec::new(),
                        skipped: outcome.skipped,
                    };
                    let mut stderr = std::io::stderr().lock();
                    writeln!(
                        stderr,
                        "kn: update (rule {}{}), one fact at a time: {} fact(s) edited, {} \
                         skipped, {} value slot change(s) in all",
                        rule.name(),
                        if options.random_control.is_some() {
                            ", random neurons"
                        } else {
                            ""
                        },
                        plan.facts.len(),
                        plan.skipped.len(),
                        outcome.slot_changes
                    )?;
                    write_details(&mut stderr, &plan, &outcome.report)?;
                    write_per_fact(&mut stderr, &outcome.report)?;
                    writeln!(stderr, "kn: dry run: nothing written")?;
                }
                return Ok(Outcome::Clean);
            }
            let (requests, extra): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
            let plan =
                plan_update_excluding(&lm, &neurons, &requests, &options, storage, &anchors)?;
            let edited = edited_facts(&lm, &plan, &requests, &extra)?;
            (plan, Some(rule), None, edited)
        }
        _ => {
            let options = EraseOptions {
                top: args.top,
                value: match args.value {
                    ValueArg::Zero => EraseValue::Zero,
                    ValueArg::Unk => EraseValue::Unk,
                },
            };
            let plan = plan_erase(&lm, &neurons, &args.erase, &options, storage)?;
            (plan, None, Some(options.value), Vec::new())
        }
    };
    let eval = read_eval(&lm, args.eval.as_deref())?;
    if let Some(path) = &args.eval {
        inputs.push(InputRecord {
            role: "eval".into(),
            path: path.display().to_string(),
            sha256: crate::model::files::sha256_file(path)?,
        });
    }
    if let Some(path) = &args.anchors {
        inputs.push(InputRecord {
            role: "anchors".into(),
            path: path.display().to_string(),
            sha256: crate::model::files::sha256_file(path)?,
        });
    }

    let after = LoadedModel {
        model: apply_slots(&lm.model, &plan.slots)?,
        ..lm.clone()
    };
    let mut report_record = build_report(ReportInputs {
        before: &lm,
        after: &after,
        plan: &plan,
        rule,
        value,
        edited: &edited,
        holdout: args.holdout,
        eval: eval.as_deref(),
        model: model.clone(),
    })?;
    if args.control.is_some() {
        report_record.control = Some(crate::probe::ControlKind::Random);
    }
    if let Some(out) = args.out.as_deref().filter(|_| !args.dry_run) {
        let edits = EditsFile {
            kn_version: env!("CARGO_PKG_VERSION").to_string(),
            operation: report_record.operation,
            rule,
            value,
            source: SourceRecord {
                model,
                weights_file: lm
                    .files
                    .weights
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            },
            weights_file: String::new(),
            weights_sha256: String::new(),
            restored_sha256: String::new(),
            inputs,
            facts: plan.facts.clone(),
            relations: plan.relations.clone(),
            skipped: plan.skipped.clone(),
            slots: Vec::new(),
            previous_edits: None,
        };
        write_edited_model(&lm, out, &plan.slots, edits, args.force)
            .with_context(|| format!("writing the edited model to {}", out.display()))?;
    }
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&report_record)? + "\n";
        write_whole(path, text.as_bytes())?;
    }
    if !args.quiet {
        let mut stderr = std::io::stderr().lock();
        write_summary(
            &mut stderr,
            &plan,
            &report_record,
            args.out.as_deref(),
            args.dry_run,
        )?;
    }
    Ok(Outcome::Clean)
}

/// The solved rule's anchor candidates: --anchors, else the neurons file; never a fact
/// or prompt of the evaluation.
fn anchor_pool(
    lm: &LoadedModel,
    neurons: &NeuronsFile,
    args: &EditArgs,
    rule: &UpdateRule,
    eval: Option<&[EvalFact]>,
) -> anyhow::Result<AnchorPool> {
    if !matches!(rule, UpdateRule::Solve(_)) {
        if args.anchors.is_some() {
            bail!("--anchors is for --rule solve");
        }
        return Ok(AnchorPool::default());
    }
    let held_out = held_out_of(eval.unwrap_or_default());
    Ok(match &args.anchors {
        Some(path) => AnchorPool {
            facts: anchor_facts(&read_eval(lm, Some(path))?.unwrap_or_default()),
            held_out,
        },
        None => AnchorPool::from_neurons(lm, neurons, held_out)?,
    })
}

/// The solved rule's knobs, checked.
fn solve_options(args: &EditArgs) -> anyhow::Result<SolveOptions> {
    let options = SolveOptions {
        steps: args.solve_steps,
        learning_rate: args.solve_rate,
        growth: args.solve_growth,
        target: args.solve_target,
        locality: args.solve_locality,
        size: args.solve_size,
        anchors: args.solve_anchors,
    };
    if !(options.target > 0.0 && options.target < 1.0) {
        bail!("--solve-target must be a probability above 0 and below 1");
    }
    for (name, value) in [
        ("--solve-rate", options.learning_rate),
        ("--solve-locality", options.locality),
        ("--solve-size", options.size),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            bail!("{name} must be a finite number ≥ 0");
        }
    }
    if options.learning_rate == 0.0 {
        bail!("--solve-rate must be above 0");
    }
    if !(options.growth.is_finite() && (1.0..=2.0).contains(&options.growth)) {
        bail!("--solve-growth must be between 1 and 2");
    }
    Ok(options)
}

/// The --eval facts, every line checked (a bad line is reported and the run refused).
fn read_eval(lm: &LoadedModel, path: Option<&Path>) -> anyhow::Result<Option<Vec<EvalFact>>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let mut report_line = report;
    let mut errors = LineErrors::new(false, &mut report_line);
    let facts = read_eval_facts(lm, path, &mut errors)?;
    if errors.failed > 0 {
        bail!(
            "{} line(s) of {} are not usable (see above); nothing was written",
            errors.failed,
            path.display()
        );
    }
    Ok(Some(facts))
}

/// The bytes of a file, or of stdin for `-`.
fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(bytes)
}

/// Parses the --update file: every line (kn's own fields, or a CounterFact or ZsRE
/// record, [`crate::edit::records`]) must name a fact of the neurons file and a new
/// answer, both single tokens, with prompts the model takes (more than `holdout` of
/// them). Each request comes with its held-out prompts (then its record's paraphrases)
/// and its record's locality prompts.
fn read_updates<'a>(
    lm: &LoadedModel,
    neurons: &'a NeuronsFile,
    path: &Path,
    bytes: Vec<u8>,
    holdout: usize,
    errors: &mut LineErrors,
) -> anyhow::Result<Vec<(UpdateRequest<'a>, FactPrompts)>> {
    let mut input = JsonlInput::from_reader(path, Box::new(BufReader::new(Cursor::new(bytes))));
    let mut requests = Vec::new();
    let mut seen = SeenIds::default();
    while let Some((line, value)) = input.next_record::<serde_json::Value>(errors)? {
        let checked = parse_update(value)
            .and_then(|update| {
                seen.check(&fact_id(&update.fact, line), line)?;
                let fact = neurons.resolve(&update.fact, line)?;
                Ok((update, fact))
            })
            .map_err(|reason| input.error(line, reason))
            .and_then(|(update, mut fact)| {
                let mut held_out = split_holdout(&mut fact.prompts, holdout)
                    .map_err(|e| input.error(line, format!("fact {}: {e}", fact.id)))?;
                held_out.extend(update.paraphrases.iter().cloned());
                let locality: Vec<String> =
                    update.locality.iter().map(|l| l.prompt.clone()).collect();
                let new_answer = update
                    .new_answer
                    .clone()
                    .ok_or_else(|| input.error(line, "has no \"new_answer\""))?;
                lm.tokenizer
                    .answer_id(&fact.answer)
                    .and_then(|_| lm.tokenizer.answer_id(&new_answer))
                    .and_then(|_| encode_prompts(lm, &fact.prompts))
                    .and_then(|_| encode_held_out(lm, &held_out))
                    .and_then(|_| encode_held_out(lm, &locality))
                    .map_err(|e| input.error(line, e))?;
                Ok((
                    UpdateRequest { fact, new_answer },
                    FactPrompts { held_out, locality },
                ))
            });
        match checked {
            Ok(request) => requests.push(request),
            Err(e) => errors.fail(e)?,
        }
    }
    Ok(requests)
}

/// The edited facts, tokenized, for the report.
fn edited_facts(
    lm: &LoadedModel,
    plan: &EditPlan,
    requests: &[UpdateRequest],
    extra: &[FactPrompts],
) -> anyhow::Result<Vec<EditedFact>> {
    plan.facts
        .iter()
        .map(|edit| {
            let at = requests
                .iter()
                .position(|r| r.fact.id == edit.id)
                .context("an edited fact that was not asked for")?;
            Ok(EditedFact {
                prompts: encode_prompts(lm, &requests[at].fact.prompts)?,
                held_out: encode_held_out(lm, &extra[at].held_out)?,
                locality: encode_held_out(lm, &extra[at].locality)?,
                old_id: lm.tokenizer.answer_id(&edit.answer)?,
                new_id: lm.tokenizer.answer_id(&edit.new_answer)?,
            })
        })
        .collect()
}

/// What was done and measured, readably.
fn write_summary(
    out: &mut impl Write,
    plan: &EditPlan,
    report: &EditReport,
    dir: Option<&Path>,
    dry_run: bool,
) -> std::io::Result<()> {
    match report.operation {
        Operation::Update => writeln!(
            out,
            "kn: update (rule {}): {} fact(s) edited, {} skipped, {} value slot(s) changed",
            report.rule.as_deref().unwrap_or("?"),
            plan.facts.len(),
            plan.skipped.len(),
            plan.slots.len()
        )?,
        Operation::Erase => writeln!(
            out,
            "kn: erase {}: {} value slot(s) set to {}",
            report.relations.join(", "),
            plan.slots.len(),
            match report.value {
                Some(EraseValue::Unk) => "the [UNK] embedding",
                _ => "zero",
            }
        )?,
    }
    write_details(out, plan, report)?;
    match dir {
        Some(dir) if !dry_run => writeln!(out, "kn: wrote {}", dir.display()),
        _ => writeln!(out, "kn: dry run: nothing written"),
    }
}

/// The skipped facts and the metrics tables.
fn write_details(
    out: &mut impl Write,
    plan: &EditPlan,
    report: &EditReport,
) -> std::io::Result<()> {
    for skipped in &plan.skipped {
        writeln!(out, "kn:   skipped {}: {}", skipped.id, skipped.reason)?;
    }
    if let Some(e) = &report.edited_facts {
        writeln!(
            out,
            "edited facts ({} facts, {} prompts)   success  success@5  change rate    MRR",
            e.facts, e.prompts
        )?;
        for (name, m) in [("before", &e.before), ("after", &e.after)] {
            writeln!(
                out,
                "  {:<34} {:>6.1}%  {:>8.1}%  {:>10.1}%  {:>6.3}",
                name,
                100.0 * m.success,
                100.0 * m.success_at_5,
                100.0 * m.change_rate,
                m.mrr
            )?;
        }
        writeln!(out, "{}", editors_line(e))?;
    }
    if report.same_relation.is_some() || report.other_relation.is_some() {
        writeln!(
            out,
            "{:<22} {:>6} {:>8}   accuracy before → after   perplexity before → after   \
             locality   mean KL",
            "evaluation facts", "facts", "prompts"
        )?;
        let row = |out: &mut dyn Write, name: &str, g: &GroupMetrics| {
            writeln!(
                out,
                "  {:<20} {:>6} {:>8}   {:>7.1}% → {:>6.1}%        {:>9.3} → {:>9.3}   {:>7}  {:>8}",
                name,
                g.facts,
                g.prompts,
                100.0 * g.before.accuracy,
                100.0 * g.after.accuracy,
                g.before.perplexity,
                g.after.perplexity,
                g.locality
                    .map_or("-".into(), |l| format!("{:.1}%", 100.0 * l)),
                g.kl.map_or("-".into(), |k| format!("{k:.4}"))
            )
        };
        let same_name = match report.operation {
            Operation::Update => "same relation",
            Operation::Erase => "erased relations",
        };
        if let Some(same) = &report.same_relation {
            row(out, same_name, same)?;
        }
        if let Some(other) = &report.other_relation {
            row(out, "other relations", other)?;
        }
        for g in &report.per_relation {
            row(out, g.relation.as_deref().unwrap_or("(none)"), g)?;
        }
    }
    Ok(())
}

/// The editors' names for the edited facts' metrics, on one line.
fn editors_line(e: &EditedMetrics) -> String {
    let mut line = format!(
        "  reliability (efficacy) {}",
        e.reliability
            .map_or("-".into(), |r| format!("{:.1}%", 100.0 * r))
    );
    match e.generalization {
        Some(g) => line.push_str(&format!(
            ", generalization (paraphrase) {:.1}% on {} held-out prompt(s)",
            100.0 * g,
            e.held_out_prompts
        )),
        None => line.push_str(", generalization: no held-out prompts (--holdout)"),
    }
    if let (Some(l), Some(kl)) = (e.record_locality, e.record_locality_kl) {
        line.push_str(&format!(
            ", record locality {:.1}% (mean KL {kl:.4}) on {} locality prompt(s)",
            100.0 * l,
            e.record_locality_prompts
        ));
    }
    line
}

/// With --each, every edited fact's own editors' metrics.
fn write_per_fact(out: &mut impl Write, report: &EditReport) -> std::io::Result<()> {
    if report.per_fact.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:>11} {:>14} {:>15} {:>9} {:>16} {:>9}",
        "per fact",
        "reliability",
        "generalization",
        "locality (same)",
        "KL (same)",
        "locality (other)",
        "KL (other)"
    )?;
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v));
    let kl = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    for f in &report.per_fact {
        let e = &f.edited_facts;
        let same = f.same_relation.as_ref();
        let other = f.other_relation.as_ref();
        writeln!(
            out,
            "  {:<18} {:>11} {:>14} {:>15} {:>9} {:>16} {:>9}",
            f.id.to_string(),
            pct(e.reliability),
            pct(e.generalization),
            pct(same.and_then(|g| g.locality)),
            kl(same.and_then(|g| g.kl)),
            pct(other.and_then(|g| g.locality)),
            kl(other.and_then(|g| g.kl))
        )?;
    }
    Ok(())
}
