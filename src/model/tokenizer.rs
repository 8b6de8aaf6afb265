//! Tokenizing cloze prompts (one `[MASK]`) and single-token answers, for masked LMs
//! (the mask token stands where the answer goes) and causal LMs (the prompt ends where
//! the answer goes: the last prompt token predicts it).

use std::path::Path;

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::files::TokenizerFiles;
use crate::data::pararel::AnswerVocab;
pub use crate::data::MASK_PLACEHOLDER;
use crate::error::{Error, Result};

/// A prompt ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// Token ids, with the model's special tokens (`[CLS] … [SEP]`, a causal model's BOS).
    pub ids: Vec<u32>,
    /// The tokens, for messages and output.
    pub tokens: Vec<String>,
    /// Where the answer is read: the mask token's index in `ids` (masked LMs), or the
    /// last prompt token's, whose output predicts the next token (causal LMs).
    pub mask_position: usize,
    /// Causal LMs: the text after `[MASK]` that was dropped (a final period), if any.
    pub dropped: Option<String>,
}

/// A tokenizer that knows how the model reads a cloze prompt and checks prompts and
/// answers.
#[derive(Debug, Clone)]
pub struct MaskTokenizer {
    inner: Tokenizer,
    /// The mask token of a masked LM; `None` for a causal LM.
    mask: Option<(String, u32)>,
    unk_id: Option<u32>,
    /// Longer prompts (in bytes) are refused before they are tokenized.
    max_prompt_bytes: usize,
}

/// The bytes of prompt text allowed per model position: see
/// [`MaskTokenizer::limit_prompt_length`].
pub const MAX_BYTES_PER_POSITION: usize = 64;

/// Text after `[MASK]` that a causal prompt may end with and that is dropped: white
/// space and sentence punctuation.
fn is_droppable(c: char) -> bool {
    c.is_whitespace() || matches!(c, '.' | '!' | '?' | ',' | ';' | ':' | '"' | '\'' | ')')
}

impl MaskTokenizer {
    /// A causal LM's tokenizer (no mask token: prompts end where the answer goes),
    /// from a `tokenizers` tokenizer (e.g. one built from a GGUF file's metadata).
    pub fn causal(inner: Tokenizer, path: &Path) -> Result<Self> {
        let mut inner = inner;
        inner
            .with_truncation(None)
            .map_err(|e| Error::model(path, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            mask: None,
            unk_id: None,
            max_prompt_bytes: usize::MAX,
        })
    }

    /// A causal LM's tokenizer from `tokenizer.json`.
    pub fn load_causal(files: &TokenizerFiles) -> Result<Self> {
        match files {
            TokenizerFiles::Json(path) => {
                let tok = Tokenizer::from_file(path)
                    .map_err(|e| Error::model(path, format!("cannot read tokenizer: {e}")))?;
                Self::causal(tok, path)
            }
            TokenizerFiles::Vocab { vocab, .. } => Err(Error::model(
                vocab,
                "a causal language model needs a tokenizer.json (vocab.txt is BERT's WordPiece)",
            )),
            TokenizerFiles::Gguf(path) => Self::causal(super::gguf::read(path)?.tokenizer, path),
        }
    }

    /// The tokenizer of `files` as its model reads prompts: causal for a GGUF file or a
    /// directory whose `config.json` names a decoder, masked otherwise.
    pub fn for_model(files: &TokenizerFiles) -> Result<Self> {
        let directory = match files {
            TokenizerFiles::Gguf(_) => return Self::load_causal(files),
            TokenizerFiles::Json(path) => path.parent(),
            TokenizerFiles::Vocab { vocab, .. } => vocab.parent(),
        };
        let config = directory
            .map(|d| d.join("config.json"))
            .filter(|c| c.is_file());
        match config {
            Some(config) if super::Config::from_file(&config)?.architecture.is_causal() => {
                Self::load_causal(files)
            }
            _ => Self::load(files),
        }
    }

    /// Whether prompts end where the answer goes (a causal LM's tokenizer).
    pub fn is_causal(&self) -> bool {
        self.mask.is_none()
    }

