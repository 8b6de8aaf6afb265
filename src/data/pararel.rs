//! ParaRel (Elazar et al., 2021) turned into `kn`'s fact JSONL (`kn pararel`): every fact
//! of a relation paired with every pattern of that relation, `[X]` → the subject and
//! `[Y]` → `[MASK]`, the bags of paraphrased prompts of the Knowledge Neurons paper.
//!
//! # Input
//!
//! A patterns directory and a facts directory, one `P<id>.jsonl` per relation in each:
//! - patterns: `{"pattern": "[X] was born in [Y] .", "lemma": …}`, with exactly one `[X]`
//!   (subject) and one `[Y]` (object); other fields are ignored;
//! - facts: `{"sub_label": "Dante", "obj_label": "Florence", "uuid": "…"}`.
//!
//! # Output
//!
//! One [`ParaRelFact`] a line, read as it is by `kn attribute` and `kn predict`:
//!
//! ```json
//! {"id":"P36:4168a6fb-…","relation":"P36","subject":"Cook County","answer":"Chicago",
//!  "prompts":["The capital of Cook County is [MASK] .","The capital city of Cook County is [MASK].",…]}
//! ```
//!
//! # Choices
//!
//! - Order: relations by number (P17 before P101), facts in file order, prompts in the
//!   order of the pattern file. The output depends on nothing else (no clock, no hash
//!   order), so two runs write the same bytes.
//! - A relation is kept when it has both files and at least `min_patterns` distinct
//!   patterns (the paper keeps the relations with more than 3). A relation asked for by
//!   name that lacks a file is an error rather than a silent drop.
//! - Duplicates: a pattern equal (after trimming) to an earlier one of its relation is
//!   kept once, so no bag holds the same prompt twice; a fact whose uuid, or whose
//!   (subject, object) pair, repeats an earlier one of its relation is kept once, so no
//!   fact is counted twice. Both are counted in the [`Summary`]. A subject with several
//!   objects (N-to-M relations) keeps one fact per object.
//! - With a vocabulary, a fact whose object is not exactly one token of it is dropped
//!   and counted: kn's answers are single tokens.
//! - `limit`: at most that many facts per relation, drawn among the facts kept by a
//!   shuffle seeded with `seed` and the relation's name (a relation's draw does not
//!   depend on which other relations are converted), and written in file order.
//!
//! Bad input (a line that is not JSON or lacks a field, a pattern without exactly one
//! `[X]` and one `[Y]`, an empty label) is an [`Error::Input`] with file and line;
//! [`convert`] reads and checks everything before returning a single fact.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{JsonlInput, MASK_PLACEHOLDER};
use crate::error::{Error, Result};
use crate::rng::{stable_hash, SplitMix64};

/// The subject slot of a ParaRel pattern.
pub const SUBJECT_SLOT: &str = "[X]";
/// The object slot of a ParaRel pattern: it becomes `[MASK]`.
pub const OBJECT_SLOT: &str = "[Y]";

/// One line of a patterns file (the fields kn uses).
#[derive(Debug, Deserialize)]
struct PatternLine {
    pattern: String,
}

/// One line of a facts file.
#[derive(Debug, Deserialize)]
struct FactLine {
    sub_label: String,
    obj_label: String,
    uuid: String,
}

/// One ParaRel fact: a (subject, relation, object) triple with its T-REx uuid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triple {
    /// T-REx uuid.
    pub uuid: String,
    /// `sub_label`, e.g. `France`.
    pub subject: String,
    /// `obj_label`, e.g. `Paris`: the answer.
    pub object: String,
}

/// One output line: a fact with every prompt of its relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParaRelFact {
    /// `<relation>:<uuid>`, unique within ParaRel.
    pub id: String,
    /// The relation, e.g. `P36`.
    pub relation: String,
    /// The subject that replaced `[X]`.
    pub subject: String,
    /// The object: the answer at `[MASK]`.
    pub answer: String,
    /// One prompt per pattern of the relation, in pattern-file order.
    pub prompts: Vec<String>,
}

/// A pattern with `[X]` → `subject` and `[Y]` → `[MASK]`.
pub fn fill(pattern: &str, subject: &str) -> String {
    // The object slot first: a subject that happened to contain "[Y]" stays as it is.
    pattern
        .trim()
        .replacen(OBJECT_SLOT, MASK_PLACEHOLDER, 1)
        .replacen(SUBJECT_SLOT, subject, 1)
}

