//! Assembles the router: routes, API-key check, body limit, JSON 404/405.

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::openai::common::{LoggedByResponder, RequestMeta};
use crate::state::AppState;
use crate::{admin, openai};

/// Constant-time API-key check on everything but health and metrics.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = given.as_bytes().ct_eq(key.as_bytes()).into();
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Rewrites axum's plain-text rejections (body too large, wrong method) as OpenAI errors.
async fn json_errors(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || r.status().is_success() {
        return r;
    }
    match r.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::payload_too_large(state.config.max_body_bytes).into_response()
        }
        axum::http::StatusCode::METHOD_NOT_ALLOWED => ApiError {
            status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
            ..ApiError::bad_request("Method not allowed for this endpoint")
        }
        .into_response(),
        _ => r,
    }
}

/// Reads the whole request body within `body_read_timeout` (and the body limit) before any
/// handler runs, so a client trickling a body cannot hold a connection and a handler forever.
/// Past the time: 408 and `Connection: close` (the rest of the body is never read).
async fn read_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limit) = state.config.body_read_timeout else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let max = state.config.max_body_bytes;
    match tokio::time::timeout(limit, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, bytes.into())).await,
        Ok(Err(e)) => {
            // `to_bytes` fails on the limit or on a broken connection.
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::payload_too_large(max).into_response()
            } else {
                ApiError::bad_request(format!("Could not read the request body: {e}"))
                    .into_response()
            }
        }
        Err(_) => {
            let mut r = ApiError::body_read_timeout(limit).into_response();
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

/// Gives every request an id (a client's `x-request-id` of at most 128 visible ASCII
/// characters, else a new UUID), echoes it in the response, and writes one access-log line per
/// request at info: method, path, status, latency, never a body. Generations are logged by
/// their responder instead, at their end and with their token counts; `/health` and
/// `/metrics` at debug.
async fn access_log(mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string);
    let id = given.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let start = std::time::Instant::now();
    req.extensions_mut().insert(RequestMeta {
        id: id.clone(),
        start,
    });
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut r = next.run(req).await;
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        r.headers_mut().insert("x-request-id", v);
    }
    if r.extensions().get::<LoggedByResponder>().is_none() {
        let latency_ms = start.elapsed().as_millis() as u64;
        let status = r.status().as_u16();
        if path == "/health" || path == "/metrics" {
            tracing::debug!(target: "alora::access", request_id = %id, %method, %path, status, latency_ms);
        } else {
            tracing::info!(target: "alora::access", request_id = %id, %method, %path, status, latency_ms, "request");
        }
    }
    r
}

async fn not_found() -> ApiError {
    ApiError::not_found("No such endpoint")
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat::chat_completions))
        .route("/v1/completions", post(openai::completions::completions))
        .route("/v1/models", get(openai::models::list_models))
        .route("/v1/load_lora_adapter", post(openai::models::load_adapter))
        .route(
            "/v1/unload_lora_adapter",
            post(openai::models::unload_adapter),
        )
        .route("/tokenize", post(admin::tokenize))
        .route("/detokenize", post(admin::detokenize))
        .route("/reset_prefix_cache", post(admin::reset_prefix_cache))
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(admin::health))
        .route("/version", get(openai::models::version))
        .route("/metrics", get(admin::metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), json_errors))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}
