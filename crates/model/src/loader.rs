//! Loading a servable model from a path: an HF directory or a GGUF file, with its tokenizer
//! and chat template.

use std::path::Path;

use candle_core::{DType, Device};

use crate::chat::ChatTemplate;
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use crate::text::tokenizer::{tok_err, Tokenizer};
use crate::weights::QuantPolicy;
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;

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
            (model, tokenizer_from_gguf(&content)?)
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

/// A tokenizer from GGUF metadata (gpt2-type BPE).
pub fn tokenizer_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer> {
    let mut inner = tokenizers::Tokenizer::from_gguf(ct).map_err(tok_err)?;
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned();
    if !matches!(
        pre.as_deref(),
        Some("qwen2" | "llama3" | "smaug-bpe" | "lfm2")
    ) {
        // candle's generic GPT-2 pipeline adds a prefix space; transformers' GGUF converter
        // (the reference) honours `tokenizer.ggml.add_space_prefix`, false when absent.
        let add_prefix = ct
            .metadata
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        inner.with_pre_tokenizer(Some(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::new(add_prefix, true, true),
        ));
    }
    let id = |k: &str| ct.metadata.get(k).and_then(|v| v.to_u32().ok());
    let name = |i: Option<u32>| i.and_then(|i| inner.id_to_token(i));
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let chat_template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let (bos_token, eos_token) = (name(bos), name(eos));
    Ok(Tokenizer::from_parts(
        inner,
        bos_token,
        eos_token,
        eos.into_iter().collect(),
        chat_template,
    ))
}