/// The copy of ParaRel built into kn (`data/pararel` at build time, see `build.rs`).
mod bundled {
    include!(concat!(env!("OUT_DIR"), "/pararel_bundled.rs"));
}

/// One of ParaRel's two directories: on disk, or the copy built into kn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// A directory with one `P<id>.jsonl` per relation.
    Path(PathBuf),
    /// The repository's `data/pararel/patterns` or `data/pararel/facts`, built into the
    /// binary, so that an installed `kn` needs no copy beside it.
    Bundled(BundledDir),
}

/// Which bundled directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundledDir {
    /// `data/pararel/patterns`.
    Patterns,
    /// `data/pararel/facts`.
    Facts,
}

impl BundledDir {
    fn files(self) -> &'static [(&'static str, &'static [u8])] {
        match self {
            Self::Patterns => bundled::PATTERNS,
            Self::Facts => bundled::FACTS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Patterns => "patterns",
            Self::Facts => "facts",
        }
    }
}

impl DataDir {
    /// The file of `relation`, as shown in messages (built-in files are named by their
    /// place in the repository, marked as built in).
    pub fn file(&self, relation: &str) -> PathBuf {
        match self {
            Self::Path(dir) => dir.join(format!("{relation}.jsonl")),
            Self::Bundled(which) => PathBuf::from(format!(
                "(built in) data/pararel/{}/{relation}.jsonl",
                which.name()
            )),
        }
    }

    /// Whether `relation` has a file here.
    pub fn has(&self, relation: &str) -> bool {
        match self {
            Self::Path(dir) => dir.join(format!("{relation}.jsonl")).is_file(),
            Self::Bundled(which) => which.files().iter().any(|(name, _)| *name == relation),
        }
    }

    /// Opens the file of `relation`.
    pub fn open(&self, relation: &str) -> Result<JsonlInput> {
        match self {
            Self::Path(_) => JsonlInput::open(&self.file(relation)),
            Self::Bundled(which) => {
                let bytes = which
                    .files()
                    .iter()
                    .find(|(name, _)| *name == relation)
                    .map(|(_, bytes)| *bytes)
                    .ok_or_else(|| {
                        Error::io(
                            self.file(relation),
                            std::io::Error::from(std::io::ErrorKind::NotFound),
                        )
                    })?;
                Ok(JsonlInput::from_reader(
                    &self.file(relation),
                    Box::new(std::io::Cursor::new(bytes)),
                ))
            }
        }
    }

    /// The relations with a file here.
    fn stems(&self) -> Result<HashSet<String>> {
        match self {
            Self::Path(dir) => jsonl_stems(dir),
            Self::Bundled(which) => Ok(which
                .files()
                .iter()
                .map(|(name, _)| name.to_string())
                .collect()),
        }
    }
}

impl std::fmt::Display for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(dir) => write!(f, "{}", dir.display()),
            Self::Bundled(which) => write!(f, "(built in) data/pararel/{}", which.name()),
        }
    }
}

/// Where ParaRel is: the `patterns/` and `facts/` directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParaRelDirs {
    /// One `P<id>.jsonl` of patterns per relation.
    pub patterns: DataDir,
    /// One `P<id>.jsonl` of facts per relation.
    pub facts: DataDir,
}

impl ParaRelDirs {
    /// `patterns/` and `facts/` under `root` (the layout of ParaRel's repository).
    pub fn under(root: &Path) -> Self {
        Self {
            patterns: DataDir::Path(root.join("patterns")),
            facts: DataDir::Path(root.join("facts")),
        }
    }

    /// The copy built into kn: the repository's `data/pararel` when kn was built.
    pub fn bundled() -> Self {
        Self {
            patterns: DataDir::Bundled(BundledDir::Patterns),
            facts: DataDir::Bundled(BundledDir::Facts),
        }
    }

    /// The patterns file of `relation`.
    pub fn patterns_file(&self, relation: &str) -> PathBuf {
        self.patterns.file(relation)
    }

    /// The facts file of `relation`.
    pub fn facts_file(&self, relation: &str) -> PathBuf {
        self.facts.file(relation)
    }

    /// Every relation with a file in either directory, in [`relation_order`].
    pub fn relations(&self) -> Result<Vec<String>> {
        let mut names = self.patterns.stems()?;
        names.extend(self.facts.stems()?);
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort_by_key(|name| relation_order(name));
        Ok(names)
    }
}

/// Sort key of a relation name: Wikidata ids by number (P17 before P101), other names
/// after them, alphabetically.
pub fn relation_order(name: &str) -> (u64, String) {
    let number = name
        .strip_prefix('P')
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    (number, name.to_string())
}

