//! The trainer's error type (thiserror, like the other library crates; the CLI adds context
//! with anyhow on top).

use std::path::Path;

use alora_model::{ModelError, PeftConfigError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Peft(#[from] PeftConfigError),
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
    /// A conversation or example the trainer cannot use.
    #[error("{0}")]
    Data(String),
    /// Adapter or checkpoint files that do not match what is asked of them.
    #[error("{0}")]
    Files(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn data(msg: impl Into<String>) -> TrainError {
    TrainError::Data(msg.into())
}

pub(crate) fn files(msg: impl Into<String>) -> TrainError {
    TrainError::Files(msg.into())
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn json_err(path: &Path) -> impl FnOnce(serde_json::Error) -> TrainError + '_ {
    move |source| TrainError::Json {
        path: path.display().to_string(),
        source,
    }
}
