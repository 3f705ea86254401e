//! `POST /v1/chat/completions`.
//!
//! With an aLoRA adapter the conversation is rendered WITHOUT a generation prompt and the
//! adapter's invocation tokens are appended (unless the prompt already ends with them): the
//! client only names the adapter, and everything before the invocation is the base model's
//! prefix, found again in the cache after a base turn on the same conversation.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::common::{respond, submit, token_strings, token_text, Collected, RequestMeta, Wire};
use super::types::*;
use super::validate;
use crate::engine::{Finish, ModelInfo, TokenEvent};
use crate::error::ApiError;
use crate::state::AppState;

pub async fn chat_completions(
    State(state): State<AppState>,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (v, info) = validate::prepare(&state, body, CHAT_FIELDS, validate::chat).await?;
    let rxs = submit(&state, &v)?;
    let wire = ChatWire {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now_unix(),
        model: v.model_name.clone(),
        logprobs: v.logprobs.is_some(),
        info,
    };
    respond(&state, &v, rxs, wire, meta).await
}

/// The chat completion wire format.
struct ChatWire {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    info: Arc<ModelInfo>,
}

impl ChatWire {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageOut>) -> String {
        serde_json::to_string(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
        .expect("chunk serializes")
    }

    fn delta(&self, index: usize, content: Option<String>, finish: Option<Finish>) -> String {
        let choice = ChunkChoice {
            index,
            delta: Delta {
                role: None,
                content,
            },
            logprobs: None,
            finish_reason: finish.map(|f| f.as_str()),
        };
        self.chunk(vec![choice], None)
    }
}

impl Wire for ChatWire {
    fn opening(&self, choices: usize) -> Vec<String> {
        let role = |index| ChunkChoice {
            index,
            delta: Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            },
            logprobs: None,
            finish_reason: None,
        };
        (0..choices)
            .map(|i| self.chunk(vec![role(i)], None))
            .collect()
    }

    fn token(&self, index: usize, t: TokenEvent) -> Option<String> {
        if t.text.is_empty() && !self.logprobs {
            return None;
        }
        let logprobs = self.logprobs.then(|| ChatLogprobs {
            content: vec![logprobs_of(&self.info, &t, t.text.clone())],
        });
        let choice = ChunkChoice {
            index,
            delta: Delta {
                role: None,
                content: Some(t.text),
            },
            logprobs,
            finish_reason: None,
        };
        Some(self.chunk(vec![choice], None))
    }

    fn done(&self, index: usize, text: String, finish: Finish) -> String {
        self.delta(index, (!text.is_empty()).then_some(text), Some(finish))
    }

    fn usage(&self, usage: UsageOut) -> String {
        self.chunk(vec![], Some(usage))
    }

    fn response(&self, choices: Vec<Collected>, usage: UsageOut) -> Response {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                logprobs: self.logprobs.then(|| ChatLogprobs {
                    content: c
                        .tokens
                        .iter()
                        .zip(token_strings(&c.tokens, &c.text))
                        .map(|(t, s)| logprobs_of(&self.info, t, s))
                        .collect(),
                }),
                message: AssistantMessage {
                    role: "assistant",
                    content: c.text,
                },
                finish_reason: Some(c.finish.as_str()),
            })
            .collect();
        Json(ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
        .into_response()
    }
}

/// A sampled token's entry: `token` is its share of the content (see `token_strings`),
/// `bytes` its own bytes.
fn logprobs_of(info: &ModelInfo, t: &TokenEvent, token: String) -> TokenLogprob {
    TokenLogprob {
        token,
        logprob: t.logprob.unwrap_or(0.0),
        bytes: info.token_bytes(t.id).to_vec(),
        top_logprobs: t
            .top
            .iter()
            .map(|(id, lp)| {
                let (token, bytes) = token_text(info, *id);
                TopLogprob {
                    token,
                    logprob: *lp,
                    bytes,
                }
            })
            .collect(),
    }
}
