//! What the chat and completion handlers share: body parsing, model/adapter resolution,
//! validation into engine requests, submission, and collecting or streaming the results.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use alora_model::{LoraAdapter, SamplingParams};
use axum::body::Bytes;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::types::{PromptTokensDetails, Sampling, StreamOptions, UsageOut};
use crate::engine::{Event, Finish, GenRequest, ModelInfo, Usage};
use crate::error::ApiError;
use crate::state::AppState;

pub const MAX_N: i64 = 16;
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Parses a JSON body, refusing fields outside `allowed` by name.
pub fn parse_body<T: DeserializeOwned>(body: &Bytes, allowed: &[&str]) -> Result<T, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Malformed JSON body: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            k,
            format!("Unsupported parameter `{k}`: alora does not implement it"),
        ));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." || path.is_empty() {
            "body".to_string()
        } else {
            path
        };
        ApiError::invalid(&param, format!("Invalid `{param}`: {}", e.inner()))
    })
}

/// The base model (None) or an adapter, from `adapter`, else from `model`.
pub fn resolve_adapter(
    state: &AppState,
    info: &ModelInfo,
    model: Option<&str>,
    adapter: Option<&str>,
) -> Result<(Option<Arc<LoraAdapter>>, String), ApiError> {
    if let Some(name) = adapter {
        let a = state
            .registry
            .get(name)
            .ok_or_else(|| ApiError::model_not_found("adapter", name))?;
        return Ok((Some(a), name.to_string()));
    }
    match model {
        None | Some("") => Ok((None, state.served_name(info))),
        Some(m) if m == state.served_name(info) || m == info.name => Ok((None, m.to_string())),
        Some(m) => match state.registry.get(m) {
            Some(a) => Ok((Some(a), m.to_string())),
            None => Err(ApiError::model_not_found("model", m)),
        },
    }
}

/// Everything but the prompt of an engine request, validated.
pub struct Generation {
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub n: usize,
    pub ignore_eos: bool,
}

fn range(param: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be in [{lo}, {hi}], got {v}"),
        ))
    }
}

