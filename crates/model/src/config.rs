//! Model configuration: HF `config.json` or GGUF metadata parsed into one runtime config with
//! no optional fields (parse, don't validate).

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The decoder families this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    /// Granite 3.x: Llama plus four scalars (see [`ModelConfig`]).
    Granite,
}

pub const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM, GraniteForCausalLM (GGUF: llama, granite)";

/// Rotary embedding frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1 frequency-dependent scaling (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Input embeddings are multiplied by this (Granite; 1 for Llama).
    pub embedding_multiplier: f64,
    /// The softmax scale (Granite's `attention_multiplier`; `1/sqrt(head_dim)` for Llama).
    pub attention_scale: f64,
    /// Each attention and MLP output is multiplied by this before the residual add.
    pub residual_multiplier: f64,
    /// Logits are divided by this.
    pub logits_scaling: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `eos_token_id` is an int or a list in HF configs.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<HashMap<String, serde_json::Value>>,
    /// transformers >= 5 puts theta and scaling here.
    rope_parameters: Option<HashMap<String, serde_json::Value>>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    embedding_multiplier: Option<f64>,
    attention_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

fn get_f64(m: &HashMap<String, serde_json::Value>, k: &str) -> Option<f64> {
    m.get(k).and_then(|v| v.as_f64())
}

fn parse_rope(
    theta: Option<f64>,
    params: Option<&HashMap<String, serde_json::Value>>,
) -> Result<(f64, RopeScaling)> {
    let theta = params
        .and_then(|p| get_f64(p, "rope_theta"))
        .or(theta)
        .unwrap_or(10_000.0);
    let Some(p) = params else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "llama3" => {
            let need = |k: &str| {
                get_f64(p, k)
                    .ok_or_else(|| ModelError::Config(format!("llama3 rope scaling lacks `{k}`")))
            };
            RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position: need("original_max_position_embeddings")? as usize,
            }
        }
        other => {
            return Err(ModelError::Config(format!(
                "rope type `{other}` is not supported (supported: default, llama3)"
            )))
        }
    };
    Ok((theta, scaling))
}

impl ModelConfig {
    /// `x + branch * residual_multiplier`: the residual add after attention and after the MLP
    /// (Granite scales the branch; Llama's multiplier is 1). Shared by the serving and the
    /// training forward.
    pub fn residual(
        &self,
        x: &candle_core::Tensor,
        branch: candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        let r = self.residual_multiplier;
        if r == 1.0 {
            x + branch
        } else {
            x + branch.affine(r, 0.0)?
        }
    }

    /// Parses an HF `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let arch_name = c.architectures.first().cloned().unwrap_or_default();
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "MistralForCausalLM" => Architecture::Llama,
            "GraniteForCausalLM" => Architecture::Granite,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    found: arch_name,
                    supported: SUPPORTED_ARCHITECTURES,
                })
            }
        };
        if c.attention_bias || c.mlp_bias {
            return Err(ModelError::Config(
                "attention_bias / mlp_bias are not supported".into(),
            ));
        }
        // transformers 5 moved rope settings into `rope_parameters`; 4.x had `rope_scaling`.
        let rope_params = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
        let (rope_theta, rope_scaling) = parse_rope(c.rope_theta, rope_params)?;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        let granite = architecture == Architecture::Granite;
        let cfg = ModelConfig {
            architecture,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            embedding_multiplier: if granite {
                c.embedding_multiplier.unwrap_or(1.0)
            } else {
                1.0
            },
            attention_scale: match (granite, c.attention_multiplier) {
                (true, Some(m)) => m,
                _ => 1.0 / (head_dim as f64).sqrt(),
            },
            residual_multiplier: if granite {
                c.residual_multiplier.unwrap_or(1.0)
            } else {
                1.0
            },
            logits_scaling: if granite {
                c.logits_scaling.unwrap_or(1.0)
            } else {
                1.0
            },
            bos_token_id: c.bos_token_id,
            eos_token_ids: match c.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(x)) => vec![x],
                Some(OneOrMany::Many(v)) => v,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the config from GGUF metadata (`general.architecture` llama or granite).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = &ct.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let architecture = match arch.as_str() {
            "llama" => Architecture::Llama,
            "granite" => Architecture::Granite,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    found: format!("gguf:{arch}"),
                    supported: SUPPORTED_ARCHITECTURES,
                })
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| -> Result<usize> {
            md.get(&key(k))
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks `{}`", key(k))))?
                .to_u32()
                .map(|x| x as usize)
                .map_err(|e| ModelError::Config(format!("GGUF `{}`: {e}", key(k))))
        };
        let f = |k: &str| -> Option<f64> {
            md.get(&key(k)).and_then(|v| v.to_f32().ok()).map(f64::from)
        };
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let head_dim = u("rope.dimension_count").unwrap_or(hidden_size / num_heads);
        let vocab_size = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => ct
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| ModelError::Config("GGUF: no vocab size".into()))?,
        };
        let granite = architecture == Architecture::Granite;
        let tok_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads: u("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
            // llama.cpp stores llama3 scaling as a precomputed `rope_freqs` tensor; models that
            // carry one are refused in the loader rather than silently run without it.
            rope_scaling: RopeScaling::None,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            embedding_multiplier: if granite {
                f("embedding_scale").unwrap_or(1.0)
            } else {
                1.0
            },
            attention_scale: match (granite, f("attention.scale")) {
                (true, Some(s)) => s,
                _ => 1.0 / (head_dim as f64).sqrt(),
            },
            residual_multiplier: if granite {
                f("residual_scale").unwrap_or(1.0)
            } else {
                1.0
            },
            logits_scaling: if granite {
                f("logit_scale").unwrap_or(1.0)
            } else {
                1.0
            },
            bos_token_id: tok_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok_u32("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.logits_scaling == 0.0 {
            return bad("logits_scaling must be non-zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEGACY: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
      "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
      "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
      "high_freq_factor":4.0,"original_max_position_embeddings":8192},"eos_token_id":[3,4]}"#;

    #[test]
    fn legacy_rope_scaling_and_eos_list() {
        let c = ModelConfig::from_hf_json(LEGACY).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                original_max_position: 8192,
                ..
            }
        ));
        assert_eq!(c.eos_token_ids, vec![3, 4]);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = LEGACY.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = ModelConfig::from_hf_json(&text).unwrap_err().to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_rope_type_is_refused() {
        let text = LEGACY.replace("\"llama3\"", "\"yarn\"");
        let err = ModelConfig::from_hf_json(&text).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }
}