    /// The underlying `tokenizers` tokenizer (to save it beside an edited model).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Loads a masked LM's `tokenizer.json`, or builds a BERT WordPiece tokenizer from
    /// `vocab.txt`.
    pub fn load(files: &TokenizerFiles) -> Result<Self> {
        let (inner, path, config) = match files {
            TokenizerFiles::Json(path) => {
                let tok = Tokenizer::from_file(path)
                    .map_err(|e| Error::model(path, format!("cannot read tokenizer: {e}")))?;
                let config = path
                    .parent()
                    .map(|d| d.join("tokenizer_config.json"))
                    .filter(|p| p.is_file());
                (
                    tok,
                    path.as_path(),
                    read_tokenizer_config(config.as_deref())?,
                )
            }
            TokenizerFiles::Vocab { vocab, config } => {
                let config = read_tokenizer_config(config.as_deref())?;
                (
                    wordpiece_from_vocab(vocab, &config)?,
                    vocab.as_path(),
                    config,
                )
            }
            TokenizerFiles::Gguf(path) => {
                return Err(Error::model(
                    path,
                    "a GGUF file holds a causal language model, which has no mask token",
                ))
            }
        };
        let mut inner = inner;
        // Truncation would silently cut the [MASK] off a long prompt, and padding would
        // change the input: kn checks lengths itself.
        inner
            .with_truncation(None)
            .map_err(|e| Error::model(path, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);

        let mask_token = special_token(&config, "mask_token")
            .or_else(|| {
                ["[MASK]", "<mask>"]
                    .into_iter()
                    .find(|t| inner.token_to_id(t).is_some())
                    .map(str::to_string)
            })
            .ok_or_else(|| Error::model(path, "the vocabulary has no mask token ([MASK])"))?;
        let mask_id = inner.token_to_id(&mask_token).ok_or_else(|| {
            Error::model(
                path,
                format!("mask token {mask_token:?} is not in the vocabulary"),
            )
        })?;
        let unk_token = special_token(&config, "unk_token").unwrap_or_else(|| "[UNK]".into());
        let unk_id = inner.token_to_id(&unk_token);
        Ok(Self {
            inner,
            mask: Some((mask_token, mask_id)),
            unk_id,
            max_prompt_bytes: usize::MAX,
        })
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's mask token (`None` for a causal LM).
    pub fn mask_token(&self) -> Option<&str> {
        self.mask.as_ref().map(|(token, _)| token.as_str())
    }

    /// The id of the unknown token, when the vocabulary has one.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// The token string of an id: the vocabulary entry (masked LMs), or its decoded
    /// text for a causal LM (" Paris" rather than the byte-level "ĠParis").
    pub fn token(&self, id: u32) -> String {
        if self.is_causal() {
            if let Ok(text) = self.inner.decode(&[id], false) {
                if !text.is_empty() {
                    return text;
                }
            }
        }
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id}>"))
    }

    /// Refuses, before tokenizing, prompts longer than `positions` (the model's
    /// `max_position_embeddings`) × [`MAX_BYTES_PER_POSITION`] bytes.
    ///
    /// Tokenizing costs memory in proportion to the text (about 80 bytes per input byte),
    /// so a huge prompt must be refused before it, from its length alone. A prompt
    /// that long would need more positions than the model has unless its tokens covered
    /// more than 64 bytes each on average. Word pieces are a few bytes long; the few
    /// vocabulary entries near 64 bytes are runs of one character (dashes, spaces), and a
    /// WordPiece tokenizer maps an overlong word whole to `[UNK]`: only text made mostly of
    /// such runs or non-words could fit, and no cloze prompt is written so. Prompts under
    /// the bound but over the positions are still refused after tokenizing.
    pub fn limit_prompt_length(&mut self, positions: usize) {
        self.max_prompt_bytes = positions.saturating_mul(MAX_BYTES_PER_POSITION);
    }

    /// Tokenizes a prompt that holds exactly one `[MASK]` (for a causal LM, at its end).
    pub fn encode_prompt(&self, prompt: &str) -> Result<EncodedPrompt> {
        if prompt.len() > self.max_prompt_bytes {
            return Err(Error::Prompt(format!(
                "prompt is {} bytes long, more than the model's {} positions can hold ({} \
                 bytes at most, {MAX_BYTES_PER_POSITION} per position); refused before \
                 tokenizing",
                prompt.len(),
                self.max_prompt_bytes / MAX_BYTES_PER_POSITION,
                self.max_prompt_bytes
            )));
        }
        let occurrences = prompt.matches(MASK_PLACEHOLDER).count();
        if occurrences == 0 {
            return Err(Error::Prompt(format!(
                "prompt has no {MASK_PLACEHOLDER}: {prompt:?}"
            )));
        }
        if occurrences > 1 {
            return Err(Error::Prompt(format!(
                "prompt has {occurrences} {MASK_PLACEHOLDER} tokens; kn needs exactly one: {prompt:?}"
            )));
        }
        let Some((mask_token, mask_id)) = &self.mask else {
            return self.encode_causal_prompt(prompt);
        };
        let text = prompt.replace(MASK_PLACEHOLDER, mask_token);
        let encoding = self
            .inner
            .encode(text.as_str(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids = encoding.get_ids().to_vec();
        let masks: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| id == *mask_id)
            .map(|(i, _)| i)
            .collect();
        match masks.as_slice() {
            [position] => Ok(EncodedPrompt {
                tokens: encoding.get_tokens().to_vec(),
                ids,
                mask_position: *position,
                dropped: None,
            }),
            [] => Err(Error::Prompt(format!(
                "the tokenizer did not keep {MASK_PLACEHOLDER} as one token in {prompt:?}"
            ))),
            _ => Err(Error::Prompt(format!(
                "prompt holds {} mask tokens after tokenization; kn needs exactly one: {prompt:?}",
                masks.len()
            ))),
        }
    }

    /// A causal prompt: `[MASK]` at the end (white space and punctuation after it are
    /// dropped); the model reads the text before it, trailing white space removed.
    fn encode_causal_prompt(&self, prompt: &str) -> Result<EncodedPrompt> {
        let (before, after) = prompt
            .split_once(MASK_PLACEHOLDER)
            .expect("one [MASK], checked by the caller");
        if !after.chars().all(is_droppable) {
            return Err(Error::Prompt(format!(
                "{MASK_PLACEHOLDER} must end the prompt for a causal language model (it predicts \
                 the next token), but {after:?} follows it: {prompt:?}"
            )));
        }
        let text = before.trim_end();
        let (ids, tokens) = self.encode_text(text)?;
        if ids.is_empty() {
            return Err(Error::Prompt(format!(
                "prompt has no text before {MASK_PLACEHOLDER}: {prompt:?}"
            )));
        }
        let dropped = after.trim();
        Ok(EncodedPrompt {
            mask_position: ids.len() - 1,
            ids,
            tokens,
            dropped: (!dropped.is_empty()).then(|| dropped.to_string()),
        })
    }

    /// Checks that `answer` (token `answer_id`) stands as its own token in `prompt`:
    /// written in place of the mask, the prompt must tokenize to its own tokens with the
    /// answer at the mask (masked LMs), or followed by exactly the answer token (causal
    /// LMs). The error names the pieces the answer became.
    pub fn check_answer(
        &self,
        prompt: &str,
        encoded: &EncodedPrompt,
        answer: &str,
        answer_id: u32,
    ) -> Result<()> {
        let (filled, expected) = if self.is_causal() {
            let before = prompt
                .split_once(MASK_PLACEHOLDER)
                .map_or(prompt, |(b, _)| b);
            let mut expected = encoded.ids.clone();
            expected.push(answer_id);
            (format!("{before}{}", answer.trim()), expected)
        } else {
            let mut expected = encoded.ids.clone();
            expected[encoded.mask_position] = answer_id;
            (prompt.replace(MASK_PLACEHOLDER, answer.trim()), expected)
        };
        let (ids, _) = self.encode_text(&filled)?;
        if ids == expected {
            return Ok(());
        }
        let tokens: Vec<String> = ids.iter().map(|&id| self.token(id)).collect();
        // The pieces the answer became: the tokens past the common start.
        let common = ids
            .iter()
            .zip(&expected)
            .take_while(|(a, b)| a == b)
            .count();
        let pieces = &tokens[common.min(tokens.len())..];
        Err(Error::Prompt(format!(
            "the answer {answer:?} does not stand as its own token here: with it in place of \
             {MASK_PLACEHOLDER} the prompt tokenizes as {tokens:?} (the answer's part: {pieces:?})"
        )))
    }

    /// Tokenizes any text with the model's special tokens (`[CLS] … [SEP]`): ids and tokens.
    pub fn encode_text(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_tokens().to_vec()))
    }

