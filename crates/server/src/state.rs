//! The state every handler gets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{EngineHandle, LoadState, ModelInfo};
use crate::error::ApiError;
use crate::registry::AdapterRegistry;

/// HTTP-side settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Name the base model is served under (default: the model file or directory name).
    pub served_model_name: Option<String>,
    pub api_key: Option<String>,
    /// Enables `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
    pub enable_adapter_loading: bool,
    /// Directory adapter paths given to the load endpoint must lie in.
    pub adapter_dir: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub request_timeout: Option<Duration>,
    /// Log prompts and outputs (off by default).
    pub log_prompts: bool,
    /// After SIGTERM or SIGINT, how long in-flight requests may run before the server exits
    /// anyway (`None`: until they finish).
    pub shutdown_grace: Option<Duration>,
    /// Time a client has to send a request's headers (`None`: no limit).
    pub header_read_timeout: Option<Duration>,
    /// Time a client has, after the headers, to send the whole request body (`None`: no
    /// limit). Past it: 408 and the connection is closed.
    pub body_read_timeout: Option<Duration>,
    /// Refuse every request field outside an endpoint's implemented set (400), instead of
    /// ignoring unknown ones (`openai::fields`).
    pub reject_unknown_fields: bool,
    /// Connections served at once (`None`: no limit); more wait in the listen backlog.
    pub max_connections: Option<usize>,
    /// How `tool_choice: "auto"` outputs are read (`--tool-call-parser`); `None`: the format
    /// the chat template shows, else Hermes.
    pub tool_call_parser: Option<alora_model::tools::ToolFormat>,
    /// Compute a finished chat reply's turn end ahead (the template's `<|im_end|>\n` after it),
    /// so a later call on the conversation (an intrinsic, or the next user turn) finds it
    /// cached. On by default (`--no-close-turns` turns it off): a call sent right after the
    /// reply computes the rows itself (`EngineConfig::close_turn_grace`), so closing costs
    /// nothing back to back and saves the call those rows later (BENCHMARKS.md).
    pub close_turns: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            served_model_name: None,
            api_key: None,
            enable_adapter_loading: false,
            adapter_dir: None,
            max_body_bytes: 0,
            request_timeout: None,
            log_prompts: false,
            shutdown_grace: None,
            header_read_timeout: None,
            body_read_timeout: None,
            reject_unknown_fields: false,
            max_connections: None,
            tool_call_parser: None,
            close_turns: true,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub registry: Arc<AdapterRegistry>,
    pub config: Arc<HttpConfig>,
    /// Every start-up adapter is registered (`wait_ready` succeeded): until then `/health`
    /// answers 503 even with the model loaded, so no request naming one meets a 404.
    pub started: Arc<std::sync::atomic::AtomicBool>,
    /// A shutdown signal arrived: `/health` answers 503 and new generation requests are refused
    /// while in-flight ones finish.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Bounds request preparation (parsing, templating, tokenization) on the blocking pool to
    /// one per core, so big bodies queue behind each other instead of stalling async workers.
    pub prep_permits: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// Runs CPU-heavy request preparation `f` (body parsing, templating, tokenization) on the
    /// blocking pool, at most one per core at a time, never on an async worker.
    pub async fn prepare<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self
            .prep_permits
            .acquire()
            .await
            .map_err(|_| ApiError::internal("request preparation is shut down"))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
    }

    /// The loaded model while the engine serves; 503 while it loads or once it has stopped.
    pub fn info(&self) -> Result<Arc<ModelInfo>, ApiError> {
        if let LoadState::Stopped(_) = self.engine.shared().load_state() {
            return Err(ApiError::engine_stopped());
        }
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::shutting_down());
        }
        self.engine.info().cloned().ok_or_else(ApiError::not_ready)
    }

    /// The error for a request whose event stream ended without its end (the engine dropped
    /// it): 503 `engine_stopped` when the engine thread is gone, else a 500.
    pub fn dropped_request(&self) -> ApiError {
        match self.engine.shared().load_state() {
            LoadState::Stopped(_) => ApiError::engine_stopped(),
            _ => ApiError::internal("The engine dropped the request"),
        }
    }

    pub fn served_name(&self, info: &ModelInfo) -> String {
        self.config
            .served_model_name
            .clone()
            .unwrap_or_else(|| info.name.clone())
    }
}
