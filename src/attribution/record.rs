//! Input facts and the output record of `kn attribute` (also read by `kn refine` and
//! `--resume`).
//!
//! # Format
//!
//! Input, one fact a line:
//! `{"id": "...", "relation": "P36", "answer": "Paris", "prompts": ["The capital of France is [MASK].", ...]}`
//! (`id` defaults to the line number; `relation` is optional; `prompt` is accepted for
//! a single prompt).
//!
//! Output, one [`FactRecord`] a fact:
//!
//! ```json
//! {"id":"france-capital","relation":"P36","answer":"Paris","answer_id":3000,
//!  "refined":[{"layer":9,"index":1234,"prompts":5,"share":0.83,"mean_relative_score":0.61}],
//!  "prompts":[{"prompt":"…","mask_position":6,"gold_probability":0.43,"max_score":0.021,
//!              "coarse":[{"layer":9,"index":1234,"score":0.021}],
//!              "kept":[{"layer":7,"index":88,"score":0.003}],
//!              "completeness":[{"layer":0,"sum":0.0123,"target":0.0129}],
//!              "completeness_error":0.046}],
//!  "model":{"source":"bert-base-cased","revision":"main","commit":"…","weights_sha256":"…",
//!           "config_sha256":"…","tokenizer_sha256":"…"},
//!  "params":{"method":"integrated-gradients","steps":20,"rule":"left","threshold":0.2,
//!            "share":0.7,"min_prompts":3,"keep":0.1},
//!  "kn_version":"0.1.0"}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ig::{Completeness, Rule};
use super::select::{RefinedNeuron, ScoredNeuron};

/// One input fact.
#[derive(Debug, Clone, Deserialize)]
pub struct FactLine {
    /// Any JSON value; the line number when absent.
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    /// Relation name, e.g. `P36`.
    #[serde(default)]
    pub relation: Option<String>,
    /// The gold answer: one vocabulary token.
    pub answer: Option<String>,
    /// Paraphrased prompts, each with one `[MASK]`.
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    /// A single prompt, as `kn predict` takes.
    #[serde(default)]
    pub prompt: Option<String>,
}

/// How scores are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Integrated gradients of the gold probability (the paper's method).
    IntegratedGradients,
    /// Raw activation at the mask (the paper's baseline).
    Activation,
}

/// Every parameter that shapes a record: enough to reproduce it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Scoring method.
    pub method: Method,
    /// IG quadrature points (absent for the activation method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// IG quadrature rule (absent for the activation method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    /// Gauss–Kronrod: the bound on every score's integration error, as a fraction of
    /// the prompt's `P(gold)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// Coarse threshold t: keep `score ≥ t · max`.
    pub threshold: f64,
    /// Refinement share p.
    pub share: f64,
    /// Refinement floor: a refined neuron is coarse in at least this many prompts.
    pub min_prompts: usize,
    /// Neurons with `score ≥ keep · max` are stored (`coarse` + `kept`), so that
    /// `kn refine` can use any threshold ≥ keep.
    pub keep: f64,
    /// Set by `kn refine --adaptive`: the per-relation share actually used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<bool>,
    /// The engine's float type (absent: f32, the default).
    #[serde(default, skip_serializing_if = "Precision::is_default")]
    pub precision: Precision,
}

/// The float type the attribution engine computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Single precision: kn's default, vectorised kernels.
    #[default]
    F32,
    /// Double precision: about twice the time, for exact comparisons.
    F64,
    /// bf16 weight products, f32 everything else (the tensor engine only; for GPUs'
    /// 16-bit matrix units). Scores agree with f32's less closely: see docs/gpu.md.
    Bf16,
    /// f16 weight products, f32 everything else (the tensor engine only).
    F16,
}

impl Precision {
    fn is_default(&self) -> bool {
        *self == Self::F32
    }

    /// The name the command line and the records use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F64 => "f64",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f64" => Ok(Self::F64),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(format!("unknown precision {s:?} (f32, f64, bf16, f16)")),
        }
    }
}

/// Which model made a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Local directory, GGUF file or hub id, as given.
    pub source: String,
    /// The model family (`bert`, `llama`, `gpt2`); records written before kn read
    /// decoders have none, and are BERT's.
    #[serde(default)]
    pub architecture: crate::model::Architecture,
    /// Hub revision (absent for local models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Hub commit the files came from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// sha256 of the weights file.
    pub weights_sha256: String,
    /// sha256 of `config.json` (of a GGUF file: the file's, whose metadata holds the
    /// configuration). Part of the model's identity: the same weights under another
    /// configuration are another model. Absent in records of kn versions that did not
    /// record it: unknown (see [`ModelInfo::difference`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// sha256 of the tokenizer: of `tokenizer.json`, or of `vocab.txt` and
    /// `tokenizer_config.json` together (a GGUF file: the file's). Absent as
    /// `config_sha256` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
}

