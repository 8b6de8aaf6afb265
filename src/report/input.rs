//! The inputs of `kn report`: `kn attribute` / `kn refine` records, `kn probe` records
//! and `kn edit --report` files. Several inputs of a kind merge (shards of one run);
//! outputs of different models or parameters are refused, naming what differs.
//!
//! The probe and edit formats are read with their producers' types
//! ([`crate::probe::ProbeRecord`], [`crate::edit::record::EditReport`]): one format, one
//! definition.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::attribution::record::{comparable_params, FactRecord, Method, ModelInfo};
use crate::data::jsonl::{differences, JsonlInput, Origin};
pub use crate::edit::record::EditReport;
use crate::error::{Error, Result};
pub use crate::probe::{ControlKind, ProbeMode, ProbeRecord};

/// A record and where it came from.
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// Its file and line.
    pub origin: Origin,
    /// The record.
    pub record: T,
}

/// Holds the model of the first input read and refuses any later input made with
/// another. Models are the same when their weights, configuration and tokenizer are
/// ([`ModelInfo::difference`]): the same directory may be spelled differently by two
/// commands.
#[derive(Debug, Default)]
pub struct SameModel {
    first: Option<(Origin, ModelInfo)>,
}

impl SameModel {
    /// Accepts `model` if it is the first one or has the first one's weights.
    pub fn check(&mut self, here: &Origin, model: &ModelInfo) -> Result<()> {
        let Some((there, first)) = &self.first else {
            self.first = Some((here.clone(), model.clone()));
            return Ok(());
        };
        match model.difference(first) {
            None => Ok(()),
            Some(difference) => Err(here.error(format!(
                "made with another model than {there}: {difference}; a report puts together \
                 outputs of one model only"
            ))),
        }
    }

    /// The model of the first input, once one was read.
    pub fn model(&self) -> Option<&ModelInfo> {
        self.first.as_ref().map(|(_, m)| m)
    }
}

/// Holds the first parameters seen and refuses different ones, naming the fields.
#[derive(Debug, Default)]
struct SameParams {
    first: Option<(Origin, Value)>,
}

impl SameParams {
    /// `note` says which differences are allowed.
    fn check(&mut self, here: &Origin, params: Value, note: &str) -> Result<()> {
        let Some((there, first)) = &self.first else {
            self.first = Some((here.clone(), params));
            return Ok(());
        };
        if *first == params {
            return Ok(());
        }
        Err(here.error(format!(
            "made with other parameters than {there}: {}; {note}",
            differences(&params, first)
        )))
    }
}

const ONE_RUN: &str = "a report merges only shards of one run";

/// Reads the lines of `path` as `T`; the first bad line ends the reading (a report of
/// part of the input would be silently wrong).
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, kind: &str) -> Result<Vec<Located<T>>> {
    let mut input = JsonlInput::open(path)?;
    let mut out = Vec::new();
    while let Some(item) = input.next() {
        let (line, text) = item?;
        let record = serde_json::from_str(&text)
            .map_err(|e| input.error(line, format!("not a {kind} record: {e}")))?;
        out.push(Located {
            origin: Origin {
                path: input.path().to_path_buf(),
                line: Some(line),
            },
            record,
        });
    }
    Ok(out)
}

/// Refuses a second record with the same id (an input given twice, overlapping shards).
#[derive(Debug, Default)]
struct UniqueIds(HashMap<String, Origin>);

impl UniqueIds {
    fn check(&mut self, here: &Origin, id: &Value, what: &str) -> Result<()> {
        match self.0.insert(id.to_string(), here.clone()) {
            Some(there) => Err(here.error(format!(
                "{what} id {id} is also at {there}: is an input given twice, or do two shards \
                 overlap?"
            ))),
            None => Ok(()),
        }
    }
}

/// Reads and merges `kn attribute` / `kn refine` outputs: one model, one set of
/// parameters, each fact once.
pub fn read_neurons(paths: &[PathBuf], model: &mut SameModel) -> Result<Vec<Located<FactRecord>>> {
    let mut params = SameParams::default();
    let mut ids = UniqueIds::default();
    let mut all = Vec::new();
    for path in paths {
        for located in read_jsonl::<FactRecord>(path, "kn attribute")? {
            let (here, record) = (&located.origin, &located.record);
            model.check(here, &record.model)?;
            params.check(here, comparable_params(&record.params), ONE_RUN)?;
            ids.check(here, &record.id, "fact")?;
            all.push(located);
        }
    }
    if all.is_empty() {
        return Err(Error::InputFile {
            path: paths.first().cloned().unwrap_or_default(),
            reason: "no kn attribute records: nothing to report".into(),
        });
    }
    Ok(all)
}