pub fn validate_sampling(
    s: &Sampling,
    logprobs: Option<usize>,
    vocab: usize,
) -> Result<Generation, ApiError> {
    let temperature = range("temperature", s.temperature.unwrap_or(1.0), 0.0, 2.0)?;
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match s.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let min_p = range("min_p", s.min_p.unwrap_or(0.0), 0.0, 1.0)?;
    let presence_penalty = range(
        "presence_penalty",
        s.presence_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
    )?;
    let frequency_penalty = range(
        "frequency_penalty",
        s.frequency_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
    )?;
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be in (0, 10], got {repetition_penalty}"),
        ));
    }
    let mut logit_bias = HashMap::new();
    for (k, v) in s.logit_bias.clone().unwrap_or_default() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` key `{k}` is not a token id"),
            )
        })?;
        if id as usize >= vocab {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` token {id} is not below the vocabulary size {vocab}"),
            ));
        }
        logit_bias.insert(id, range("logit_bias", v, -100.0, 100.0)?);
    }
    let n = s.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be in [1, {MAX_N}], got {n}"),
        ));
    }
    let seed = match s.seed {
        Some(x) if x < 0 => {
            return Err(ApiError::invalid(
                "seed",
                format!("`seed` must be >= 0, got {x}"),
            ))
        }
        x => x.map(|x| x as u64),
    };
    let stop = s.stop.clone().map(|x| x.into_vec()).unwrap_or_default();
    if stop.len() > 16 {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` may hold at most 16 strings, got {}", stop.len()),
        ));
    }
    let stop_token_ids = s.stop_token_ids.clone().unwrap_or_default();
    if let Some(t) = stop_token_ids.iter().find(|t| **t as usize >= vocab) {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("token {t} is not below the vocabulary size {vocab}"),
        ));
    }
    Ok(Generation {
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            logprobs,
        },
        stop,
        stop_token_ids,
        n: n as usize,
        ignore_eos: s.ignore_eos.unwrap_or(false),
    })
}

/// `max_tokens` against the context: prompt + max_tokens must fit in `max_model_len`.
pub fn validate_lengths(
    param: &str,
    max_tokens: Option<i64>,
    prompt_len: usize,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid("prompt", "The prompt is empty"));
    }
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "The prompt has {prompt_len} tokens; the maximum context length is {max_model_len}"
            ),
        )
        .with_code("context_length_exceeded"));
    }
    match max_tokens {
        None => Ok(max_model_len - prompt_len),
        Some(m) if m < 1 => Err(ApiError::invalid(param, format!("`{param}` must be >= 1, got {m}"))),
        Some(m) if prompt_len + m as usize > max_model_len => Err(ApiError::invalid(
            param,
            format!(
                "`{param}` must be <= {} (prompt {prompt_len} + {param} must not exceed the context length {max_model_len}), got {m}",
                max_model_len - prompt_len
            ),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m as usize),
    }
}

/// Submits the `n` choices of one request; seeds differ per choice so choices differ.
pub fn submit_all(
    state: &AppState,
    base: GenRequest,
    n: usize,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = base.clone();
        if let Some(s) = r.sampling.seed {
            r.sampling.seed = Some(s.wrapping_add(i as u64));
        }
        // On a refusal the receivers already made are dropped, which cancels them.
        out.push(state.engine.submit(r)?);
    }
    Ok(out)
}

/// One finished choice.
pub struct Collected {
    pub text: String,
    pub tokens: Vec<crate::engine::TokenEvent>,
    pub finish: Finish,
    pub usage: Usage,
}

pub async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(t) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Event::Done {
                text: rest,
                finish,
                usage,
            } => {
                text.push_str(&rest);
                return Ok(Collected {
                    text,
                    tokens,
                    finish,
                    usage,
                });
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal("The engine dropped the request"))
}

/// Usage of a request's choices, `n` per prompt: each prompt counted once.
pub fn usage_out(usages: &[Usage], n: usize) -> UsageOut {
    let prompts = usages.chunks(n.max(1));
    let prompt: usize = prompts.clone().map(|c| c[0].prompt_tokens).sum();
    let cached: usize = prompts.map(|c| c[0].cached_tokens).sum();
    let completion: usize = usages.iter().map(|u| u.completion_tokens).sum();
    UsageOut {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// Collects every choice, within the server's request timeout.
pub async fn collect_all(
    state: &AppState,
    rxs: Vec<UnboundedReceiver<Event>>,
) -> Result<Vec<Collected>, ApiError> {
    let all = futures::future::join_all(rxs.into_iter().map(collect));
    let results = match state.config.request_timeout {
        Some(t) => tokio::time::timeout(t, all)
            .await
            .map_err(|_| ApiError::timeout())?,
        None => all.await,
    };
    results.into_iter().collect()
}

/// Events of all choices, tagged with the choice index, as they come.
pub fn merged(rxs: Vec<UnboundedReceiver<Event>>) -> impl Stream<Item = (usize, Event)> {
    stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        UnboundedReceiverStream::new(rx)
            .map(move |e| (i, e))
            .boxed()
    }))
}

/// Turns chunk JSON strings into an SSE response ending with `data: [DONE]`.
pub fn sse<S>(chunks: S) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    S: Stream<Item = String> + Send + 'static,
{
    let events = chunks
        .map(|c| Ok(SseEvent::default().data(c)))
        .chain(stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }));
    Sse::new(events).keep_alive(KeepAlive::default())
}

pub fn include_usage(o: &Option<StreamOptions>) -> bool {
    o.as_ref().is_some_and(|o| o.include_usage)
}

/// Token text for logprobs: the tokenizer's piece, bytes for clients that rebuild UTF-8.
pub fn token_text(info: &ModelInfo, id: u32) -> (String, Vec<u8>) {
    let s = info.tokenizer.decode(&[id], false).unwrap_or_default();
    let b = s.as_bytes().to_vec();
    (s, b)
}

/// Runs a request's event streams on a task that turns them into SSE payloads. The task ends
/// (dropping the engine receivers, which cancels the request and frees its blocks) as soon as
/// the client goes away, even while the request is still queued.
pub fn spawn_stream<F, G>(
    rxs: Vec<UnboundedReceiver<Event>>,
    timeout: Option<std::time::Duration>,
    mut on_event: F,
    finale: G,
) -> impl Stream<Item = String> + Send + 'static
where
    F: FnMut(usize, Event) -> Vec<String> + Send + 'static,
    G: FnOnce(&[Usage]) -> Vec<String> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let n = rxs.len();
    tokio::spawn(async move {
        let mut events = merged(rxs);
        let mut usages = vec![Usage::default(); n];
        let mut open = n;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        while open > 0 {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    let _ = tx.send(ApiError::timeout().body_json()).await;
                    return;
                }
                e = events.next() => e,
            };
            let Some((i, ev)) = next else { break };
            let is_end = matches!(ev, Event::Done { .. } | Event::Error(_));
            if let Event::Done { usage, .. } = &ev {
                usages[i] = *usage;
            }
            let failed = matches!(ev, Event::Error(_));
            for payload in on_event(i, ev) {
                if tx.send(payload).await.is_err() {
                    return;
                }
            }
            if failed {
                return;
            }
            if is_end {
                open -= 1;
            }
        }
        for payload in finale(&usages) {
            if tx.send(payload).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
