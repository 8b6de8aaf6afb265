//! `kn report`: the paper's analyses of knowledge neurons as tables, plots and JSON,
//! from kn's own outputs.
//!
//! [`build`] reads `kn attribute` / `kn refine` records (several files merge: shards of
//! one run), optionally `kn probe` records and `kn edit --report` files, refuses to mix
//! models or parameters, and computes every statistic ([`stats`]). [`write()`] draws the
//! plots ([`plot`]) and writes `report.md` and `report.json` ([`mod@format`]);
//! [`format::summary`] is the short text `kn report` prints.
//!
//! # Number of layers
//!
//! Records do not carry the model's layer count, and the paper's Figure 3 needs every
//! layer on its axis, empty ones too. It is, in this order: `--layers N`; else the
//! highest layer of the records' `completeness` entries + 1 (integrated-gradients
//! records have one entry per layer); else the highest layer of any stored neuron
//! (refined, coarse or kept) + 1, which may miss empty top layers.
//!
//! # Format of `report.json`
//!
//! ```json
//! {"kn_version":"0.1.0",
//!  "inputs":{"neurons":["kn.jsonl"],"probe":["suppress.jsonl"],"edit_reports":["edit.json"]},
//!  "model":{"source":"models/antiberty","weights_sha256":"…"},
//!  "params":{"method":"integrated-gradients","steps":20,"rule":"left","threshold":0.2,…},
//!  "facts":4,"relations":["a","b"],"layers":8,"layers_from":"completeness",
//!  "neurons_per_fact":{"overall":{"facts":4,"neurons":9,"mean":2.25,"median":2.0,"min":1,
//!                                 "max":4,"zero":0,"histogram":[0,1,2,0,1]},
//!                      "by_relation":[{"relation":"a","facts":2,…}]},
//!  "layer_distribution":{"overall":{"neurons":9,"counts":[0,…],"share":[0.0,…]},
//!                        "by_relation":[{"relation":"a","neurons":5,"counts":[…],"share":[…]}]},
//!  "shared_neurons":{"same_relation":{"pairs":2,"shared":3,"mean":1.5},
//!                    "different_relation":{"pairs":4,"shared":1,"mean":0.25},
//!                    "relations":["a","b"],"pairs":[[1,4],[4,1]],"shared":[[…]],"mean":[[…]]},
//!  "baseline":{"params":{"method":"activation",…},"facts":4,"neurons_per_fact":{…},
//!              "layer_distribution":{…},"shared_neurons":{…}},
//!  "probes":[{"name":"suppress","mode":"suppress","method":"integrated-gradients",
//!             "factor":0.0,"control":"random","facts":4,"skipped":0,
//!             "overall":{"prompts":10,"before":0.43,"after":0.31,"change":-0.28,
//!                        "control_prompts":10,"control_after":0.42,"control_change":-0.02},
//!             "by_relation":[{"relation":"a","facts":2,"skipped":0,"prompts":5,…}]}],
//!  "edits":[{"file":"edit.json", …the edit report's fields…}],
//!  "figures":[{"name":"layers","file":"layers.png","title":"…"}, …]}
//! ```
//!
//! `baseline` (with `--baseline`: the activation baseline's records) has the neuron
//! statistics of the paper's baseline. `probes` holds one entry per probe run: suppress or
//! amplify, of the knowledge neurons or of the baseline's (`method`), beside random or
//! another relation's neurons (`control`); `name` is its figure's (`suppress`,
//! `amplify-other-relation`, `suppress-activation`, …).
//!
//! Shares and changes are fractions (0.28, not 28%). A mean over nothing is `null`.
//! `change` is the paper's metric, (mean after − mean before) / mean before over the
//! prompts of a relation (or all of them); `control_change` the same with the control
//! neurons changed instead.

pub mod format;
pub mod input;
pub mod plot;
mod raster;
pub mod stats;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::attribution::record::{FactRecord, ModelInfo, Params};
use crate::error::{Error, Result};
use input::{EditReport, Located, SameModel};
pub use plot::{Figure, Format};
use stats::{Fact, LayerDistribution, PerFact, ProbeSummary, SharedNeurons};

