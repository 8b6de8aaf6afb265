//! The lines of `kn edit --update`: kn's own facts, and the records of the two datasets
//! the model-editing literature evaluates on, read as they are distributed, one record a
//! line (docs/guide/edit.md, "Update records from ZsRE and CounterFact").
//!
//! - kn's own line: the fact fields (`id`, `relation`, `answer`, `prompt`/`prompts`),
//!   `new_answer`, and optionally `paraphrases` (prompts scored for generalization,
//!   never edited with) and `locality` (prompts, or `{"prompt", "answer"}` objects,
//!   scored for locality).
//! - CounterFact (ROME's `counterfact.json`, kmeng01/rome `dsets/counterfact.py`): a
//!   record with `requested_rewrite` (`prompt` with `{}` for the `subject`,
//!   `target_new.str`, `target_true.str`, `relation_id`), `case_id`,
//!   `paraphrase_prompts` and `neighborhood_prompts`; `attribute_prompts`,
//!   `generation_prompts` and `dependancy_prompts` are not read.
//! - ZsRE (MEND's and EasyEdit's `zsre_mend_eval.json`, zjunlp/EasyEdit
//!   `easyeditor/dataset/zsre.py`): a record with `src` (the question), `alt` (the new
//!   answer), `answers` (the old ones), `rephrase`, `loc` and `loc_ans`.
//!
//! The datasets' prompts end where the answer starts; kn's prompts hold the answer's
//! place as `[MASK]`, so each becomes `prompt + " [MASK]"` (the end of the prompt, for a
//! causal LM the next token).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::attribution::record::FactLine;

/// The shape of an `--update` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// kn's own fields.
    Kn,
    /// A CounterFact record.
    CounterFact,
    /// A ZsRE record.
    Zsre,
}

impl Shape {
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Kn => "kn",
            Shape::CounterFact => "CounterFact",
            Shape::Zsre => "ZsRE",
        }
    }
}

/// A locality prompt: scored for the edit leaving its top-1 unchanged. The answer, when
/// given, is kept for the record but not scored (locality compares the model with
/// itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityPrompt {
    /// With one `[MASK]`.
    pub prompt: String,
    /// The answer the dataset gives, if any.
    pub answer: Option<String>,
}

/// One `--update` line in kn's terms.
#[derive(Debug, Clone)]
pub struct UpdateRecord {
    /// The shape it was read in.
    pub shape: Shape,
    /// The fact: id, relation, old answer, prompts (the edit's).
    pub fact: FactLine,
    /// The answer it should have.
    pub new_answer: Option<String>,
    /// Paraphrases, scored for generalization, never edited with.
    pub paraphrases: Vec<String>,
    /// Prompts the edit should leave alone.
    pub locality: Vec<LocalityPrompt>,
}

/// Fields only a CounterFact record has.
const COUNTERFACT_FIELDS: &[&str] = &[
    "requested_rewrite",
    "case_id",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "attribute_prompts",
    "generation_prompts",
    "dependancy_prompts",
];
/// Fields only a ZsRE record has.
const ZSRE_FIELDS: &[&str] = &["src", "alt", "answers", "rephrase", "loc", "loc_ans"];
/// kn's own fields (`id` is every shape's).
const KN_FIELDS: &[&str] = &[
    "relation",
    "answer",
    "prompt",
    "prompts",
    "new_answer",
    "paraphrases",
    "locality",
];

/// The place of the answer in a dataset's prompt.
fn cloze(prompt: &str) -> String {
    format!("{} [MASK]", prompt.trim_end())
}

