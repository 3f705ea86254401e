//! `POST /v1/chat/completions`.
//!
//! With an aLoRA adapter the conversation is rendered WITHOUT a generation prompt and the
//! adapter's invocation tokens are appended (unless the prompt already ends with them): the
//! client only names the adapter, and everything before the invocation is the base model's
//! prefix, found again in the cache after a base turn on the same conversation.
//!
//! With tools (`openai::tools`), each choice's text goes through one `ToolCallParser` as it
//! streams, and the whole text through another for a non-streamed response: the same parser,
//! so both give the same content and calls. `finish_reason` is `tool_calls` when a stopped
//! output holds calls.

use std::sync::{Arc, Mutex};

use alora_model::tools::{self, CallMode, ParsedCall, ToolCallParser, ToolDelta};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::common::{respond, submit, token_strings, token_text, Collected, RequestMeta, Wire};
use super::tools::call_id;
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
    let rxs = submit(&state, &v, &meta)?;
    let choices = rxs.len();
    let wire = ChatWire {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now_unix(),
        model: v.model_name.clone(),
        logprobs: v.logprobs.is_some(),
        info,
        tools: v.tools.clone().map(|(mode, parallel)| ToolStreams {
            parsers: Mutex::new(
                (0..choices)
                    .map(|_| (ToolCallParser::new(mode.clone(), parallel), Vec::new()))
                    .collect(),
            ),
            mode,
            parallel,
        }),
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
    tools: Option<ToolStreams>,
}

/// Tool-call parsing for a request's choices.
struct ToolStreams {
    mode: CallMode,
    parallel: bool,
    /// Per streamed choice: its parser and the ids given to its calls so far.
    parsers: Mutex<Vec<(ToolCallParser, Vec<String>)>>,
}

impl ToolStreams {
    /// Pushes a streamed choice's text (and, at its end, finishes it): the content and call
    /// pieces to send, and whether the choice has made calls.
    fn push(&self, index: usize, text: &str, end: bool) -> (String, Vec<ToolCallDelta>, bool) {
        let mut all = self.parsers.lock().expect("tool parser lock");
        let (parser, ids) = &mut all[index];
        let mut deltas = parser.push(text);
        if end {
            deltas.extend(parser.finish());
        }
        let (mut content, mut calls) = (String::new(), Vec::new());
        for d in deltas {
            match d {
                ToolDelta::Content(c) => content.push_str(&c),
                ToolDelta::Call { index, name } => {
                    ids.push(call_id());
                    calls.push(ToolCallDelta {
                        index,
                        id: Some(ids[index].clone()),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(name),
                            arguments: Some(String::new()),
                        },
                    });
                }
                ToolDelta::Arguments { index, fragment } => calls.push(ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: Some(fragment),
                    },
                }),
            }
        }
        (content, calls, parser.calls() > 0)
    }
}

/// `tool_calls` when a stopped output made calls, else the engine's reason.
fn finish_reason(finish: Finish, called: bool) -> &'static str {
    match (finish, called) {
        (Finish::Stop, true) => "tool_calls",
        (f, _) => f.as_str(),
    }
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

    fn delta(
        &self,
        index: usize,
        content: Option<String>,
        tool_calls: Vec<ToolCallDelta>,
        finish: &'static str,
    ) -> String {
        let choice = ChunkChoice {
            index,
            delta: Delta {
                role: None,
                content,
                tool_calls,
            },
            logprobs: None,
            finish_reason: Some(finish),
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
                tool_calls: Vec::new(),
            },
            logprobs: None,
            finish_reason: None,
        };
        (0..choices)
            .map(|i| self.chunk(vec![role(i)], None))
            .collect()
    }

    fn token(&self, index: usize, t: TokenEvent) -> Option<String> {
        let (content, tool_calls) = match &self.tools {
            None => (Some(t.text.clone()), Vec::new()),
            Some(ts) => {
                let (c, calls, _) = ts.push(index, &t.text, false);
                ((!c.is_empty()).then_some(c), calls)
            }
        };
        let has_text = content.as_ref().is_some_and(|c| !c.is_empty());
        if !has_text && tool_calls.is_empty() && !self.logprobs {
            return None;
        }
        let logprobs = self.logprobs.then(|| ChatLogprobs {
            content: vec![logprobs_of(&self.info, &t, t.text.clone())],
        });
        let choice = ChunkChoice {
            index,
            delta: Delta {
                role: None,
                content,
                tool_calls,
            },
            logprobs,
            finish_reason: None,
        };
        Some(self.chunk(vec![choice], None))
    }

    fn done(&self, index: usize, text: String, finish: Finish) -> String {
        match &self.tools {
            None => self.delta(
                index,
                (!text.is_empty()).then_some(text),
                Vec::new(),
                finish.as_str(),
            ),
            Some(ts) => {
                let (c, calls, called) = ts.push(index, &text, true);
                self.delta(
                    index,
                    (!c.is_empty()).then_some(c),
                    calls,
                    finish_reason(finish, called),
                )
            }
        }
    }

    fn usage(&self, usage: UsageOut) -> String {
        self.chunk(vec![], Some(usage))
    }

    fn response(&self, choices: Vec<Collected>, usage: UsageOut) -> Response {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                // One parse of the text gives both the calls and the finish reason.
                let message = self.message(&c.text);
                let called = !message.tool_calls.is_empty();
                ChatChoice {
                    index,
                    logprobs: self.logprobs.then(|| ChatLogprobs {
                        content: c
                            .tokens
                            .iter()
                            .zip(token_strings(&c.tokens, &c.text))
                            .map(|(t, s)| logprobs_of(&self.info, t, s))
                            .collect(),
                    }),
                    message,
                    finish_reason: Some(finish_reason(c.finish, called)),
                }
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

impl ChatWire {
    /// A whole choice's message: its text, or with tools the content and calls parsed out of it
    /// (content `null` when there is none beside calls).
    fn message(&self, text: &str) -> AssistantMessage {
        let Some(ts) = &self.tools else {
            return AssistantMessage {
                role: "assistant",
                content: Some(text.to_string()),
                tool_calls: Vec::new(),
            };
        };
        let parsed = tools::parse(&ts.mode, ts.parallel, text);
        let content = match parsed.content.is_empty() && !parsed.calls.is_empty() {
            true => None,
            false => Some(parsed.content),
        };
        AssistantMessage {
            role: "assistant",
            content,
            tool_calls: parsed
                .calls
                .into_iter()
                .map(|ParsedCall { name, arguments }| ToolCall {
                    id: call_id(),
                    kind: "function",
                    function: FunctionCall { name, arguments },
                })
                .collect(),
        }
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
