//! alora-trainer: fine-tunes aLoRA and LoRA adapters with candle's autograd and writes them in
//! PEFT's layout, so `PeftModel.from_pretrained` and `alora serve` both load them.
//!
//! - [`data`]: JSONL conversations to token ids with the target span and activation start.
//! - [`params`]: the trainable A/B factors, PEFT init, PEFT files both ways.
//! - [`forward`]: a differentiable Llama/Granite forward on the model crate's dense weights.
//! - [`optim`]: AdamW, the linear schedule, gradient clipping.
//! - [`train`]: the loop (accumulation, validation, best-so-far saving, checkpoints).
//! - [`error`]: [`TrainError`], the one error type of the library.
//! - [`eval`]: held-out exact-match accuracy of an intrinsic against the majority baseline.

pub mod data;
pub mod error;
pub mod eval;
pub mod forward;
pub mod optim;
pub mod params;
pub mod train;

pub use data::{Encoder, Example};
pub use error::{Result, TrainError};
pub use forward::{AdapterUse, Past, TrainModel};
pub use params::{AdapterSpec, LoraParams};
pub use train::{batch_gradients, eval_loss, example_loss, TrainConfig, Trainer};