    /// The id of an answer that must be exactly one vocabulary token: the word itself
    /// for a masked LM, the word after a space (" Paris") for a causal LM, whose
    /// byte-level tokens carry the space before a word.
    pub fn answer_id(&self, answer: &str) -> Result<u32> {
        let text = if self.is_causal() {
            format!(" {}", answer.trim())
        } else {
            answer.trim().to_string()
        };
        if answer.trim().is_empty() {
            return Err(Error::Prompt(format!("answer {answer:?} is empty")));
        }
        let encoding = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        match encoding.get_ids() {
            [] => Err(Error::Prompt(format!("answer {answer:?} is empty"))),
            [id] if Some(*id) == self.unk_id => Err(Error::Prompt(format!(
                "answer {answer:?} is not in the vocabulary (it becomes {})",
                self.token(*id)
            ))),
            [id] => Ok(*id),
            ids => Err(Error::Prompt(format!(
                "answer {answer:?} is not a single token of the vocabulary: it becomes {:?}",
                ids.iter().map(|&id| self.token(id)).collect::<Vec<_>>()
            ))),
        }
    }
}

impl AnswerVocab for MaskTokenizer {
    fn answer_id(&self, answer: &str) -> Result<u32> {
        MaskTokenizer::answer_id(self, answer)
    }
}