/// The files a report reads (`-` is stdin, for one of them at most).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inputs {
    /// `kn attribute` / `kn refine` outputs (JSONL), merged.
    pub neurons: Vec<PathBuf>,
    /// The activation baseline's `kn attribute --method activation` outputs (JSONL),
    /// merged; absent from `report.json` when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline: Vec<PathBuf>,
    /// `kn probe` outputs (JSONL), grouped by mode.
    pub probe: Vec<PathBuf>,
    /// `kn edit --report` files (JSON), one table row each.
    pub edit_reports: Vec<PathBuf>,
}

/// Where the number of layers came from (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayersFrom {
    /// `--layers`.
    Option,
    /// The records' per-layer completeness entries.
    Completeness,
    /// The highest layer of a stored neuron.
    MaxLayer,
}

/// One `kn edit --report` file in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EditRow {
    /// The file.
    pub file: String,
    /// Its content.
    #[serde(flatten)]
    pub report: EditReport,
}

/// The neuron statistics of the activation baseline (`--baseline`), beside the
/// knowledge neurons' (the paper's 3.96 neurons per fact, 1.92 shared across relations).
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// Its records' parameters.
    pub params: Params,
    /// Facts in its records.
    pub facts: usize,
    /// Refined neurons per fact.
    pub neurons_per_fact: PerFact,
    /// Refined neurons over layers.
    pub layer_distribution: LayerDistribution,
    /// Neurons shared by fact pairs.
    pub shared_neurons: SharedNeurons,
}

/// Everything `report.json` holds (see the module documentation for its format).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The kn that made the report.
    pub kn_version: String,
    /// What was read.
    pub inputs: Inputs,
    /// The model of every input.
    pub model: ModelInfo,
    /// The neuron records' parameters (the first record's, for `kn refine --adaptive`
    /// output whose share differs per relation).
    pub params: Params,
    /// Facts in the neuron records.
    pub facts: usize,
    /// Their relations, sorted ([`stats::NO_RELATION`] for facts without one).
    pub relations: Vec<String>,
    /// The model's layers.
    pub layers: usize,
    /// Where that number came from.
    pub layers_from: LayersFrom,
    /// Refined neurons per fact.
    pub neurons_per_fact: PerFact,
    /// Refined neurons over layers (Figure 3).
    pub layer_distribution: LayerDistribution,
    /// Neurons shared by fact pairs.
    pub shared_neurons: SharedNeurons,
    /// The activation baseline's neuron statistics (`--baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// Probe runs (Figures 4 and 5): knowledge neurons before the baseline's, suppress
    /// before amplify, random before other-relation controls.
    pub probes: Vec<ProbeSummary>,
    /// Edit reports, in the order given.
    pub edits: Vec<EditRow>,
    /// The plots, once [`write()`] drew them.
    pub figures: Vec<Figure>,
}

