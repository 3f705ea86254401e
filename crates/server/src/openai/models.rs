//! `GET /v1/models` and vLLM's runtime adapter endpoints.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::types::now_unix;
use super::validate::parse_body;
use crate::error::ApiError;
use crate::registry::confine;
use crate::state::AppState;

pub async fn list_models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let info = state.info()?;
    let base = state.served_name(&info);
    let created = now_unix();
    let mut data = vec![json!({
        "id": base, "object": "model", "created": created, "owned_by": "alora",
        "root": info.name, "parent": null, "max_model_len": info.max_model_len,
    })];
    for a in state.registry.list() {
        let (kind, inv) = match a.invocation_tokens() {
            Some(t) => ("alora", Some(t.to_vec())),
            None => ("lora", None),
        };
        data.push(json!({
            "id": a.name, "object": "model", "created": created, "owned_by": "alora",
            "root": a.name, "parent": base, "adapter_type": kind, "invocation_tokens": inv,
            "rank": a.rank, "targets": a.targets.iter().map(|m| m.name()).collect::<Vec<_>>(),
        }));
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

#[derive(Deserialize)]
struct LoadReq {
    lora_name: String,
    lora_path: String,
    /// Replace an adapter already loaded under this name (vLLM's `load_inplace`).
    #[serde(default)]
    load_inplace: bool,
}

#[derive(Deserialize)]
struct UnloadReq {
    lora_name: String,
}

/// The runtime adapter endpoints answer 404 unless the operator enabled them.
fn loading_enabled(state: &AppState) -> Result<(), ApiError> {
    if state.config.enable_adapter_loading {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "Runtime adapter loading is disabled (start with --enable-adapter-loading)",
        ))
    }
}

pub async fn load_adapter(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    loading_enabled(&state)?;
    let req: LoadReq = parse_body(&state, &body, &["lora_name", "lora_path", "load_inplace"])?;
    if req.lora_name.is_empty() {
        return Err(ApiError::invalid(
            "lora_name",
            "`lora_name` must not be empty",
        ));
    }
    if !req.load_inplace && state.registry.get(&req.lora_name).is_some() {
        // vLLM's words: IBM's clients treat this 400 as success.
        return Err(ApiError::invalid(
            "lora_name",
            format!(
                "The lora adapter '{}' has already been loaded.",
                req.lora_name
            ),
        )
        .with_code("adapter_already_loaded"));
    }
    let info = state.info()?;
    if req.lora_name == state.served_name(&info) {
        return Err(ApiError::invalid(
            "lora_name",
            "`lora_name` must differ from the base model's name",
        ));
    }
    let root = state
        .config
        .adapter_dir
        .clone()
        .ok_or_else(|| ApiError::internal("no adapter directory configured"))?;
    let dir = confine(&root, &req.lora_path)?;
    let reg = state.registry.clone();
    let name = req.lora_name.clone();
    let a = tokio::task::spawn_blocking(move || reg.load(&name, &dir, &info))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    tracing::info!(adapter = %a.name, "adapter loaded");
    Ok(Json(json!({"status": "ok", "lora_name": a.name})).into_response())
}

/// The vLLM release whose API alora follows: clients pick request forms by it (mellea sends
/// `structured_outputs` rather than the removed `guided_*` fields to servers at or past 0.10.2).
pub const VLLM_API_VERSION: &str = "0.11.0";

/// `GET /version`, as vLLM answers it, plus alora's own version.
pub async fn version() -> Response {
    Json(json!({
        "version": VLLM_API_VERSION,
        "server": "alora",
        "alora_version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

pub async fn unload_adapter(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    loading_enabled(&state)?;
    let req: UnloadReq = parse_body(&state, &body, &["lora_name"])?;
    if !state.registry.unload(&req.lora_name) {
        return Err(ApiError::model_not_found("lora_name", &req.lora_name));
    }
    Ok(Json(json!({"status": "ok", "lora_name": req.lora_name})).into_response())
}
