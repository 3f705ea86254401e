//! What a handler submits to the engine and what it gets back.

use std::sync::Arc;

use alora_cache::RequestKey;
use alora_model::text::prompt::TurnEnd;
use alora_model::{LoraAdapter, SamplingParams};
use tokio::sync::mpsc::UnboundedSender;

/// A validated generation request: token ids in, everything checked.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Where the adapter switches on (`alora_model::Prompt::activation_start`, found once
    /// when the prompt was built): `None` runs the base model.
    pub activation_start: Option<usize>,
    pub sampling: SamplingParams,
    /// Score the prompt: each prompt token's log-probability and this many alternatives
    /// (`/v1/completions` with `echo` and `logprobs`). The whole prompt is then computed,
    /// whatever the prefix cache holds.
    pub prompt_logprobs: Option<usize>,
    /// 0 (only with `prompt_logprobs` or `echo`): run the prompt, generate nothing.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Tokens generated before EOS, a stop id or a stop string may end the output.
    pub min_tokens: usize,
    /// Keep special tokens' text in the output (`skip_special_tokens: false`).
    pub keep_special_tokens: bool,
    /// Keep a matched stop string in the output (`include_stop_str_in_output`).
    pub include_stop_str: bool,
    /// A structured output's grammar state (each clone, one per choice, is independent).
    pub constraint: Option<alora_model::grammar::Constraint>,
    /// What decides this prompt's KV besides its ids (adapter digest, activation start, salt),
    /// computed once with the prompt (`openai::validate`).
    pub cache_key: RequestKey,
    /// A chat reply's turn end (the template's text after the reply's content, and its ids):
    /// when the reply finishes and the conversation sent back would render as prompt, reply,
    /// turn end, the engine computes the turn end's K/V ahead (`HttpConfig::close_turns`).
    pub turn_end: Option<Arc<TurnEnd>>,
}

/// Why a sequence finished: the model crate's one finish reason (`alora_model::OutputStream`
/// decides it for `generate` and the engine alike).
pub use alora_model::FinishReason as Finish;

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache at (first) admission.
    pub cached_tokens: usize,
}

/// A generated token with its text and log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Text this token completes (may be empty while a character or stop string is pending).
    pub text: String,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// The stream of events of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt's tokens, scored (only with `prompt_logprobs`), once the prompt has run and
    /// before any generated token. The first has no log-probability.
    Prompt(Vec<TokenEvent>),
    Token(TokenEvent),
    /// Text released at the end (held-back bytes), then the finish.
    Done {
        text: String,
        finish: Finish,
        usage: Usage,
    },
    /// The engine failed this request; the server keeps serving.
    Error(EngineError),
}

/// Why the engine failed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The request can never fit the KV cache (even with nothing else running).
    CacheTooSmall {
        /// Tokens whose KV the request needs at once.
        needed_tokens: usize,
        /// Tokens the whole cache holds.
        capacity_tokens: usize,
    },
    /// The model did not load.
    NotLoaded,
    /// This request's own forward failed (its step neighbours were re-run without it).
    Step,
    /// This request's structured-output grammar failed mid-generation.
    Grammar(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::CacheTooSmall {
                needed_tokens,
                capacity_tokens,
            } => write!(
                f,
                "the request needs KV for {needed_tokens} tokens but the KV cache holds \
                 {capacity_tokens} tokens in all"
            ),
            EngineError::NotLoaded => write!(f, "model failed to load"),
            EngineError::Grammar(e) => write!(f, "structured output failed: {e}"),
            EngineError::Step => write!(f, "internal error in the model step"),
        }
    }
}

pub(crate) type EventTx = UnboundedSender<Event>;