/// Reads one `--update` line: detects its shape (`requested_rewrite` → CounterFact,
/// `src` or `alt` → ZsRE, else kn's own) and converts it. A line with the fields of two
/// shapes is refused, naming them.
pub fn parse_update(value: Value) -> Result<UpdateRecord, String> {
    let Value::Object(map) = value else {
        return Err("is not a JSON object".into());
    };
    let has = |fields: &[&str]| -> Vec<String> {
        fields
            .iter()
            .filter(|f| map.contains_key(**f))
            .map(|f| format!("\"{f}\""))
            .collect()
    };
    let (cf, zsre, kn) = (has(COUNTERFACT_FIELDS), has(ZSRE_FIELDS), has(KN_FIELDS));
    let shape = if map.contains_key("requested_rewrite") {
        Shape::CounterFact
    } else if map.contains_key("src") || map.contains_key("alt") {
        Shape::Zsre
    } else if !cf.is_empty() {
        return Err(format!(
            "has CounterFact field(s) {} but no \"requested_rewrite\"",
            cf.join(", ")
        ));
    } else if !zsre.is_empty() && kn.is_empty() {
        return Err(format!(
            "has ZsRE field(s) {} but no \"src\" and \"alt\"",
            zsre.join(", ")
        ));
    } else {
        Shape::Kn
    };
    // A ZsRE record may name its fact by `case_id`, as CounterFact's do.
    let cf: Vec<String> = cf
        .into_iter()
        .filter(|f| !(shape == Shape::Zsre && f == "\"case_id\""))
        .collect();
    let foreign: Vec<(Shape, &Vec<String>)> = [
        (Shape::CounterFact, &cf),
        (Shape::Zsre, &zsre),
        (Shape::Kn, &kn),
    ]
    .into_iter()
    .filter(|(s, fields)| *s != shape && !fields.is_empty())
    .collect();
    if let Some((other, fields)) = foreign.first() {
        return Err(format!(
            "mixes shapes: a {} record with {} field(s) {}; give one shape a line",
            shape.name(),
            other.name(),
            fields.join(", ")
        ));
    }
    match shape {
        Shape::CounterFact => counterfact(map),
        Shape::Zsre => zsre_record(map),
        Shape::Kn => kn_line(map),
    }
}

fn parse_as<T: serde::de::DeserializeOwned>(
    map: Map<String, Value>,
    shape: Shape,
) -> Result<T, String> {
    serde_json::from_value(Value::Object(map)).map_err(|e| match shape {
        // kn's own lines keep the words every kn input uses.
        Shape::Kn => format!("not a valid record: {e}"),
        _ => format!("not a valid {} record: {e}", shape.name()),
    })
}