/// One probe run of a report: the neurons' method, the mode and the control. Shards of
/// a run merge; a report holds several runs (suppress and amplify, random and
/// other-relation controls, knowledge neurons and the activation baseline's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRun {
    /// How the probed neurons were found.
    pub method: Method,
    /// Suppress or amplify.
    pub mode: ProbeMode,
    /// The control neurons.
    pub control: ControlKind,
}

impl ProbeRun {
    /// The run of a record, from its parameters (records made before probes recorded
    /// the method probed knowledge neurons).
    pub fn of(record: &ProbeRecord) -> Self {
        Self {
            method: record.params.method.unwrap_or(Method::IntegratedGradients),
            mode: record.params.mode,
            control: record.params.control,
        }
    }

    /// Report order: knowledge neurons before the baseline, suppress before amplify,
    /// random before other-relation controls.
    fn order(&self) -> (u8, ProbeMode, ControlKind) {
        let method = match self.method {
            Method::IntegratedGradients => 0,
            Method::Activation => 1,
        };
        (method, self.mode, self.control)
    }
}

/// Reads `kn probe` outputs and groups them into runs ([`ProbeRun`]), in report order.
/// Within a run, parameters must be equal and ids unique; across runs only the mode,
/// factor, control and neurons may differ; the model must be the neurons' everywhere.
pub fn read_probes(
    paths: &[PathBuf],
    model: &mut SameModel,
) -> Result<Vec<(ProbeRun, Vec<Located<ProbeRecord>>)>> {
    let mut runs: Vec<(ProbeRun, Vec<Located<ProbeRecord>>)> = Vec::new();
    let mut params: Vec<(ProbeRun, SameParams, UniqueIds)> = Vec::new();
    let mut shared = SameParams::default();
    for path in paths {
        for located in read_jsonl::<ProbeRecord>(path, "kn probe")? {
            let (here, record) = (&located.origin, &located.record);
            model.check(here, &record.model)?;
            let run = ProbeRun::of(record);
            let value = serde_json::to_value(&record.params).unwrap_or_default();
            let index = match params.iter().position(|(r, _, _)| *r == run) {
                Some(i) => i,
                None => {
                    params.push((run, SameParams::default(), UniqueIds::default()));
                    params.len() - 1
                }
            };
            let (_, same, ids) = &mut params[index];
            same.check(here, value.clone(), ONE_RUN)?;
            let mut common = value;
            if let Value::Object(map) = &mut common {
                for key in ["mode", "factor", "control", "neurons_sha256", "method"] {
                    map.remove(key);
                }
            }
            shared.check(
                here,
                common,
                "probe runs may differ in mode, factor, control and neurons only",
            )?;
            ids.check(here, &record.id, &run_name(&run))?;
            match runs.iter_mut().find(|(r, _)| *r == run) {
                Some((_, records)) => records.push(located),
                None => runs.push((run, vec![located])),
            }
        }
    }
    runs.sort_by_key(|(run, _)| run.order());
    Ok(runs)
}

/// `suppress`, `amplify (other-relation control)`, `suppress (activation baseline)`, …
fn run_name(run: &ProbeRun) -> String {
    let mut parts = Vec::new();
    if run.control != ControlKind::Random {
        parts.push(format!("{} control", run.control.name()));
    }
    if run.method == Method::Activation {
        parts.push("activation baseline".to_string());
    }
    if parts.is_empty() {
        run.mode.name().to_string()
    } else {
        format!("{} ({})", run.mode.name(), parts.join(", "))
    }
}

/// Reads one `kn edit --report` file (`-` for stdin); its model must be the neurons'.
pub fn read_edit_report(path: &Path, model: &mut SameModel) -> Result<Located<EditReport>> {
    let stdin = path == Path::new("-");
    let shown = if stdin {
        PathBuf::from("<stdin>")
    } else {
        path.to_path_buf()
    };
    let text = if stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Error::io(&shown, e))?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?
    };
    let report: EditReport = serde_json::from_str(&text).map_err(|e| Error::Input {
        path: shown.clone(),
        line: e.line(),
        reason: format!("not a kn edit report: {e}"),
    })?;
    let origin = Origin {
        path: shown,
        line: None,
    };
    model.check(&origin, &report.model)?;
    Ok(Located {
        origin,
        record: report,
    })
}