impl ModelInfo {
    /// Why `other` is not the same model as `self`, if it is not: its weights, its
    /// configuration or its tokenizer differ. The path or hub id does not count (one
    /// directory can be named two ways). A hash that either side lacks (a record of an
    /// older kn) is unknown and not counted; `kn attribute --resume`, which must be
    /// exact, refuses such records itself.
    pub fn difference(&self, other: &ModelInfo) -> Option<String> {
        fn short(sha: &str) -> &str {
            sha.get(..12).unwrap_or(sha)
        }
        if self.weights_sha256 != other.weights_sha256 {
            return Some(format!(
                "weights_sha256 {} ({}) here, {} ({}) there",
                short(&self.weights_sha256),
                self.source,
                short(&other.weights_sha256),
                other.source
            ));
        }
        for (name, here, there) in [
            ("config_sha256", &self.config_sha256, &other.config_sha256),
            (
                "tokenizer_sha256",
                &self.tokenizer_sha256,
                &other.tokenizer_sha256,
            ),
        ] {
            if let (Some(here), Some(there)) = (here, there) {
                if here != there {
                    return Some(format!(
                        "the same weights but another {}: {name} {} ({}) here, {} ({}) there",
                        if name == "config_sha256" {
                            "config.json"
                        } else {
                            "tokenizer"
                        },
                        short(here),
                        self.source,
                        short(there),
                        other.source
                    ));
                }
            }
        }
        None
    }
}

/// One prompt of a fact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// The prompt as given.
    pub prompt: String,
    /// Where the answer is read: the mask token's index (masked LMs), or the last prompt
    /// token's (causal LMs, whose output there predicts the answer).
    pub mask_position: usize,
    /// Causal LMs: the text after `[MASK]` that was dropped (a final period), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
    /// `P(gold)` in the normal forward pass.
    pub gold_probability: f64,
    /// Largest score over all layers and neurons.
    pub max_score: f32,
    /// Coarse set: `score ≥ threshold · max`, highest first.
    pub coarse: Vec<ScoredNeuron>,
    /// Also stored: `keep · max ≤ score < threshold · max`, highest first.
    pub kept: Vec<ScoredNeuron>,
    /// Per layer `Σ Attr` against `P(1) − P(0)` (integrated gradients only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completeness: Vec<Completeness>,
    /// Largest relative completeness error over the layers (integrated gradients only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completeness_error: Option<f64>,
    /// Gauss–Kronrod: integration points evaluated, summed over the layers (a fixed rule
    /// evaluates `steps` × layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<usize>,
    /// Gauss–Kronrod: the largest estimated error of a score, as a fraction of
    /// `gold_probability` (at most `tolerance` unless an interval could not be halved
    /// further).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_estimate: Option<f64>,
}

/// One output line of `kn attribute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactRecord {
    /// The fact's id (its line number when the input had none).
    pub id: serde_json::Value,
    /// Relation, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// The gold answer.
    pub answer: String,
    /// Its token id.
    pub answer_id: u32,
    /// The refined knowledge neurons, by (layer, index).
    pub refined: Vec<RefinedNeuron>,
    /// Per prompt, in input order.
    pub prompts: Vec<PromptRecord>,
    /// The model.
    pub model: ModelInfo,
    /// The parameters.
    pub params: Params,
    /// `kn`'s version.
    pub kn_version: String,
}

/// The parameters two shards of one run share. `kn refine --adaptive` chose the share
/// per relation, so records of different relations legitimately differ in it.
pub fn comparable_params(params: &Params) -> Value {
    let mut value = serde_json::to_value(params).unwrap_or_default();
    if params.adaptive == Some(true) {
        if let Value::Object(map) = &mut value {
            map.remove("share");
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_records_may_differ_in_share_only() {
        let params = |share: f64, adaptive: Option<bool>| Params {
            precision: Default::default(),
            method: crate::attribution::record::Method::IntegratedGradients,
            steps: Some(20),
            rule: None,
            tolerance: None,
            threshold: 0.2,
            share,
            min_prompts: 3,
            keep: 0.1,
            adaptive,
        };
        assert_eq!(
            comparable_params(&params(0.7, Some(true))),
            comparable_params(&params(0.65, Some(true)))
        );
        assert_ne!(
            comparable_params(&params(0.7, None)),
            comparable_params(&params(0.65, None))
        );
    }
}
