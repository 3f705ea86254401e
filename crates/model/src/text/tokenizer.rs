//! Tokenizer (HF `tokenizer.json` or GGUF metadata), special tokens, and incremental
//! detokenization that never splits a UTF-8 character.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// A tokenizer plus what chat rendering and stopping need from the model's files.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that end generation (EOS and the template's end-of-turn, when distinct).
    pub eos_token_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

pub(crate) fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// `bos_token` etc. in tokenizer_config.json: a string or `{"content": ...}`.
fn special(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// From an HF model directory: `tokenizer.json` and, when present, `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(tok_err)?;
        let cfg: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(t) => serde_json::from_str(&t).map_err(tok_err)?,
            Err(_) => Value::Null,
        };
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let mut t = Tokenizer {
            inner,
            bos_token: special(cfg.get("bos_token")),
            eos_token: special(cfg.get("eos_token")),
            eos_token_ids: config_eos.to_vec(),
            chat_template,
        };
        t.add_eos_from_token();
        Ok(t)
    }

    /// From a built tokenizer and the special tokens around it (a GGUF file's metadata, for
    /// one: `loader::tokenizer_from_gguf`). The EOS token's id joins `eos_token_ids`.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        eos_token_ids: Vec<u32>,
        chat_template: Option<String>,
    ) -> Self {
        let mut t = Tokenizer {
            inner,
            bos_token,
            eos_token,
            eos_token_ids,
            chat_template,
        };
        t.add_eos_from_token();
        t
    }

    fn add_eos_from_token(&mut self) {
        if let Some(id) = self
            .eos_token
            .as_deref()
            .and_then(|e| self.inner.token_to_id(e))
        {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text` without added special tokens (the template adds its own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Turns generated ids into text pieces as they arrive, holding back bytes that do not yet
/// form a complete UTF-8 character (the prefix/read-offset scheme of TGI and vLLM).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> Self {
        IncrementalDecoder {
            skip_special,
            ..Default::default()
        }
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        // Decoding from a few tokens back keeps word-boundary spaces right.
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever is held back (an incomplete character at the end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full
            .strip_prefix(prefix.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}