/// The stems of the `*.jsonl` files in `dir`.
fn jsonl_stems(dir: &Path) -> Result<HashSet<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut stems = HashSet::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "jsonl") && path.is_file() {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                stems.insert(stem.to_string());
            }
        }
    }
    Ok(stems)
}

/// A relation's patterns and facts, duplicates removed (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation, e.g. `P36`.
    pub name: String,
    /// Distinct patterns, trimmed, in file order.
    pub patterns: Vec<String>,
    /// Pattern lines dropped as repeats of an earlier one.
    pub duplicate_patterns: usize,
    /// Distinct facts, in file order.
    pub facts: Vec<Triple>,
    /// Fact lines dropped as repeats (same uuid, or same subject and object).
    pub duplicate_facts: usize,
}

impl Relation {
    /// Reads and checks both files of `name`.
    pub fn read(dirs: &ParaRelDirs, name: &str) -> Result<Self> {
        let (patterns, duplicate_patterns) = patterns_of(dirs.patterns.open(name)?)?;
        let (facts, duplicate_facts) = facts_of(dirs.facts.open(name)?)?;
        Ok(Self {
            name: name.to_string(),
            patterns,
            duplicate_patterns,
            facts,
            duplicate_facts,
        })
    }

    /// The fact's prompts: every pattern filled with its subject.
    pub fn prompts(&self, subject: &str) -> Vec<String> {
        self.patterns.iter().map(|p| fill(p, subject)).collect()
    }

    /// The output line of one of this relation's facts.
    pub fn fact(&self, triple: &Triple) -> ParaRelFact {
        ParaRelFact {
            id: format!("{}:{}", self.name, triple.uuid),
            relation: self.name.clone(),
            subject: triple.subject.clone(),
            answer: triple.object.clone(),
            prompts: self.prompts(&triple.subject),
        }
    }
}

/// The distinct patterns of a patterns file, trimmed, in file order, and how many lines
/// repeated an earlier pattern.
pub fn read_patterns(path: &Path) -> Result<(Vec<String>, usize)> {
    patterns_of(JsonlInput::open(path)?)
}

fn patterns_of(mut input: JsonlInput) -> Result<(Vec<String>, usize)> {
    let mut patterns: Vec<String> = Vec::new();
    let mut duplicates = 0;
    while let Some(item) = input.next() {
        let (line, text) = item?;
        let record: PatternLine = input.parse(line, text.trim_end())?;
        let pattern = record.pattern.trim().to_string();
        for slot in [SUBJECT_SLOT, OBJECT_SLOT] {
            let count = pattern.matches(slot).count();
            if count != 1 {
                return Err(input.error(
                    line,
                    format!("pattern has {count} {slot}, needs exactly one: {pattern:?}"),
                ));
            }
        }
        if patterns.contains(&pattern) {
            duplicates += 1;
        } else {
            patterns.push(pattern);
        }
    }
    Ok((patterns, duplicates))
}

/// The distinct facts of a facts file, in file order, and how many lines repeated an
/// earlier fact (same uuid, or same subject and object).
pub fn read_facts(path: &Path) -> Result<(Vec<Triple>, usize)> {
    facts_of(JsonlInput::open(path)?)
}

fn facts_of(mut input: JsonlInput) -> Result<(Vec<Triple>, usize)> {
    let mut facts = Vec::new();
    let mut uuids = HashSet::new();
    let mut pairs = HashSet::new();
    let mut duplicates = 0;
    while let Some(item) = input.next() {
        let (line, text) = item?;
        let record: FactLine = input.parse(line, text.trim_end())?;
        let triple = Triple {
            uuid: record.uuid.trim().to_string(),
            subject: record.sub_label.trim().to_string(),
            object: record.obj_label.trim().to_string(),
        };
        for (field, value) in [
            ("uuid", &triple.uuid),
            ("sub_label", &triple.subject),
            ("obj_label", &triple.object),
        ] {
            if value.is_empty() {
                return Err(input.error(line, format!("{field} is empty")));
            }
        }
        let new_uuid = uuids.insert(triple.uuid.clone());
        let new_pair = pairs.insert((triple.subject.clone(), triple.object.clone()));
        if new_uuid && new_pair {
            facts.push(triple);
        } else {
            duplicates += 1;
        }
    }
    Ok((facts, duplicates))
}

