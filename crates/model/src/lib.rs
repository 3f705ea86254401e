//! alora's model: an aLoRA-aware Llama / Granite 3.x causal LM on candle, computing what PEFT
//! computes for base, LoRA and aLoRA requests in one forward over a ragged batch whose KV lives
//! in paged blocks owned by the cache crate.
//!
//! By area: [`weights`] (safetensors and GGUF apart, quantization, the projection routing rule),
//! [`lora`] (PEFT adapters and the one typed `adapter_config.json`, [`PeftConfig`]), [`model`]
//! (layers, the step, the attention path), [`text`] (templates, tokenizer, prompt building,
//! sampling, the output state machine); besides them [`config`] (HF / GGUF config), [`rope`],
//! [`kv`] (K/V pools), [`batch`] (a step's inputs and outputs), [`loader`] (path -> model +
//! tokenizer + template), [`generate`] (one-sequence generation).

#![deny(unsafe_code)]

/// The block-quantized matrices the weights hold (`alora-kernels`).
pub use alora_kernels::qmatmul;

pub use text::{chat, grammar, sampling, tokenizer, tools};

pub mod batch;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv;
pub mod loader;
pub mod lora;
pub mod model;
mod ops;
pub mod rope;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod text;
pub mod weights;

pub use batch::{ActiveAdapter, SeqStep, StepLogits};
pub use chat::{ChatMessage, ChatTemplate, RenderArgs};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use generate::{generate, GenerateOptions, Generation};
pub use kv::KvStore;
pub use loader::{LoadOptions, LoadedModel};
pub use lora::{
    find_activation_start, AdapterKind, LoraAdapter, Module, PeftConfig, PeftConfigError,
};
pub use model::{causal_mask, AttentionImpl, CausalLm, DenseLayer, DenseWeights, StepInProgress};
pub use sampling::{Sampled, Sampler, SamplingParams, StopCheck, StopStrings};
pub use text::output::{FinishReason, OutputLimits, OutputStream, Pushed};
pub use text::prompt::{Prompt, PromptAdapter};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
pub use weights::{LinearWeight, QuantPolicy};
