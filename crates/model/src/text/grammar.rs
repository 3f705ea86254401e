//! Structured outputs: a grammar (JSON schema, regex, choice, Lark) compiled by llguidance over
//! the model's tokenizer, and one [`Constraint`] per sequence that masks the logits each step to
//! the tokens the grammar allows.
//!
//! llguidance (the engine vLLM's `guidance` backend and mistral.rs use) needs each token's
//! bytes. They come from the tokenizer alora already loads ([`token_bytes`]): byte-level BPE
//! tokens through GPT-2's byte table, byte-fallback tokens (`<0x41>`, `▁`) as such, special
//! tokens marked so no grammar ever emits them as text. (`toktrie_hf_tokenizers` does the same,
//! but pins another version of `tokenizers`.)

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use tokenizers::DecoderWrapper;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::text::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema (`response_format.json_schema.schema`, `structured_outputs.json`).
    JsonSchema(Value),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A regular expression over the whole output.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

impl GrammarSpec {
    fn to_grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s.clone())),
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            GrammarSpec::Choice(c) => {
                if c.is_empty() {
                    return Err("the choice list is empty".into());
                }
                // Lark string literals take JSON's escapes.
                let alts: Vec<String> = c
                    .iter()
                    .map(|s| serde_json::to_string(s).expect("a string serializes"))
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// JSON is generated compact (no whitespace between its tokens: small models otherwise emit
/// whitespace until the token limit), unless the schema carries llguidance's own `x-guidance`
/// options.
fn compact(schema: Value) -> Value {
    let mut schema = match schema {
        Value::Bool(true) => serde_json::json!({}),
        s => s,
    };
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// Every token's bytes as llguidance sees them (special tokens behind
/// [`TokTrie::SPECIAL_TOKEN_MARKER`]); tokens past the tokenizer's vocabulary are empty, so no
/// grammar allows them.
pub fn token_bytes(tok: &Tokenizer, vocab_size: usize) -> Vec<Vec<u8>> {
    let inner = tok.inner();
    fn find(d: &DecoderWrapper, byte_level: &mut bool, fallback: &mut bool) {
        match d {
            DecoderWrapper::ByteLevel(_) => *byte_level = true,
            DecoderWrapper::ByteFallback(_) => *fallback = true,
            DecoderWrapper::Sequence(s) => {
                for d in s.get_decoders() {
                    find(d, byte_level, fallback);
                }
            }
            _ => {}
        }
    }
    let (mut byte_level, mut fallback) = (false, false);
    if let Some(d) = inner.get_decoder() {
        find(d, &mut byte_level, &mut fallback);
    }
    let byte_of = gpt2_byte_table();
    let special: HashMap<u32, String> = inner
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, t)| (id, t.content))
        .collect();
    (0..vocab_size as u32)
        .map(|id| {
            if let Some(s) = special.get(&id) {
                let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                b.extend_from_slice(s.as_bytes());
                return b;
            }
            let Some(name) = inner.id_to_token(id) else {
                return Vec::new();
            };
            if byte_level {
                // A char outside the table (a token added as plain text) is its own UTF-8.
                let mut out = Vec::with_capacity(name.len());
                for c in name.chars() {
                    match byte_of.get(&c) {
                        Some(b) => out.push(*b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                out
            } else if fallback {
                match name
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => vec![b],
                    None => name.replace('▁', " ").into_bytes(),
                }
            } else {
                name.into_bytes()
            }
        })
        .collect()
}

/// [`token_bytes`] with special tokens as their plain text (logprobs' `bytes`).
pub fn unmark_special(words: &mut [Vec<u8>]) {
    for w in words {
        if w.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
            w.remove(0);
        }
    }
}

/// GPT-2's byte-level alphabet: the char each byte is written as, reversed.
fn gpt2_byte_table() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                let c = char::from_u32(next).expect("below the surrogates");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

struct Env {
    trie: TokTrie,
    tok: Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // llguidance tokenizes grammar-forced text; invalid UTF-8 cannot be encoded as text.
        self.tok
            .encode(&String::from_utf8_lossy(s))
            .unwrap_or_default()
    }
}

/// The model's grammar compiler: built once (the token trie and llguidance's token slices),
/// shared by every request.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// For a model with `vocab_size` logits whose first EOS id is `tok.eos_token_ids[0]`.
    pub fn new(tok: &Tokenizer, vocab_size: usize) -> Result<Self, String> {
        let words = token_bytes(tok, vocab_size);
        let eos = tok.eos_token_ids.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let env: TokEnv = Arc::new(Env {
            trie: TokTrie::from(&info, &words),
            tok: tok.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Compiles `spec`; an error says what is wrong with it (a bad schema, regex or grammar).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let parser = self
            .factory
            .create_parser(spec.to_grammar()?)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    /// An independent copy (each of `n` choices runs its own).
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// The tokens allowed next (EOS among them once the output may end).
    pub fn allowed(&mut self) -> Result<SimpleVob, String> {
        self.matcher.compute_mask().map_err(|e| e.to_string())
    }

    /// Advances past the sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows no further token.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}
