//! PEFT LoRA and aLoRA adapters: loading, validation, identity, and the activation rule.
//!
//! Per targeted linear layer (PEFT `LoraLayer` / `ALoraLinearVariant`):
//!
//! ```text
//!   y = x W^T                                   every token
//!   y += ((x A^T) B^T) * scaling                adapted tokens only, computed in f32
//!   scaling = alpha / r, or alpha / sqrt(r) with use_rslora   (per module via the patterns)
//! ```
//!
//! An aLoRA adapts absolute positions `p >= s`, s being the start of the LAST occurrence of its
//! invocation tokens in the prompt ([`find_activation_start`]); a plain LoRA adapts everything.

use std::collections::HashMap;
use std::path::Path;

use alora_cache::AdapterDigest;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::error::{io_err, ModelError, Result};
pub use crate::text::prompt::find_activation_start;
pub use config::{scaling, PeftConfig, PeftConfigError, TargetModules};

mod config;

/// The projections an adapter may target, in checkpoint names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The module's parent in checkpoint names (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    /// The module named `s` in checkpoints (`q_proj`, ..., `down_proj`).
    pub fn from_name(s: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == s)
    }

    /// (in, out) features of this projection in `cfg`.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        match self {
            Module::Q => (h, q),
            Module::K | Module::V => (h, kv),
            Module::O => (q, h),
            Module::Gate | Module::Up => (h, i),
            Module::Down => (i, h),
        }
    }

    /// Position in [`Module::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Slots per layer in a per-(layer, module) table.
    pub const PER_LAYER: usize = Module::ALL.len();

    /// The one slot rule of per-(layer, module) tables (adapters, trainable factors):
    /// `layer * PER_LAYER + index`.
    pub fn slot(self, layer: usize) -> usize {
        layer * Self::PER_LAYER + self.index()
    }

    /// The inverse of [`slot`](Self::slot): (layer, module).
    pub fn of_slot(slot: usize) -> (usize, Module) {
        (slot / Self::PER_LAYER, Module::ALL[slot % Self::PER_LAYER])
    }

    /// PEFT's tensor name for factor `ab` ("A" or "B") of this module in `layer`.
    pub fn peft_key(self, layer: usize, ab: &str) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight",
            self.parent(),
            self.name()
        )
    }
}

/// Whether an adapter adapts every token or only from its invocation on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterKind {
    Lora,
    ALora { invocation_tokens: Vec<u32> },
}

/// One targeted projection's factors, kept in f32 as PEFT keeps them.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// A^T: [in, r]
    pub a_t: Tensor,
    /// B^T: [r, out]
    pub b_t: Tensor,
    pub scaling: f64,
}

/// A loaded adapter. Cheap to share (`Arc`); immutable once loaded.
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    pub kind: AdapterKind,
    /// SHA-256 of `adapter_config.json` and the weights file: the cache keys on this.
    pub digest: AdapterDigest,
    pub rank: usize,
    pub targets: Vec<Module>,
    pairs: Vec<Option<LoraPair>>,
}

fn adapter_err(dir: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Adapter {
        path: dir.display().to_string(),
        msg: msg.into(),
    }
}

/// Turns an IBM-style `invocation_string` into token ids; the loader passes the model's
/// tokenizer encode (`add_special_tokens = false`).
pub type EncodeFn<'a> = &'a dyn Fn(&str) -> Result<Vec<u32>>;

