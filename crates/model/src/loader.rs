//! Loading a servable model from a path: an HF directory or a GGUF file, with its tokenizer
//! and chat template.

use std::path::Path;

use candle_core::{DType, Device};

use crate::chat::ChatTemplate;
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;
use crate::weights::QuantPolicy;

/// Options for [`LoadedModel::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// dtype for HF checkpoints (GGUF models compute in f32 on CPU).
    pub dtype: DType,
    pub device: Device,
    /// How GGUF weights are held.
    pub quant: QuantPolicy,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            quant: QuantPolicy::Blocks,
        }
    }
}

/// A model with everything needed to turn chats into tokens and tokens into text.
pub struct LoadedModel {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// A display name (file or directory name).
    pub name: String,
}

impl LoadedModel {
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let (model, tokenizer) = if path.is_dir() {
            let model = CausalLm::load_hf(path, opts.dtype, &opts.device)?;
            let tok = Tokenizer::from_hf_dir(path, &model.config().eos_token_ids)?;
            (model, tok)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            let (model, content) = CausalLm::load_gguf(path, opts.quant, &opts.device)?;
            (model, Tokenizer::from_gguf(&content)?)
        } else {
            return Err(ModelError::Config(format!(
                "{}: expected an HF model directory or a .gguf file",
                path.display()
            )));
        };
        let template = ChatTemplate::new(
            tokenizer.chat_template.as_deref(),
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?;
        Ok(LoadedModel {
            model,
            tokenizer,
            template,
            name,
        })
    }
}
