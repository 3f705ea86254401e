//! What a handler submits to the engine and what it gets back.

use std::sync::Arc;

use alora_model::{LoraAdapter, SamplingParams};
use tokio::sync::mpsc::UnboundedSender;

/// A validated generation request: token ids in, everything checked.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<LoraAdapter>>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub cache_salt: Option<String>,
}

/// Why a sequence finished, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

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
    Token(TokenEvent),
    /// Text released at the end (held-back bytes), then the finish.
    Done {
        text: String,
        finish: Finish,
        usage: Usage,
    },
    /// The engine failed this request; the server keeps serving.
    Error(String),
}

pub(crate) type EventTx = UnboundedSender<Event>;
