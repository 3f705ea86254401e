//! The model crate's error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("unsupported architecture `{found}`; supported: {supported}")]
    UnsupportedArchitecture {
        found: String,
        supported: &'static str,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("weight `{key}`: {msg}")]
    Weight { key: String, msg: String },
    #[error("adapter {path}: {msg}")]
    Adapter { path: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("batch: {0}")]
    Batch(String),
    #[error("{0}")]
    Kernel(#[from] alora_kernels::KernelError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.display().to_string(),
        source,
    })
}