/// Reads `inputs` and computes the report. `layers` is `--layers`.
pub fn build(inputs: &Inputs, layers: Option<usize>) -> Result<Report> {
    let stdin = inputs
        .neurons
        .iter()
        .chain(&inputs.baseline)
        .chain(&inputs.probe)
        .chain(&inputs.edit_reports)
        .filter(|p| *p == Path::new("-"))
        .count();
    if stdin > 1 {
        return Err(Error::InputFile {
            path: "-".into(),
            reason: "stdin can be read once: give `-` for one input only".into(),
        });
    }
    let mut model = SameModel::default();
    let records = input::read_neurons(&inputs.neurons, &mut model)?;
    let baseline = if inputs.baseline.is_empty() {
        None
    } else {
        let records = input::read_neurons(&inputs.baseline, &mut model)?;
        let facts: Vec<Fact> = records
            .iter()
            .map(|r| Fact::from_record(&r.record))
            .collect();
        Some((records, facts))
    };
    let probes = input::read_probes(&inputs.probe, &mut model)?;
    let edits = inputs
        .edit_reports
        .iter()
        .map(|p| input::read_edit_report(p, &mut model))
        .collect::<Result<Vec<_>>>()?;
    let (mut layers, layers_from) = layer_count(&records, layers)?;
    if let Some((baseline, _)) = &baseline {
        // Activation records have no completeness: their top layer may be above the
        // knowledge neurons' highest.
        layers = layers.max(
            layer_count(
                baseline,
                Some(layers).filter(|_| layers_from == LayersFrom::Option),
            )?
            .0,
        );
    }
    let facts: Vec<Fact> = records
        .iter()
        .map(|r| Fact::from_record(&r.record))
        .collect();
    let first = &records[0].record;
    Ok(Report {
        kn_version: env!("CARGO_PKG_VERSION").to_string(),
        inputs: inputs.clone(),
        model: first.model.clone(),
        params: first.params.clone(),
        facts: facts.len(),
        relations: stats::relations(&facts),
        layers,
        layers_from,
        neurons_per_fact: stats::neurons_per_fact(&facts),
        layer_distribution: stats::layer_distribution(&facts, layers),
        shared_neurons: stats::shared_neurons(&facts),
        baseline: baseline.map(|(records, facts)| Baseline {
            params: records[0].record.params.clone(),
            facts: facts.len(),
            neurons_per_fact: stats::neurons_per_fact(&facts),
            layer_distribution: stats::layer_distribution(&facts, layers),
            shared_neurons: stats::shared_neurons(&facts),
        }),
        probes: probes
            .iter()
            .map(|(run, records)| {
                // Sums in one order, whatever the order of the shards: the report of
                // merged shards equals the whole run's to the last bit.
                let mut records: Vec<_> = records.iter().map(|r| &r.record).collect();
                records.sort_by_cached_key(|r| r.id.to_string());
                stats::probe_summary(*run, &records)
            })
            .collect(),
        edits: edits
            .into_iter()
            .map(|e| EditRow {
                file: e.origin.path.display().to_string(),
                report: e.record,
            })
            .collect(),
        figures: Vec::new(),
    })
}

/// The number of layers and where it came from (see the module documentation).
fn layer_count(
    records: &[Located<FactRecord>],
    given: Option<usize>,
) -> Result<(usize, LayersFrom)> {
    let mut seen: Option<(usize, &Located<FactRecord>)> = None;
    let mut completeness = 0;
    for located in records {
        let r = &located.record;
        let stored = r
            .prompts
            .iter()
            .flat_map(|p| p.coarse.iter().chain(&p.kept));
        let layers = r
            .refined
            .iter()
            .map(|n| n.layer)
            .chain(stored.map(|n| n.layer));
        if let Some(top) = layers.max() {
            if seen.is_none_or(|(s, _)| top > s) {
                seen = Some((top, located));
            }
        }
        for p in &r.prompts {
            for c in &p.completeness {
                completeness = completeness.max(c.layer + 1);
            }
        }
    }
    let seen_layers = seen.map_or(0, |(top, _)| top + 1);
    match (given, seen) {
        (Some(n), Some((top, at))) if top >= n => Err(at.origin.error(format!(
            "a neuron of layer {top}, but --layers {n} (layers are numbered from 0)"
        ))),
        (Some(n), _) => Ok((n, LayersFrom::Option)),
        (None, _) if completeness > 0 => {
            Ok((completeness.max(seen_layers), LayersFrom::Completeness))
        }
        (None, _) => Ok((seen_layers.max(1), LayersFrom::MaxLayer)),
    }
}

/// Writes the plots (in `format`), `report.md` and `report.json` into `dir`, which must
/// exist; files of those names are overwritten. Fills `report.figures`. Returns the
/// paths written.
pub fn write(report: &mut Report, dir: &Path, format: Format) -> Result<Vec<PathBuf>> {
    report.figures = plot::render(report, dir, format)?;
    let json = dir.join("report.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| {
        Error::io(
            &json,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    std::fs::write(&json, text + "\n").map_err(|e| Error::io(&json, e))?;
    let md = dir.join("report.md");
    std::fs::write(&md, format::markdown(report)).map_err(|e| Error::io(&md, e))?;
    let mut written: Vec<PathBuf> = report.figures.iter().map(|f| dir.join(&f.file)).collect();
    written.extend([md, json]);
    Ok(written)
}
