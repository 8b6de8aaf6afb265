//! The knowledge neurons of a set of facts, as `kn probe` and `kn edit` read them: the
//! JSONL that `kn attribute` (or `kn refine`) wrote, one [`FactRecord`] a line.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::attribution::record::{FactLine, FactRecord};
use crate::attribution::run::fact_id;
use crate::error::{Error, Result};
use crate::model::files::sha256_bytes;
use crate::model::{Config, Neuron};

/// A whole neurons file, indexed by fact id and relation.
#[derive(Debug, Clone)]
pub struct NeuronsFile {
    /// The path as given (`<stdin>` for `-`).
    pub path: PathBuf,
    /// sha256 of the file's bytes: recorded by probes and edits made from it.
    pub sha256: String,
    /// The records, in file order.
    pub records: Vec<FactRecord>,
    /// Line of each record, for messages.
    lines: Vec<usize>,
    by_id: HashMap<String, usize>,
}

impl NeuronsFile {
    /// Reads `path` (`-` for stdin). Unlike a facts file, a neurons file must be whole:
    /// every bad line is an error, since edits made from part of it would be wrong.
    pub fn read(path: &Path) -> Result<Self> {
        let (shown, bytes) = if path == Path::new("-") {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io("<stdin>", e))?;
            (PathBuf::from("<stdin>"), bytes)
        } else {
            (
                path.to_path_buf(),
                std::fs::read(path).map_err(|e| Error::io(path, e))?,
            )
        };
        Self::parse(&shown, &bytes)
    }

    /// Parses the bytes of a neurons file named `path` in messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let input_error = |line: usize, reason: String| Error::Input {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            input_error(line, "not valid UTF-8".into())
        })?;
        let mut file = Self {
            path: path.to_path_buf(),
            sha256: sha256_bytes(bytes),
            records: Vec::new(),
            lines: Vec::new(),
            by_id: HashMap::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let number = n + 1;
            if line.trim().is_empty() {
                continue;
            }
            let record: FactRecord = serde_json::from_str(line).map_err(|e| {
                input_error(
                    number,
                    format!("not a `kn attribute` record (is this a neurons file?): {e}"),
                )
            })?;
            let key = record.id.to_string();
            if let Some(&first) = file.by_id.get(&key) {
                return Err(input_error(
                    number,
                    format!(
                        "fact id {key} appears twice (first on line {}); concatenated the same shard twice?",
                        file.lines[first]
                    ),
                ));
            }
            file.by_id.insert(key, file.records.len());
            file.records.push(record);
            file.lines.push(number);
        }
        if file.records.is_empty() {
            return Err(Error::model(path, "holds no neuron records"));
        }
        Ok(file)
    }

    /// A neurons file made in memory, named `path` in messages.
    pub fn from_records(path: &Path, records: Vec<FactRecord>) -> Result<Self> {
        let mut bytes = Vec::new();
        for record in &records {
            serde_json::to_writer(&mut bytes, record).map_err(|e| {
                Error::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            })?;
            bytes.push(b'\n');
        }
        Self::parse(path, &bytes)
    }

    /// The record of a fact id.
    pub fn get(&self, id: &serde_json::Value) -> Option<&FactRecord> {
        self.by_id.get(&id.to_string()).map(|&i| &self.records[i])
    }

    /// The line a record came from.
    pub fn line_of(&self, record: &FactRecord) -> usize {
        self.by_id
            .get(&record.id.to_string())
            .map_or(0, |&i| self.lines[i])
    }

    /// The relations named in the file.
    pub fn relations(&self) -> BTreeSet<&str> {
        self.records
            .iter()
            .filter_map(|r| r.relation.as_deref())
            .collect()
    }

    /// The records of one relation.
    pub fn relation_facts<'a>(&'a self, relation: &'a str) -> impl Iterator<Item = &'a FactRecord> {
        self.records
            .iter()
            .filter(move |r| r.relation.as_deref() == Some(relation))
    }

    /// For each refined neuron of `relation`'s facts, the number of facts that hold it.
    pub fn relation_counts(&self, relation: &str) -> BTreeMap<Neuron, usize> {
        let mut counts = BTreeMap::new();
        for record in self.relation_facts(relation) {
            for neuron in refined_neurons(record) {
                *counts.entry(neuron).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Checks that every neuron in the file exists in a model with `config`, and that
    /// records with per-layer completeness have one entry per layer of it.
    pub fn check_model(&self, config: &Config) -> Result<()> {
        let (layers, width) = (config.num_hidden_layers, config.intermediate_size);
        for (record, &line) in self.records.iter().zip(&self.lines) {
            let wrong = |reason: String| Error::Input {
                path: self.path.clone(),
                line,
                reason: format!(
                    "fact {}: {reason}; this model has {layers} layers × {width} neurons \
                     (were these neurons found with another model?)",
                    record.id
                ),
            };
            for prompt in &record.prompts {
                if !prompt.completeness.is_empty() && prompt.completeness.len() != layers {
                    return Err(wrong(format!(
                        "it was attributed on a model with {} layers",
                        prompt.completeness.len()
                    )));
                }
            }
            let stored = record
                .prompts
                .iter()
                .flat_map(|p| p.coarse.iter().chain(&p.kept).map(|s| (s.layer, s.index)));
            let refined = record.refined.iter().map(|r| (r.layer, r.index));
            for (layer, index) in refined.chain(stored) {
                if layer >= layers || index >= width {
                    return Err(wrong(format!("neuron {layer}:{index} is out of range")));
                }
            }
        }
        Ok(())
    }

    /// The weights hashes the records were made with (normally one).
    pub fn model_hashes(&self) -> BTreeSet<&str> {
        self.records
            .iter()
            .map(|r| r.model.weights_sha256.as_str())
            .collect()
    }
}

/// A record's refined neurons as [`Neuron`]s, in (layer, index) order.
pub fn refined_neurons(record: &FactRecord) -> Vec<Neuron> {
    let mut neurons: Vec<Neuron> = record
        .refined
        .iter()
        .map(|r| Neuron {
            layer: r.layer,
            index: r.index,
        })
        .collect();
    neurons.sort();
    neurons.dedup();
    neurons
}

/// A fact of a facts file matched with its record in a neurons file.
#[derive(Debug, Clone)]
pub struct KnownFact<'a> {
    /// The fact's id.
    pub id: serde_json::Value,
    /// Its relation (the line's, else the record's).
    pub relation: Option<String>,
    /// The gold answer (the line's, else the record's).
    pub answer: String,
    /// The prompts (the line's, else those the record was attributed on).
    pub prompts: Vec<String>,
    /// The neurons file's record of it.
    pub record: &'a FactRecord,
}

impl<'a> KnownFact<'a> {
    /// A record of the neurons file with its own prompts and answer.
    pub fn from_record(record: &'a FactRecord) -> Self {
        Self {
            id: record.id.clone(),
            relation: record.relation.clone(),
            answer: record.answer.clone(),
            prompts: record.prompts.iter().map(|p| p.prompt.clone()).collect(),
            record,
        }
    }
}

impl NeuronsFile {
    /// Matches a facts-file line (its id, or its line number when it has none) with its
    /// record. The line's answer and relation must agree with the record's; its prompts,
    /// when it has any, replace the record's.
    pub fn resolve(
        &self,
        line: &FactLine,
        line_number: usize,
    ) -> std::result::Result<KnownFact<'_>, String> {
        let id = fact_id(line, line_number);
        let record = self.get(&id).ok_or_else(|| {
            format!(
                "fact id {id} is not in the neurons file {}",
                self.path.display()
            )
        })?;
        let mut fact = KnownFact::from_record(record);
        if let Some(answer) = &line.answer {
            if answer.trim() != record.answer.trim() {
                return Err(format!(
                    "answer {answer:?} differs from {:?}, the answer the neurons of fact {id} were found for",
                    record.answer
                ));
            }
        }
        if let Some(relation) = &line.relation {
            if record.relation.as_ref().is_some_and(|r| r != relation) {
                return Err(format!(
                    "relation {relation:?} differs from {:?} in the neurons file",
                    record.relation.as_deref().unwrap_or_default()
                ));
            }
            fact.relation = Some(relation.clone());
        }
        match (&line.prompt, &line.prompts) {
            (Some(_), Some(_)) => {
                return Err("has both \"prompt\" and \"prompts\"; give one".into())
            }
            (Some(p), None) => fact.prompts = vec![p.clone()],
            (None, Some(ps)) if ps.is_empty() => return Err("\"prompts\" is empty".into()),
            (None, Some(ps)) => fact.prompts = ps.clone(),
            (None, None) => {}
        }
        Ok(fact)
    }
}