/// `tokenizer_config.json` as JSON, or an empty object.
fn read_tokenizer_config(path: Option<&Path>) -> Result<serde_json::Value> {
    let Some(path) = path else {
        return Ok(serde_json::Value::Object(Default::default()));
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("not valid JSON: {e}")))
}

/// A special token from `tokenizer_config.json`: a string, or `{"content": …}`.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

/// BERT's WordPiece tokenizer from `vocab.txt`, as `transformers.BertTokenizer` builds it.
fn wordpiece_from_vocab(vocab: &Path, config: &serde_json::Value) -> Result<Tokenizer> {
    let bad = |e: tokenizers::Error| Error::model(vocab, format!("cannot read vocabulary: {e}"));
    let text = std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?;
    let words: Vec<&str> = text.lines().map(str::trim_end).collect();
    let lowercase = match config.get("do_lower_case").and_then(|v| v.as_bool()) {
        Some(lower) => lower,
        None => default_lowercase(&words),
    };
    let unk = special_token(config, "unk_token").unwrap_or_else(|| "[UNK]".into());
    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token(unk)
        .build()
        .map_err(bad)?;
    let mut tok = Tokenizer::new(model);
    let chinese = config
        .get("tokenize_chinese_chars")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let strip_accents = config.get("strip_accents").and_then(|v| v.as_bool());
    tok.with_normalizer(Some(BertNormalizer::new(
        true,
        chinese,
        strip_accents,
        lowercase,
    )));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_decoder(Some(WordPieceDecoder::default()));
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::model(vocab, format!("the vocabulary has no {t} token")))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".to_string(), sep),
        ("[CLS]".to_string(), cls),
    )));
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .into_iter()
        .filter(|t| words.contains(t))
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

/// `transformers` lower-cases by default, but a vocabulary with upper-case words and
/// no lower-case ones (a cased or protein model) would then map every word to [UNK].
fn default_lowercase(words: &[&str]) -> bool {
    let is_special = |w: &str| w.starts_with('[') && w.ends_with(']');
    let has_upper = words
        .iter()
        .any(|w| !is_special(w) && w.chars().any(|c| c.is_uppercase()));
    let has_lower = words
        .iter()
        .any(|w| !is_special(w) && w.chars().any(|c| c.is_lowercase()));
    has_lower || !has_upper
}
