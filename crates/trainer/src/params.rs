//! The trainable adapter: A and B for each targeted projection as candle `Var`s, initialised as
//! PEFT does, loaded from and saved to PEFT's file layout.

use std::collections::HashMap;
use std::path::Path;

use alora_model::{ModelConfig, Module};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// What kind of adapter is trained, and its hyper-parameters (PEFT's `LoraConfig` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// `Some(ids)`: aLoRA with this invocation sequence; `None`: plain LoRA.
    pub invocation_tokens: Option<Vec<u32>>,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: Vec<Module>,
}

impl AdapterSpec {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// `adapter_config.json` as PEFT writes it (loadable by `PeftModel.from_pretrained`).
    pub fn peft_config(&self, base_model: &str) -> Value {
        let mut targets: Vec<&str> = self.targets.iter().map(|m| m.name()).collect();
        targets.sort();
        let mut v = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": null,
            "layers_pattern": null,
            "revision": null,
        });
        if let Some(t) = &self.invocation_tokens {
            v["alora_invocation_tokens"] = json!(t);
        }
        v
    }

    /// Reads the fields this trainer supports from an `adapter_config.json`.
    pub fn from_peft_config(v: &Value) -> Result<AdapterSpec> {
        if v["peft_type"] != "LORA" {
            bail!("peft_type is not LORA");
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v[k].as_object().is_some_and(|o| !o.is_empty()) {
                bail!("`{k}` is not supported by the trainer");
            }
        }
        let rank = v["r"].as_u64().context("no `r`")? as usize;
        let targets = match &v["target_modules"] {
            Value::Array(a) => a
                .iter()
                .map(|m| {
                    let n = m.as_str().unwrap_or_default();
                    Module::from_name(n).with_context(|| format!("unsupported target `{n}`"))
                })
                .collect::<Result<Vec<_>>>()?,
            Value::String(s) => bail!("target_modules `{s}` as a regex is not supported"),
            _ => bail!("no target_modules"),
        };
        Ok(AdapterSpec {
            invocation_tokens: match &v["alora_invocation_tokens"] {
                Value::Null => None,
                t => Some(serde_json::from_value(t.clone()).context("alora_invocation_tokens")?),
            },
            rank,
            alpha: v["lora_alpha"].as_f64().unwrap_or(rank as f64),
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
            use_rslora: v["use_rslora"].as_bool().unwrap_or(false),
            targets,
        })
    }
}

/// The trainable factors: `A` [r, in] and `B` [out, r] per (layer, targeted module).
pub struct LoraParams {
    pub spec: AdapterSpec,
    /// Indexed by `layer * 7 + module index`.
    pairs: Vec<Option<(Var, Var)>>,
}

fn slot(layer: usize, m: Module) -> usize {
    layer * Module::ALL.len() + Module::ALL.iter().position(|x| *x == m).unwrap()
}

impl LoraParams {
    /// PEFT's default initialisation: A ~ kaiming_uniform(a = sqrt(5)), i.e. U(-1/sqrt(in),
    /// 1/sqrt(in)); B = 0 (so the adapter starts as the identity).
    pub fn init(spec: AdapterSpec, cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = vec![None; cfg.num_layers * Module::ALL.len()];
        for layer in 0..cfg.num_layers {
            for &m in &spec.targets {
                let (inp, out) = m.dims(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..spec.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), device)?)?;
                let b = Var::zeros((out, spec.rank), DType::F32, device)?;
                pairs[slot(layer, m)] = Some((a, b));
            }
        }
        Ok(LoraParams { spec, pairs })
    }

    /// Loads a PEFT adapter directory as trainable parameters (to resume, or to start from
    /// given weights).
    pub fn load(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let v: Value = serde_json::from_slice(
            &std::fs::read(&cfg_path).with_context(|| format!("reading {cfg_path:?}"))?,
        )
        .with_context(|| format!("{cfg_path:?}"))?;
        let spec = AdapterSpec::from_peft_config(&v).with_context(|| format!("{cfg_path:?}"))?;
        let w_path = dir.join("adapter_model.safetensors");
        let mut t = candle_core::safetensors::load(&w_path, device)
            .with_context(|| format!("reading {w_path:?}"))?;
        let mut pairs = vec![None; cfg.num_layers * Module::ALL.len()];
        for layer in 0..cfg.num_layers {
            for &m in &spec.targets {
                let (inp, out) = m.dims(cfg);
                let mut take = |ab: &str, shape: [usize; 2]| -> Result<Var> {
                    let k = m.peft_key(layer, ab);
                    let x = t
                        .remove(&k)
                        .with_context(|| format!("{w_path:?}: no `{k}`"))?;
                    if x.dims() != shape {
                        bail!("{w_path:?}: `{k}` is {:?}, expected {shape:?}", x.dims());
                    }
                    Ok(Var::from_tensor(&x.to_dtype(DType::F32)?)?)
                };
                let a = take("A", [spec.rank, inp])?;
                let b = take("B", [out, spec.rank])?;
                pairs[slot(layer, m)] = Some((a, b));
            }
        }
        if let Some(k) = t.keys().next() {
            bail!("{w_path:?}: unexpected tensor `{k}`");
        }
        Ok(LoraParams { spec, pairs })
    }

    /// The factors of one projection, if targeted.
    pub fn pair(&self, layer: usize, m: Module) -> Option<&(Var, Var)> {
        self.pairs.get(slot(layer, m))?.as_ref()
    }

    /// Every parameter with its PEFT tensor name, in a fixed order.
    pub fn named(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (i, p) in self.pairs.iter().enumerate() {
            if let Some((a, b)) = p {
                let (layer, m) = (i / Module::ALL.len(), Module::ALL[i % Module::ALL.len()]);
                out.push((m.peft_key(layer, "A"), a));
                out.push((m.peft_key(layer, "B"), b));
            }
        }
        out
    }

    pub fn num_params(&self) -> usize {
        self.named().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`, atomically
    /// per file (written aside, then renamed).
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
        let tensors: HashMap<String, Tensor> = self
            .named()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let tmp = dir.join(".adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
        let cfg = serde_json::to_string_pretty(&self.spec.peft_config(base_model))?;
        let tmp = dir.join(".adapter_config.json.tmp");
        std::fs::write(&tmp, cfg)?;
        std::fs::rename(&tmp, dir.join("adapter_config.json"))?;
        Ok(())
    }
}
