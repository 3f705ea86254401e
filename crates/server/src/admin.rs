//! Non-OpenAI endpoints: tokenize, detokenize, health, metrics, prefix-cache reset.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::engine::LoadState;
use crate::error::ApiError;
use crate::openai::types::ChatMessageIn;
use crate::openai::validate::{messages, parse_body, resolve_adapter};
use crate::state::AppState;
use alora_model::text::prompt::{self, PromptAdapter};

#[derive(Deserialize)]
struct TokenizeReq {
    model: Option<String>,
    adapter: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessageIn>>,
    add_generation_prompt: Option<bool>,
}

pub async fn tokenize(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let st = state.clone();
    state.prepare(move || tokenize_now(&st, &body)).await
}

/// The ids a request would run: with an aLoRA named (`adapter` or `model`), messages are
/// rendered by the aLoRA rule (no generation prompt, then the invocation), and
/// `activation_start` says where the adapter switches on (null when a prompt lacks the
/// invocation, which `/v1/completions` would refuse).
fn tokenize_now(state: &AppState, body: &Bytes) -> Result<Response, ApiError> {
    let req: TokenizeReq = parse_body(
        state,
        body,
        &[
            "model",
            "adapter",
            "prompt",
            "messages",
            "add_generation_prompt",
        ],
    )?;
    let info = state.info()?;
    let (adapter, _) = resolve_adapter(state, &info, req.model.as_deref(), req.adapter.as_deref())?;
    let kind = PromptAdapter::of(adapter.as_deref().map(|a| a.invocation_tokens()));
    let internal = |e: alora_model::ModelError| ApiError::internal(e.to_string());
    let p = match (req.prompt, req.messages) {
        (Some(text), None) => {
            let ids = info.tokenizer.encode(&text).map_err(internal)?;
            prompt::ids_prompt(ids.clone(), kind).unwrap_or(prompt::Prompt {
                ids,
                activation_start: None,
            })
        }
        (None, Some(m)) => {
            let msgs = messages(Some(m))?;
            let opts = prompt::ChatOptions {
                add_generation_prompt: req.add_generation_prompt,
                ..Default::default()
            };
            prompt::chat_prompt_with(&info.template, &info.tokenizer, &msgs, kind, &opts)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?
                .1
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "pass exactly one of `prompt` or `messages`",
            ))
        }
    };
    Ok(Json(json!({
        "count": p.ids.len(),
        "max_model_len": info.max_model_len,
        "tokens": p.ids,
        "activation_start": p.activation_start,
    }))
    .into_response())
}

#[derive(Deserialize)]
struct DetokenizeReq {
    #[allow(dead_code)]
    model: Option<String>,
    tokens: Vec<i64>,
}

pub async fn detokenize(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: DetokenizeReq = parse_body(&state, &body, &["model", "tokens"])?;
    let info = state.info()?;
    let vocab = info.config.vocab_size;
    if let Some(bad) = req.tokens.iter().find(|t| **t < 0 || **t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is not in [0, {vocab})"),
        ));
    }
    let ids: Vec<u32> = req.tokens.iter().map(|t| *t as u32).collect();
    let prompt = info
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"prompt": prompt})).into_response())
}

pub async fn health(State(state): State<AppState>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    match state.engine.shared().load_state() {
        LoadState::Ready if state.started.load(std::sync::atomic::Ordering::SeqCst) => {
            (StatusCode::OK, "ok").into_response()
        }
        LoadState::Ready => (StatusCode::SERVICE_UNAVAILABLE, "loading adapters").into_response(),
        LoadState::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response(),
        LoadState::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model failed to load: {e}"),
        )
            .into_response(),
        LoadState::Stopped(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("engine stopped: {e}"),
        )
            .into_response(),
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.engine.shared().metrics.render(),
    )
        .into_response()
}

pub async fn reset_prefix_cache(State(state): State<AppState>) -> Result<Response, ApiError> {
    let n = state.engine.reset_prefix_cache().await?;
    Ok(Json(json!({"status": "ok", "blocks_dropped": n})).into_response())
}
