//! alora's model: an aLoRA-aware Llama / Granite 3.x causal LM on candle, computing what PEFT
//! computes for base, LoRA and aLoRA requests in one forward over a ragged batch whose KV lives
//! in paged blocks owned by the cache crate.
//!
//! Modules: [`config`] (HF / GGUF config), [`weights`] (safetensors, GGUF, quantization),
//! [`rope`], [`lora`] (PEFT adapters, activation rule), [`kv`] (K/V pools), [`batch`] (a step's
//! inputs and outputs), [`model`] (the forward).

pub mod batch;
pub mod config;
pub mod error;
pub mod kv;
pub mod lora;
pub mod model;
pub mod rope;
pub mod weights;

pub use batch::{ActiveAdapter, SeqStep, StepLogits};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use kv::KvStore;
pub use lora::{find_activation_start, AdapterKind, LoraAdapter, Module};
pub use model::{AttentionImpl, CausalLm};
pub use weights::{LinearWeight, QuantPolicy};
