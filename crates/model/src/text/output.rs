//! The one output state machine: sampled ids in, final text pieces and one finish reason out.
//! `generate` (one sequence) and the server's engine (many) both run it, so EOS, stop ids,
//! stop strings, the length limit and the release of held-back text work the same in both.
//!
//! Per sampled token: an EOS (unless ignored) or a stop id finishes with `Stop` and is not part
//! of the output; otherwise the token is appended, detokenized incrementally (bytes of an
//! incomplete character are held back) and checked against the stop strings (text that could
//! still become one is held back; a match finishes with `Stop` and cuts the text before it);
//! reaching the token limit finishes with `Length`. On any finish, [`OutputStream::finish`]
//! releases what was held back unless a stop string cut the output.

use crate::text::sampling::{StopCheck, StopStrings};
use crate::text::tokenizer::{IncrementalDecoder, Tokenizer};

/// Why generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// The token limit (`max_tokens`, or the model's context) reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What ends a sequence's output.
#[derive(Debug, Clone, Default)]
pub struct OutputLimits {
    /// Tokens to generate at most (the caller folds the context limit in).
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Tokens to generate before EOS, a stop id or a stop string may end the output (vLLM's
    /// `min_tokens`): until then the sampler must not pick an EOS (even an ignored one, as
    /// vLLM bans it) or a stop id ([`OutputStream::is_held_id`], [`OutputStream::may_stop`]),
    /// and stop strings that complete are passed over (one completing at the `min_tokens`-th
    /// token or later ends the output, even if it began earlier).
    pub min_tokens: usize,
    /// Keep special tokens' text in the output (vLLM's `skip_special_tokens: false`).
    pub keep_special_tokens: bool,
    /// Keep a matched stop string in the output (vLLM's `include_stop_str_in_output`).
    pub include_stop_str: bool,
}

/// What one sampled token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Whether the token is part of the output (false for an EOS or stop id).
    pub appended: bool,
    /// Text it completes, safe to send (may be empty).
    pub text: String,
    pub finish: Option<FinishReason>,
}

/// One sequence's output state.
#[derive(Debug, Clone)]
pub struct OutputStream {
    limits: OutputLimits,
    /// The tokenizer's EOS ids: they end the output unless `limits.ignore_eos`, and
    /// `min_tokens` holds them off either way.
    eos_token_ids: Vec<u32>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    generated: usize,
    cut_by_stop_string: bool,
}

impl OutputStream {
    /// `eos_token_ids`: the tokenizer's (they end nothing when `limits.ignore_eos`).
    pub fn new(limits: OutputLimits, eos_token_ids: &[u32]) -> Self {
        let decoder = IncrementalDecoder::new(!limits.keep_special_tokens);
        OutputStream {
            stops: StopStrings::new(limits.stop.clone()).including_stop(limits.include_stop_str),
            eos_token_ids: eos_token_ids.to_vec(),
            limits,
            decoder,
            generated: 0,
            cut_by_stop_string: false,
        }
    }

    /// Tokens appended so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Whether the next sampled token may be an EOS or a stop id: `min_tokens` tokens are out
    /// (vLLM bans them while fewer are).
    pub fn may_stop(&self) -> bool {
        self.generated >= self.limits.min_tokens
    }

    /// An id that ends the output when sampled (an EOS unless ignored, or a stop id).
    pub fn is_stop_id(&self, t: u32) -> bool {
        (!self.limits.ignore_eos && self.eos_token_ids.contains(&t))
            || self.limits.stop_token_ids.contains(&t)
    }

    /// What the sampler must not pick while [`Self::may_stop`] is false: an EOS, ignored or
    /// not (vLLM's min-tokens processor bans the model's EOS with `ignore_eos` too, so
    /// `ignore_eos` + `min_tokens` gives that many tokens of text before any EOS), or a stop id.
    pub fn is_held_id(&self, t: u32) -> bool {
        self.eos_token_ids.contains(&t) || self.limits.stop_token_ids.contains(&t)
    }

    /// Whether the limit allows no token at all (then nothing should be sampled).
    pub fn is_empty_limit(&self) -> bool {
        self.limits.max_tokens == 0
    }

    /// The output text so far (what was released, stop string excluded).
    pub fn text_so_far(&self) -> &str {
        self.stops.text_so_far()
    }

    /// Feeds one sampled token. A detokenization failure is logged and yields no text (the
    /// token still counts).
    pub fn push(&mut self, tok: &Tokenizer, t: u32) -> Pushed {
        if self.is_stop_id(t) {
            return Pushed {
                appended: false,
                text: String::new(),
                finish: Some(FinishReason::Stop),
            };
        }
        self.generated += 1;
        let can_stop = self.generated >= self.limits.min_tokens;
        let mut finish = None;
        let text = match self.decoder.push(tok, t) {
            Ok(Some(piece)) => match self.stops.push_with(&piece, can_stop) {
                StopCheck::Continue(x) => x,
                StopCheck::Stopped(x) => {
                    finish = Some(FinishReason::Stop);
                    self.cut_by_stop_string = true;
                    x
                }
            },
            Ok(None) => String::new(),
            Err(e) => {
                tracing::warn!("detokenization failed: {e}");
                String::new()
            }
        };
        if finish.is_none() && self.generated >= self.limits.max_tokens {
            finish = Some(FinishReason::Length);
        }
        Pushed {
            appended: true,
            text,
            finish,
        }
    }

    /// At the end (any finish): the text held back (an incomplete character, a possible
    /// stop-string prefix), unless a stop string already cut the output.
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        let mut text = String::new();
        if self.cut_by_stop_string {
            return text;
        }
        match self.decoder.flush(tok) {
            Ok(Some(rest)) => match self.stops.push(&rest) {
                StopCheck::Continue(x) => text.push_str(&x),
                StopCheck::Stopped(x) => {
                    text.push_str(&x);
                    self.cut_by_stop_string = true;
                    return text;
                }
            },
            Ok(None) => {}
            Err(e) => tracing::warn!("detokenization failed: {e}"),
        }
        text.push_str(&self.stops.flush());
        text
    }
}
