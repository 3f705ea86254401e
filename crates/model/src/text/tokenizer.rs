//! Tokenizer (HF `tokenizer.json` or GGUF metadata), special tokens, exact incremental
//! tokenization of long prompts, and incremental detokenization that never splits a UTF-8
//! character.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

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
    /// Splits long texts at added tokens and caches the pieces' ids (`None` when this
    /// tokenizer's settings make that inexact).
    segments: Option<Arc<Segmenter>>,
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
            segments: Segmenter::for_tokenizer(&inner).map(Arc::new),
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
            segments: Segmenter::for_tokenizer(&inner).map(Arc::new),
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

    /// Token ids of `text` without added special tokens (the template adds its own). A long
    /// text goes piece by piece between its added tokens, each long piece's ids cached
    /// ([`Segmenter`]): the same ids, and a conversation's earlier turns are not tokenized
    /// again on its next request.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.segments {
            Some(s) if text.len() >= SEGMENT_MIN_TEXT => s.encode(&self.inner, text),
            _ => encode_whole(&self.inner, text),
        }
    }

    /// [`encode`](Self::encode) without the piece cache: the tokenizer library's own answer.
    pub fn encode_uncached(&self, text: &str) -> Result<Vec<u32>> {
        encode_whole(&self.inner, text)
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

fn encode_whole(inner: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(inner
        .encode(text, false)
        .map_err(tok_err)?
        .get_ids()
        .to_vec())
}

/// Texts shorter than this are tokenized whole (bytes).
const SEGMENT_MIN_TEXT: usize = 2048;
/// Pieces at least this long have their ids cached (bytes).
const SEGMENT_CACHE_MIN: usize = 512;
/// The cache's bound on the text it keeps (bytes); the least recently used pieces go first.
const SEGMENT_CACHE_BYTES: usize = 16 << 20;

/// Exact incremental tokenization. The tokenizers library first splits a text at its added
/// tokens that match unnormalized (leftmost-longest), then normalizes, pre-tokenizes and runs
/// the model on each piece between them on its own; so the ids of a text are the ids of those
/// pieces, each tokenized alone, with the added tokens' ids between. This does that split
/// itself and caches the ids of long pieces: a conversation's long turns, which every later
/// request on the conversation (a base turn, each intrinsic call) renders again unchanged.
///
/// Only for tokenizers where the split is the library's: no added token that strips
/// whitespace or must be a single word, no truncation or padding.
struct Segmenter {
    /// Unnormalized added tokens by first byte, longest first: (content, id).
    by_first: HashMap<u8, Vec<(String, u32)>>,
    cache: Mutex<PieceCache>,
}

#[derive(Default)]
struct PieceCache {
    ids: HashMap<String, (Arc<[u32]>, u64)>,
    bytes: usize,
    clock: u64,
}

impl Segmenter {
    fn for_tokenizer(t: &tokenizers::Tokenizer) -> Option<Segmenter> {
        if t.get_truncation().is_some() || t.get_padding().is_some() {
            return None;
        }
        let mut by_first: HashMap<u8, Vec<(String, u32)>> = HashMap::new();
        for (id, tok) in t.get_added_tokens_decoder() {
            if tok.single_word || tok.lstrip || tok.rstrip {
                return None;
            }
            if tok.normalized || tok.content.is_empty() {
                // Matched after normalization, inside the pieces: the library does that there.
                continue;
            }
            by_first
                .entry(tok.content.as_bytes()[0])
                .or_default()
                .push((tok.content, id));
        }
        for v in by_first.values_mut() {
            v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        }
        Some(Segmenter {
            by_first,
            cache: Mutex::default(),
        })
    }

    /// The leftmost-longest added token at or after byte `from`: (start, end, id).
    fn next_match(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        let bytes = text.as_bytes();
        (from..bytes.len()).find_map(|i| {
            let cands = self.by_first.get(&bytes[i])?;
            cands
                .iter()
                .find(|(c, _)| bytes[i..].starts_with(c.as_bytes()))
                .map(|(c, id)| (i, i + c.len(), *id))
        })
    }

    fn encode(&self, inner: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut at = 0;
        loop {
            let m = self.next_match(text, at);
            let end = m.map_or(text.len(), |(s, _, _)| s);
            if end > at {
                self.piece(inner, &text[at..end], &mut ids)?;
            }
            match m {
                Some((_, stop, id)) => {
                    ids.push(id);
                    at = stop;
                }
                None => return Ok(ids),
            }
        }
    }

    /// The ids of one piece between added tokens, from the cache when it is long.
    fn piece(&self, inner: &tokenizers::Tokenizer, piece: &str, ids: &mut Vec<u32>) -> Result<()> {
        if piece.len() < SEGMENT_CACHE_MIN {
            ids.extend(encode_whole(inner, piece)?);
            return Ok(());
        }
        {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            c.clock += 1;
            let now = c.clock;
            if let Some((hit, used)) = c.ids.get_mut(piece) {
                *used = now;
                ids.extend_from_slice(hit);
                return Ok(());
            }
        }
        let fresh: Arc<[u32]> = encode_whole(inner, piece)?.into();
        ids.extend_from_slice(&fresh);
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let now = c.clock;
        if c.ids.insert(piece.to_string(), (fresh, now)).is_none() {
            c.bytes += piece.len();
        }
        if c.bytes > SEGMENT_CACHE_BYTES {
            // Drop the least recently used until a quarter is free.
            let mut by_age: Vec<(u64, usize, String)> = c
                .ids
                .iter()
                .map(|(k, (_, used))| (*used, k.len(), k.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, len, k) in by_age {
                if c.bytes <= SEGMENT_CACHE_BYTES / 4 * 3 {
                    break;
                }
                c.ids.remove(&k);
                c.bytes -= len;
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::AddedToken;

    /// The test suite's character tokenizer (ChatML markers special), from its file.
    fn char_tokenizer() -> tokenizers::Tokenizer {
        let dir = std::env::temp_dir().join(format!("alora-seg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::testing::write_char_tokenizer(&dir).unwrap();
        let t = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        t
    }

    #[test]
    fn pieces_split_at_added_tokens_leftmost_longest() {
        let mut inner = char_tokenizer();
        // A longer marker sharing a prefix with a shorter one: the longer wins where both match.
        inner
            .add_special_tokens(vec![AddedToken::from("<|im_start|>x", true)])
            .unwrap();
        let s = Segmenter::for_tokenizer(&inner).unwrap();
        let id = |t: &str| inner.token_to_id(t).unwrap();
        let text = "ab<|im_start|>xy<|im_start|>z<|im_end|><|im_end|>";
        assert_eq!(s.next_match(text, 0), Some((2, 15, id("<|im_start|>x"))));
        assert_eq!(s.next_match(text, 15), Some((16, 28, id("<|im_start|>"))));
        let long = text.repeat(80);
        let whole = encode_whole(&inner, &long).unwrap();
        assert_eq!(s.encode(&inner, &long).unwrap(), whole);
        // Again, through the cache (one piece of ~1,000 bytes).
        let cached = format!("{}<|im_end|>{long}", "q".repeat(1000));
        for _ in 0..2 {
            assert_eq!(
                s.encode(&inner, &cached).unwrap(),
                encode_whole(&inner, &cached).unwrap()
            );
        }
        assert_eq!(s.cache.lock().unwrap().ids.len(), 1);
    }

    #[test]
    fn tokenizers_the_split_would_not_match_tokenize_whole() {
        let mut inner = char_tokenizer();
        assert!(Segmenter::for_tokenizer(&inner).is_some());
        inner
            .add_special_tokens(vec![AddedToken::from("<sep>", true).lstrip(true)])
            .unwrap();
        assert!(Segmenter::for_tokenizer(&inner).is_none(), "lstrip");
        let mut inner = char_tokenizer();
        inner
            .with_truncation(Some(tokenizers::TruncationParams::default()))
            .unwrap();
        assert!(Segmenter::for_tokenizer(&inner).is_none(), "truncation");
    }
}