/// What [`convert`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Where ParaRel is.
    pub dirs: ParaRelDirs,
    /// Only these relations (each must have both files), or every relation found.
    pub relations: Option<Vec<String>>,
    /// Relations with fewer distinct patterns are dropped (counted after `object_last`).
    pub min_patterns: usize,
    /// Keep only the patterns whose `[Y]` ends the sentence (nothing but white space and
    /// punctuation after it): the prompts a causal model can read.
    pub object_last: bool,
    /// At most this many facts per relation, drawn at random (see `seed`).
    pub limit: Option<usize>,
    /// Seeds the draw of `limit`.
    pub seed: u64,
}

/// Why a relation was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// Facts but no patterns file.
    NoPatterns,
    /// Patterns but no facts file.
    NoFacts,
    /// Fewer distinct patterns than `min_patterns`.
    TooFewPatterns {
        /// Distinct patterns found.
        patterns: usize,
        /// The minimum asked for.
        min_patterns: usize,
    },
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoPatterns => write!(f, "no patterns file"),
            Self::NoFacts => write!(f, "no facts file"),
            Self::TooFewPatterns {
                patterns,
                min_patterns,
            } => write!(
                f,
                "{patterns} pattern(s), fewer than --min-patterns {min_patterns}"
            ),
        }
    }
}

/// The counts of a kept relation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeptCounts {
    /// Distinct patterns: prompts per fact.
    pub patterns: usize,
    /// Pattern lines dropped as duplicates.
    pub duplicate_patterns: usize,
    /// Patterns dropped because text follows their `[Y]` (with `object_last`).
    pub object_not_last: usize,
    /// Distinct facts read.
    pub facts: usize,
    /// Fact lines dropped as duplicates.
    pub duplicate_facts: usize,
    /// Facts dropped because their object is not one token of the vocabulary.
    pub not_one_token: usize,
    /// Facts written.
    pub written: usize,
}

/// What happened to one relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelationOutcome {
    /// Converted, with its counts.
    Kept(KeptCounts),
    /// Left out, and why.
    Dropped(DropReason),
}

/// Per relation, in output order, what [`convert`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// `(relation, outcome)`.
    pub relations: Vec<(String, RelationOutcome)>,
}

impl Summary {
    /// The counts of the kept relations.
    pub fn kept(&self) -> impl Iterator<Item = (&str, &KeptCounts)> {
        self.relations
            .iter()
            .filter_map(|(name, outcome)| match outcome {
                RelationOutcome::Kept(counts) => Some((name.as_str(), counts)),
                RelationOutcome::Dropped(_) => None,
            })
    }

    /// The dropped relations and why.
    pub fn dropped(&self) -> impl Iterator<Item = (&str, &DropReason)> {
        self.relations
            .iter()
            .filter_map(|(name, outcome)| match outcome {
                RelationOutcome::Dropped(reason) => Some((name.as_str(), reason)),
                RelationOutcome::Kept(_) => None,
            })
    }

    /// Facts written, all relations.
    pub fn written(&self) -> usize {
        self.kept().map(|(_, c)| c.written).sum()
    }

    /// Prompts written, all relations.
    pub fn prompts(&self) -> usize {
        self.kept().map(|(_, c)| c.written * c.patterns).sum()
    }

    /// Facts dropped because their object is not one token, all relations.
    pub fn not_one_token(&self) -> usize {
        self.kept().map(|(_, c)| c.not_one_token).sum()
    }
}

/// ParaRel as kn facts: every kept fact with all its prompts, in output order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    /// The facts to write.
    pub facts: Vec<ParaRelFact>,
    /// What was kept and dropped.
    pub summary: Summary,
}

/// What the conversion needs of a vocabulary (a model's tokenizer,
/// `model::MaskTokenizer`): the id of an answer that must be one token.
pub trait AnswerVocab {
    /// The answer's token id; [`Error::Prompt`] when it is not one token (the fact is
    /// counted and dropped), any other error ends the conversion.
    fn answer_id(&self, answer: &str) -> Result<u32>;
}