impl LoraAdapter {
    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    pub fn load(
        name: &str,
        dir: &Path,
        model: &ModelConfig,
        device: &Device,
        encode: Option<EncodeFn<'_>>,
    ) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        for p in [&cfg_path, &dir.join("adapter_model.safetensors")] {
            // A FIFO or device would block or never end the read below.
            let meta = std::fs::metadata(p).map_err(io_err(p))?;
            if !meta.is_file() {
                let f = p.file_name().unwrap_or_default().to_string_lossy();
                return Err(adapter_err(dir, format!("`{f}` is not a regular file")));
            }
        }
        let cfg_bytes = std::fs::read(&cfg_path).map_err(io_err(&cfg_path))?;
        let cfg = PeftConfig::from_json(&cfg_bytes).map_err(|e| adapter_err(dir, e.to_string()))?;
        let kind = Self::kind(dir, &cfg, encode)?;
        if let AdapterKind::ALora { invocation_tokens } = &kind {
            // An id past the vocabulary would fail every step the request joins.
            if let Some(t) = invocation_tokens
                .iter()
                .find(|&&t| t as usize >= model.vocab_size)
            {
                return Err(adapter_err(
                    dir,
                    format!(
                        "invocation token {t} is not below the model's vocabulary size {}",
                        model.vocab_size
                    ),
                ));
            }
        }
        let w_path = dir.join("adapter_model.safetensors");
        let w_bytes = std::fs::read(&w_path).map_err(io_err(&w_path))?;
        let digest = {
            let mut h = Sha256::new();
            h.update((cfg_bytes.len() as u64).to_le_bytes());
            h.update(&cfg_bytes);
            h.update(&w_bytes);
            if let AdapterKind::ALora { invocation_tokens } = &kind {
                for t in invocation_tokens {
                    h.update(t.to_le_bytes());
                }
            }
            AdapterDigest(h.finalize().into())
        };
        let tensors = candle_core::safetensors::load_buffer(&w_bytes, device)
            .map_err(|e| adapter_err(dir, format!("adapter_model.safetensors: {e}")))?;
        let (pairs, rank, targets) = Self::pairs(dir, &cfg, tensors, model)?;
        Ok(LoraAdapter {
            name: name.to_string(),
            kind,
            digest,
            rank,
            targets,
            pairs,
        })
    }

    fn kind(dir: &Path, cfg: &PeftConfig, encode: Option<EncodeFn<'_>>) -> Result<AdapterKind> {
        if let Some(toks) = &cfg.alora_invocation_tokens {
            // Non-empty: checked with the config.
            return Ok(AdapterKind::ALora {
                invocation_tokens: toks.clone(),
            });
        }
        // IBM's format: a string. PEFT would drop it and run a plain LoRA; we convert it.
        if let Some(s) = &cfg.invocation_string {
            let encode = encode.ok_or_else(|| {
                adapter_err(
                    dir,
                    "`invocation_string` needs the model's tokenizer to convert",
                )
            })?;
            let toks = encode(s)?;
            if toks.is_empty() {
                return Err(adapter_err(dir, "invocation_string encodes to no tokens"));
            }
            return Ok(AdapterKind::ALora {
                invocation_tokens: toks,
            });
        }
        Ok(AdapterKind::Lora)
    }

    #[allow(clippy::type_complexity)]
    fn pairs(
        dir: &Path,
        cfg: &PeftConfig,
        mut tensors: HashMap<String, Tensor>,
        model: &ModelConfig,
    ) -> Result<(Vec<Option<LoraPair>>, usize, Vec<Module>)> {
        // Keys: base_model.model.model.layers.{L}.{self_attn|mlp}.{module}.lora_{A|B}.weight
        let mut found: HashMap<(usize, Module), ()> = HashMap::new();
        for key in tensors.keys() {
            let rest = key
                .strip_prefix("base_model.model.model.layers.")
                .ok_or_else(|| {
                    adapter_err(
                        dir,
                        format!("unexpected tensor `{key}` (only layer projections are supported)"),
                    )
                })?;
            let parts: Vec<&str> = rest.split('.').collect();
            let parsed = match parts.as_slice() {
                [l, _parent, m, ab, "weight"] if *ab == "lora_A" || *ab == "lora_B" => {
                    l.parse::<usize>().ok().zip(Module::from_name(m))
                }
                _ => None,
            };
            let (layer, module) = parsed.ok_or_else(|| {
                adapter_err(
                    dir,
                    format!("unsupported tensor `{key}` (targets among q/k/v/o/gate/up/down only)"),
                )
            })?;
            if layer >= model.num_layers {
                return Err(adapter_err(
                    dir,
                    format!("`{key}`: the model has {} layers", model.num_layers),
                ));
            }
            found.insert((layer, module), ());
        }
        if found.is_empty() {
            return Err(adapter_err(dir, "no LoRA weights found"));
        }
        let mut pairs = vec![None; model.num_layers * Module::PER_LAYER];
        let mut targets = Vec::new();
        let mut max_rank = 0;
        for (&(layer, module), ()) in &found {
            let full_name = format!("model.layers.{layer}.{}.{}", module.parent(), module.name());
            let mut take = |ab: &str| {
                let k = module.peft_key(layer, ab);
                tensors
                    .remove(&k)
                    .ok_or_else(|| adapter_err(dir, format!("`{k}` is missing")))
            };
            let a = take("A")?.to_dtype(DType::F32)?;
            let b = take("B")?.to_dtype(DType::F32)?;
            for (ab, t) in [("lora_A", &a), ("lora_B", &b)] {
                if !t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|v| v.is_finite())
                {
                    return Err(adapter_err(
                        dir,
                        format!("{full_name}: {ab} holds values that are not finite"),
                    ));
                }
            }
            let (inp, out) = module.dims(model);
            let r = cfg.rank_of(&full_name);
            if a.dims() != [r, inp] || b.dims() != [out, r] {
                return Err(adapter_err(
                    dir,
                    format!(
                        "{full_name}: lora_A {:?} / lora_B {:?}, expected [{r}, {inp}] / [{out}, {r}]",
                        a.dims(),
                        b.dims()
                    ),
                ));
            }
            let scaling = cfg.scaling_of(&full_name);
            max_rank = max_rank.max(r);
            if !targets.contains(&module) {
                targets.push(module);
            }
            pairs[module.slot(layer)] = Some(LoraPair {
                a_t: a.t()?.contiguous()?,
                b_t: b.t()?.contiguous()?,
                scaling,
            });
        }
        targets.sort_by_key(|m| m.index());
        Ok((pairs, max_rank, targets))
    }

    /// The factors for one projection, if the adapter targets it.
    /// Fault injection for tests: a copy named `name` (with another digest) whose first pair's
    /// A^T has one row too many, so every forward through it fails with a shape error, as a
    /// corrupt adapter that slipped past validation would.
    #[cfg(feature = "testing")]
    pub fn broken_copy(&self, name: &str) -> Result<LoraAdapter> {
        let mut pairs = self.pairs.clone();
        let p = pairs
            .iter_mut()
            .flatten()
            .next()
            .ok_or_else(|| ModelError::Config("an adapter without factors".into()))?;
        let (rows, r) = p.a_t.dims2()?;
        p.a_t = Tensor::zeros((rows + 1, r), p.a_t.dtype(), p.a_t.device())?;
        let mut digest = self.digest;
        digest.0[0] ^= 0xff;
        Ok(LoraAdapter {
            name: name.to_string(),
            kind: self.kind.clone(),
            digest,
            rank: self.rank,
            targets: self.targets.clone(),
            pairs,
        })
    }

    pub fn pair(&self, layer: usize, module: Module) -> Option<&LoraPair> {
        self.pairs.get(module.slot(layer))?.as_ref()
    }

    /// The invocation tokens of an aLoRA.
    pub fn invocation_tokens(&self) -> Option<&[u32]> {
        match &self.kind {
            AdapterKind::ALora { invocation_tokens } => Some(invocation_tokens),
            AdapterKind::Lora => None,
        }
    }

    /// The first adapted position for a prompt: 0 for a LoRA, s for an aLoRA whose invocation
    /// occurs, `None` (run the base model) when it does not.
    pub fn activation_start(&self, prompt: &[u32]) -> Option<usize> {
        match &self.kind {
            AdapterKind::Lora => Some(0),
            AdapterKind::ALora { invocation_tokens } => {
                find_activation_start(prompt, invocation_tokens)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's own test cases (tests/test_lora_variants.py), as quoted in docs/ALORA.md.
    #[test]
    fn activation_start_matches_peft_cases() {
        let cases: &[(&[u32], &[u32], Option<usize>)] = &[
            (&[0, 1, 2, 3], &[1, 2], Some(1)),
            (&[0, 4, 5, 6], &[1, 2], None),
            (&[1, 2, 1, 2], &[1, 2], Some(2)),
            (&[0, 4, 1, 2], &[1, 2], Some(2)),
            (&[1, 2, 3, 4], &[1, 2], Some(0)),
            (&[0, 4, 1, 4], &[1, 2], None),
            // Overlapping: the last start wins.
            (&[7, 7, 7], &[7, 7], Some(1)),
            (&[1], &[1, 2], None),
        ];
        for (ids, inv, want) in cases {
            assert_eq!(find_activation_start(ids, inv), *want, "{ids:?} {inv:?}");
        }
    }
}
