//! The kernels' error type: shapes that do not fit together.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// Inputs whose sizes disagree (the message names them).
    #[error("kernel input: {0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// `Err(KernelError::Shape(msg))` unless `ok`.
pub(crate) fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(KernelError::Shape(msg()))
    }
}