/// kn's own line.
#[derive(Deserialize)]
struct KnLine {
    #[serde(flatten)]
    fact: FactLine,
    #[serde(default)]
    new_answer: Option<String>,
    #[serde(default)]
    paraphrases: Vec<String>,
    #[serde(default)]
    locality: Vec<KnLocality>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum KnLocality {
    Prompt(String),
    Full {
        prompt: String,
        #[serde(default)]
        answer: Option<String>,
    },
}

fn kn_line(map: Map<String, Value>) -> Result<UpdateRecord, String> {
    let line: KnLine = parse_as(map, Shape::Kn)?;
    Ok(UpdateRecord {
        shape: Shape::Kn,
        fact: line.fact,
        new_answer: line.new_answer,
        paraphrases: line.paraphrases,
        locality: line
            .locality
            .into_iter()
            .map(|l| match l {
                KnLocality::Prompt(prompt) => LocalityPrompt {
                    prompt,
                    answer: None,
                },
                KnLocality::Full { prompt, answer } => LocalityPrompt { prompt, answer },
            })
            .collect(),
    })
}

/// ROME's `counterfact.json` record (the fields kn reads).
#[derive(Deserialize)]
struct CounterFactRecord {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    case_id: Option<Value>,
    requested_rewrite: Rewrite,
    #[serde(default)]
    paraphrase_prompts: Vec<String>,
    #[serde(default)]
    neighborhood_prompts: Vec<String>,
}

#[derive(Deserialize)]
struct Rewrite {
    prompt: String,
    subject: String,
    target_new: Target,
    target_true: Target,
    #[serde(default)]
    relation_id: Option<String>,
}

#[derive(Deserialize)]
struct Target {
    #[serde(rename = "str")]
    text: String,
}

fn counterfact(map: Map<String, Value>) -> Result<UpdateRecord, String> {
    let record: CounterFactRecord = parse_as(map, Shape::CounterFact)?;
    let rewrite = record.requested_rewrite;
    if !rewrite.prompt.contains("{}") {
        return Err(format!(
            "CounterFact record: requested_rewrite.prompt {:?} has no \"{{}}\" for the subject",
            rewrite.prompt
        ));
    }
    let id = match (record.id, record.case_id) {
        (Some(_), Some(_)) => {
            return Err("CounterFact record: has both \"id\" and \"case_id\"; give one".into())
        }
        (id, case_id) => id.or(case_id),
    };
    let answer = rewrite.target_true.text.trim().to_string();
    Ok(UpdateRecord {
        shape: Shape::CounterFact,
        fact: FactLine {
            id,
            relation: rewrite.relation_id,
            answer: Some(answer.clone()),
            prompts: Some(vec![cloze(&rewrite.prompt.replace("{}", &rewrite.subject))]),
            prompt: None,
        },
        new_answer: Some(rewrite.target_new.text.trim().to_string()),
        paraphrases: record.paraphrase_prompts.iter().map(|p| cloze(p)).collect(),
        locality: record
            .neighborhood_prompts
            .iter()
            .map(|p| LocalityPrompt {
                prompt: cloze(p),
                answer: Some(answer.clone()),
            })
            .collect(),
    })
}

/// A ZsRE record of `zsre_mend_eval.json` (the fields kn reads).
#[derive(Deserialize)]
struct ZsreRecord {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    case_id: Option<Value>,
    src: String,
    alt: String,
    #[serde(default)]
    answers: Vec<String>,
    #[serde(default)]
    rephrase: Option<String>,
    #[serde(default)]
    loc: Option<String>,
    #[serde(default)]
    loc_ans: Option<String>,
}

fn zsre_record(map: Map<String, Value>) -> Result<UpdateRecord, String> {
    let record: ZsreRecord = parse_as(map, Shape::Zsre)?;
    let id = match (record.id, record.case_id) {
        (Some(_), Some(_)) => {
            return Err("ZsRE record: has both \"id\" and \"case_id\"; give one".into())
        }
        (id, case_id) => id.or(case_id),
    };
    if record.loc_ans.is_some() && record.loc.is_none() {
        return Err("ZsRE record: has \"loc_ans\" but no \"loc\"".into());
    }
    Ok(UpdateRecord {
        shape: Shape::Zsre,
        fact: FactLine {
            id,
            relation: None,
            answer: record.answers.first().map(|a| a.trim().to_string()),
            prompts: Some(vec![cloze(&record.src)]),
            prompt: None,
        },
        new_answer: Some(record.alt.trim().to_string()),
        paraphrases: record.rephrase.iter().map(|p| cloze(p)).collect(),
        locality: record
            .loc
            .iter()
            .map(|p| LocalityPrompt {
                prompt: cloze(p),
                answer: record.loc_ans.as_ref().map(|a| a.trim().to_string()),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<UpdateRecord, String> {
        parse_update(serde_json::from_str(line).unwrap())
    }

    /// The first record of ROME's counterfact.json, in its field layout (prompt lists
    /// shortened).
    const COUNTERFACT: &str = r#"{"case_id": 0, "pararel_idx": 2796, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103", "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"}, "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native", "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"], "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is", "The native language of Montesquieu is"], "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"], "generation_prompts": ["Danielle Darrieux's mother tongue is"]}"#;

    /// A record of MEND's / EasyEdit's zsre_mend_eval.json, in its field layout.
    const ZSRE: &str = r#"{"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"}"#;

    #[test]
    fn counterfact_maps_to_a_fact_its_paraphrases_and_neighbors() {
        let r = parse(COUNTERFACT).unwrap();
        assert_eq!(r.shape, Shape::CounterFact);
        assert_eq!(r.fact.id, Some(serde_json::json!(0)));
        assert_eq!(r.fact.relation.as_deref(), Some("P103"));
        assert_eq!(r.fact.answer.as_deref(), Some("French"));
        assert_eq!(r.new_answer.as_deref(), Some("English"));
        assert_eq!(
            r.fact.prompts,
            Some(vec![
                "The mother tongue of Danielle Darrieux is [MASK]".to_string()
            ])
        );
        assert_eq!(r.paraphrases.len(), 2);
        assert!(r.paraphrases[1].ends_with("spoke the language [MASK]"));
        assert_eq!(
            r.locality,
            vec![
                LocalityPrompt {
                    prompt: "The mother tongue of L\u{e9}on Blum is [MASK]".into(),
                    answer: Some("French".into())
                },
                LocalityPrompt {
                    prompt: "The native language of Montesquieu is [MASK]".into(),
                    answer: Some("French".into())
                },
            ]
        );
    }

    #[test]
    fn zsre_maps_question_alt_rephrase_and_loc() {
        let r = parse(ZSRE).unwrap();
        assert_eq!(r.shape, Shape::Zsre);
        assert_eq!(r.fact.id, None);
        assert_eq!(r.fact.relation, None);
        assert_eq!(
            r.fact.answer.as_deref(),
            Some("Illinois Institute of Technology")
        );
        assert_eq!(r.new_answer.as_deref(), Some("University of Michigan"));
        assert_eq!(
            r.fact.prompts,
            Some(vec![
                "What university did Watts Humphrey attend? [MASK]".to_string()
            ])
        );
        assert_eq!(
            r.paraphrases,
            vec!["What university did Watts Humphrey take part in? [MASK]".to_string()]
        );
        assert_eq!(
            r.locality,
            vec![LocalityPrompt {
                prompt: "nq question: who played desmond doss father in hacksaw ridge [MASK]"
                    .into(),
                answer: Some("Hugo Weaving".into())
            }]
        );
        // An id, or a case_id, is kept as it is.
        let with_id = parse(&ZSRE.replacen('{', "{\"case_id\": \"z7\", ", 1)).unwrap();
        assert_eq!(with_id.fact.id, Some(serde_json::json!("z7")));
    }

    #[test]
    fn kn_lines_take_paraphrases_and_locality_as_strings_or_objects() {
        let r = parse(
            r#"{"id": "a", "new_answer": "rome", "paraphrases": ["france capital is [MASK] ."],
                "locality": ["the capital of italy is [MASK] .", {"prompt": "italy capital is [MASK] .", "answer": "rome"}]}"#,
        )
        .unwrap();
        assert_eq!(r.shape, Shape::Kn);
        assert_eq!(r.fact.id, Some(serde_json::json!("a")));
        assert_eq!(r.new_answer.as_deref(), Some("rome"));
        assert_eq!(
            r.paraphrases,
            vec!["france capital is [MASK] .".to_string()]
        );
        assert_eq!(r.locality[0].answer, None);
        assert_eq!(r.locality[1].answer.as_deref(), Some("rome"));
        // A plain kn line has neither.
        let plain = parse(r#"{"id": 3, "new_answer": "rome"}"#).unwrap();
        assert!(plain.paraphrases.is_empty() && plain.locality.is_empty());
    }

    #[test]
    fn mixed_or_incomplete_records_are_refused_by_name() {
        let mixed = parse(&COUNTERFACT.replacen('{', "{\"alt\": \"x\", ", 1)).unwrap_err();
        assert!(
            mixed.contains("mixes shapes") && mixed.contains("\"alt\""),
            "{mixed}"
        );
        let mixed = parse(&ZSRE.replacen('{', "{\"new_answer\": \"x\", ", 1)).unwrap_err();
        assert!(
            mixed.contains("ZsRE") && mixed.contains("\"new_answer\""),
            "{mixed}"
        );
        let no_new = parse(
            r#"{"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "x", "target_true": {"str": "y"}}}"#,
        )
        .unwrap_err();
        assert!(no_new.contains("target_new"), "{no_new}");
        let orphan = parse(r#"{"id": 1, "neighborhood_prompts": ["a is"]}"#).unwrap_err();
        assert!(orphan.contains("requested_rewrite"), "{orphan}");
        let no_alt = parse(r#"{"src": "who?", "answers": ["x"]}"#).unwrap_err();
        assert!(no_alt.contains("alt"), "{no_alt}");
        let no_braces = parse(
            r#"{"requested_rewrite": {"prompt": "x is in", "subject": "x", "target_new": {"str": "a"}, "target_true": {"str": "b"}}}"#,
        )
        .unwrap_err();
        assert!(no_braces.contains("{}"), "{no_braces}");
    }
}