/// Reads and checks the relations of `options`, drops what the module documentation
/// says, and returns the facts to write. `vocab`, when given, must have each object as
/// one token.
pub fn convert(options: &ConvertOptions, vocab: Option<&dyn AnswerVocab>) -> Result<Conversion> {
    let dirs = &options.dirs;
    let names = match &options.relations {
        Some(asked) => {
            let mut names: Vec<String> = Vec::new();
            for name in asked {
                for dir in [&dirs.patterns, &dirs.facts] {
                    if !dir.has(name) {
                        return Err(Error::Data {
                            path: dir.file(name),
                            reason: format!(
                                "relation {name} was asked for, but this file is missing"
                            ),
                        });
                    }
                }
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
            names.sort_by_key(|name| relation_order(name));
            names
        }
        None => dirs.relations()?,
    };
    let mut conversion = Conversion {
        facts: Vec::new(),
        summary: Summary::default(),
    };
    for name in names {
        let outcome = convert_relation(options, vocab, &name, &mut conversion.facts)?;
        conversion.summary.relations.push((name, outcome));
    }
    Ok(conversion)
}

/// Converts one relation, appending its facts to `out`.
fn convert_relation(
    options: &ConvertOptions,
    vocab: Option<&dyn AnswerVocab>,
    name: &str,
    out: &mut Vec<ParaRelFact>,
) -> Result<RelationOutcome> {
    let dirs = &options.dirs;
    if !dirs.patterns.has(name) {
        return Ok(RelationOutcome::Dropped(DropReason::NoPatterns));
    }
    if !dirs.facts.has(name) {
        return Ok(RelationOutcome::Dropped(DropReason::NoFacts));
    }
    let mut relation = Relation::read(dirs, name)?;
    let read_patterns = relation.patterns.len();
    if options.object_last {
        relation.patterns.retain(|p| object_is_last(p));
    }
    if relation.patterns.len() < options.min_patterns {
        return Ok(RelationOutcome::Dropped(DropReason::TooFewPatterns {
            patterns: relation.patterns.len(),
            min_patterns: options.min_patterns,
        }));
    }
    let mut counts = KeptCounts {
        patterns: relation.patterns.len(),
        duplicate_patterns: relation.duplicate_patterns,
        object_not_last: read_patterns - relation.patterns.len(),
        facts: relation.facts.len(),
        duplicate_facts: relation.duplicate_facts,
        ..KeptCounts::default()
    };
    let mut usable: Vec<&Triple> = Vec::with_capacity(relation.facts.len());
    for triple in &relation.facts {
        match vocab.map(|v| v.answer_id(&triple.object)) {
            None | Some(Ok(_)) => usable.push(triple),
            // Not one token (several pieces, or [UNK]): expected, counted.
            Some(Err(Error::Prompt(_))) => counts.not_one_token += 1,
            Some(Err(e)) => return Err(e),
        }
    }
    if let Some(limit) = options.limit {
        usable = draw(usable, limit, options.seed, name);
    }
    counts.written = usable.len();
    out.extend(usable.into_iter().map(|t| relation.fact(t)));
    Ok(RelationOutcome::Kept(counts))
}

/// Whether a pattern's `[Y]` ends it: only white space and sentence punctuation follow.
pub fn object_is_last(pattern: &str) -> bool {
    pattern.split_once(OBJECT_SLOT).is_some_and(|(_, after)| {
        after
            .chars()
            .all(|c| c.is_whitespace() || matches!(c, '.' | '!' | '?' | ',' | ';' | ':'))
    })
}

/// At most `limit` of `items`, drawn by a shuffle seeded with `seed` and `relation`,
/// kept in their original order.
pub fn draw<T>(items: Vec<T>, limit: usize, seed: u64, relation: &str) -> Vec<T> {
    if items.len() <= limit {
        return items;
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    SplitMix64::new(seed ^ stable_hash(relation)).shuffle(&mut order);
    let mut chosen = vec![false; items.len()];
    for &i in &order[..limit] {
        chosen[i] = true;
    }
    items
        .into_iter()
        .zip(chosen)
        .filter_map(|(item, keep)| keep.then_some(item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_filled() {
        assert_eq!(
            fill(" [Y] is the capital of [X]. ", "France"),
            "[MASK] is the capital of France."
        );
        assert_eq!(fill("[X] plays [Y] .", "A [Y] B"), "A [Y] B plays [MASK] .");
    }

    #[test]
    fn relations_sort_by_number() {
        let mut names = vec!["P101", "P17", "X", "P1376", "P36"];
        names.sort_by_key(|n| relation_order(n));
        assert_eq!(names, ["P17", "P36", "P101", "P1376", "X"]);
    }

    #[test]
    fn draws_are_seeded_ordered_and_bounded() {
        let items: Vec<usize> = (0..100).collect();
        let a = draw(items.clone(), 10, 1, "P36");
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "file order kept");
        assert_eq!(a, draw(items.clone(), 10, 1, "P36"));
        assert_ne!(a, draw(items.clone(), 10, 2, "P36"));
        assert_ne!(a, draw(items.clone(), 10, 1, "P19"));
        assert_eq!(draw(items.clone(), 200, 1, "P36"), items);
    }
}
