//! One error type for the HTTP layer, mapped once to a status code and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`. Streams use the same body in a `data:`
//! event.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// 400 naming the offending field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(param: &str, name: &str) -> Self {
        ApiError {
            param: Some(param.into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model or adapter `{name}` does not exist"),
            )
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Invalid or missing API key",
        )
        .with_code("invalid_api_key")
    }

    pub fn queue_full(requests: usize, tokens: usize) -> Self {
        ApiError {
            retry_after_s: Some(1),
            code: Some("queue_full"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("The server is at its queue bound ({requests} requests or {tokens} prompt tokens waiting); retry later"),
            )
        }
    }

    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The model is loading",
        )
        .with_code("model_loading")
    }

    /// The engine thread is gone: nothing can be served until a restart.
    pub fn engine_stopped() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The inference engine has stopped; the server must be restarted",
        )
        .with_code("engine_stopped")
    }

    /// 503 during graceful shutdown: in-flight requests finish, new ones go elsewhere.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The server is shutting down",
        )
        .with_code("shutting_down")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body exceeds {limit} bytes"),
        )
    }

    pub fn timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout_error",
            "The request exceeded the server's time limit",
        )
        .with_code("timeout")
    }

    /// The client did not send the request body within `--body-read-timeout`.
    pub fn body_read_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body was not received within {} s",
                limit.as_secs_f64()
            ),
        )
        .with_code("body_read_timeout")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    /// The JSON body, also used for errors inside a stream.
    pub fn body_json(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code },
        })
        .unwrap_or_else(|_| "{\"error\":{\"message\":\"error\",\"type\":\"internal_error\",\"param\":null,\"code\":null}}".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body_json(),
        )
            .into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<crate::engine::SubmitError> for ApiError {
    fn from(e: crate::engine::SubmitError) -> Self {
        match e {
            crate::engine::SubmitError::QueueFull { requests, tokens } => {
                ApiError::queue_full(requests, tokens)
            }
            crate::engine::SubmitError::NotReady => ApiError::not_ready(),
            crate::engine::SubmitError::Stopped => ApiError::engine_stopped(),
        }
    }
}

impl From<crate::engine::EngineError> for ApiError {
    fn from(e: crate::engine::EngineError) -> Self {
        use crate::engine::EngineError;
        match e {
            EngineError::CacheTooSmall { .. } => {
                ApiError::invalid("max_tokens", e.to_string()).with_code("kv_cache_too_small")
            }
            EngineError::NotLoaded => ApiError::not_ready(),
            EngineError::Step | EngineError::Grammar(_) => ApiError::internal(e.to_string()),
        }
    }
}
