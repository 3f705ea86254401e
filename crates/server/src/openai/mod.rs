//! The OpenAI-compatible endpoints, one module each, plus what they share.

pub mod chat;
pub mod common;
pub mod completions;
pub mod fields;
pub mod models;
pub mod tools;
pub mod types;
pub mod validate;
