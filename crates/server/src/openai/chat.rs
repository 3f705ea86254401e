//! `POST /v1/chat/completions`.
//!
//! With an aLoRA adapter the conversation is rendered WITHOUT a generation prompt and the
//! adapter's invocation tokens are appended (unless the prompt already ends with them): the
//! client only names the adapter, and everything before the invocation is the base model's
//! prefix, found again in the cache after a base turn on the same conversation.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;

use super::common::{
    collect_all, include_usage, parse_body, resolve_adapter, spawn_stream, sse, submit_all,
    token_text, usage_out, validate_lengths, validate_sampling, MAX_TOP_LOGPROBS,
};
use super::types::*;
use crate::engine::{Event, GenRequest, ModelInfo, TokenEvent};
use crate::error::ApiError;
use crate::state::AppState;
use alora_model::text::prompt::{self, PromptAdapter};
use alora_model::ChatMessage;

fn to_messages(msgs: Option<Vec<ChatMessageIn>>) -> Result<Vec<ChatMessage>, ApiError> {
    let msgs = msgs
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a non-empty list"))?;
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => s.push_str(&t),
                            (k, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("content part type `{k}` is not supported (text only)"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            if m.role.is_empty() {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    "`role` must not be empty",
                ));
            }
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
}

fn logprobs_of(info: &ModelInfo, t: &TokenEvent) -> TokenLogprob {
    let (token, bytes) = token_text(info, t.id);
    TokenLogprob {
        token,
        logprob: t.logprob.unwrap_or(0.0),
        bytes,
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

pub async fn chat_completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(&body, CHAT_FIELDS)?;
    let info = state.info()?;
    let (adapter, model_name) =
        resolve_adapter(&state, &info, req.model.as_deref(), req.adapter.as_deref())?;
    let messages = to_messages(req.messages)?;
    // The one prompt rule (alora_model::text::prompt): template, invocation, activation start.
    let kind = PromptAdapter::of(adapter.as_deref().map(|a| a.invocation_tokens()));
    let (text, prompt) = prompt::chat_prompt(&info.template, &info.tokenizer, &messages, kind)
        .map_err(|e| match e {
            e @ alora_model::ModelError::Template(_) => {
                ApiError::invalid("messages", e.to_string())
            }
            e => ApiError::internal(e.to_string()),
        })?;
    if state.config.log_prompts {
        tracing::info!(prompt = %text, "chat prompt");
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ))
        }
        (false, None) => None,
        (true, k) => {
            let k = k.unwrap_or(0);
            if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("`top_logprobs` must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
                ));
            }
            Some(k as usize)
        }
    };
    let gen = validate_sampling(&req.sampling, logprobs, info.config.vocab_size)?;
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = validate_lengths(
        param,
        req.max_completion_tokens.or(req.max_tokens),
        prompt.ids.len(),
        info.max_model_len,
    )?;
    let base = GenRequest {
        prompt: prompt.ids,
        activation_start: prompt.activation_start,
        adapter,
        sampling: gen.sampling,
        max_tokens,
        stop: gen.stop,
        stop_token_ids: gen.stop_token_ids,
        ignore_eos: gen.ignore_eos,
        cache_salt: req.cache_salt,
    };
    let rxs = submit_all(&state, base, gen.n)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_unix();
    let want_logprobs = logprobs.is_some();

    if req.stream {
        let n = rxs.len();
        let chunk = {
            let (id, model) = (id.clone(), model_name.clone());
            move |choices: Vec<ChunkChoice>, usage: Option<UsageOut>| {
                serde_json::to_string(&ChatChunk {
                    id: id.clone(),
                    object: "chat.completion.chunk",
                    created,
                    model: model.clone(),
                    choices,
                    usage,
                })
                .expect("chunk serializes")
            }
        };
        let first: Vec<String> = (0..n)
            .map(|i| {
                let d = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                };
                chunk(
                    vec![ChunkChoice {
                        index: i,
                        delta: d,
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect();
        let with_usage = include_usage(&req.stream_options);
        let (c1, c2, info2) = (chunk.clone(), chunk, info.clone());
        let body = spawn_stream(
            rxs,
            state.config.request_timeout,
            move |i, ev| match ev {
                Event::Token(t) => {
                    if t.text.is_empty() && !want_logprobs {
                        return vec![];
                    }
                    let lp = want_logprobs.then(|| ChatLogprobs {
                        content: vec![logprobs_of(&info2, &t)],
                    });
                    let d = Delta {
                        role: None,
                        content: Some(t.text),
                    };
                    vec![c1(
                        vec![ChunkChoice {
                            index: i,
                            delta: d,
                            logprobs: lp,
                            finish_reason: None,
                        }],
                        None,
                    )]
                }
                Event::Done { text, finish, .. } => {
                    let d = Delta {
                        role: None,
                        content: (!text.is_empty()).then_some(text),
                    };
                    vec![c1(
                        vec![ChunkChoice {
                            index: i,
                            delta: d,
                            logprobs: None,
                            finish_reason: Some(finish.as_str()),
                        }],
                        None,
                    )]
                }
                Event::Error(e) => vec![ApiError::from(e).body_json()],
            },
            move |usages| {
                if with_usage {
                    vec![c2(vec![], Some(usage_out(usages, usages.len())))]
                } else {
                    vec![]
                }
            },
        );
        let body = futures::stream::iter(first).chain(body);
        return Ok(sse(body).into_response());
    }

    let results = collect_all(&state, rxs).await?;
    let mut choices = Vec::new();
    let mut usages = Vec::new();
    for (i, c) in results.into_iter().enumerate() {
        let lp = want_logprobs.then(|| ChatLogprobs {
            content: c.tokens.iter().map(|t| logprobs_of(&info, t)).collect(),
        });
        usages.push(c.usage);
        choices.push(ChatChoice {
            index: i,
            message: AssistantMessage {
                role: "assistant",
                content: c.text,
            },
            logprobs: lp,
            finish_reason: Some(c.finish.as_str()),
        });
    }
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: model_name,
        choices,
        usage: usage_out(&usages, usages.len()),
    })
    .into_response())
}
