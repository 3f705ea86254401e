//! The trainable adapter: A and B for each targeted projection as candle `Var`s, initialised as
//! PEFT does, loaded from and saved to PEFT's file layout.

use std::collections::HashMap;
use std::path::Path;

use alora_model::{ModelConfig, Module, PeftConfig};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{files, io_err, Result};

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
        alora_model::lora::scaling(self.alpha, self.rank as f64, self.use_rslora)
    }

    /// `adapter_config.json` as PEFT writes it (loadable by `PeftModel.from_pretrained`).
    pub fn peft_config(&self, base_model: &str) -> PeftConfig {
        PeftConfig::new(
            self.rank,
            self.alpha,
            self.dropout,
            self.use_rslora,
            &self.targets,
            self.invocation_tokens.clone(),
            base_model,
        )
    }

    /// The spec of a parsed `adapter_config.json` (the model crate's parser and rules), plus
    /// the trainer's own limit: one rank and one alpha for every module.
    pub fn from_peft_config(c: &PeftConfig) -> Result<AdapterSpec> {
        for (k, empty) in [
            ("rank_pattern", c.rank_pattern.is_empty()),
            ("alpha_pattern", c.alpha_pattern.is_empty()),
        ] {
            if !empty {
                return Err(files(format!("`{k}` is not supported by the trainer")));
            }
        }
        if c.invocation_string.is_some() && c.alora_invocation_tokens.is_none() {
            return Err(files(
                "`invocation_string` adapters are not supported by the trainer; give \
                 `alora_invocation_tokens`",
            ));
        }
        Ok(AdapterSpec {
            invocation_tokens: c.alora_invocation_tokens.clone(),
            rank: c.r,
            alpha: c.alpha(),
            dropout: c.lora_dropout,
            use_rslora: c.use_rslora,
            targets: c.targets()?,
        })
    }
}

/// The trainable factors: `A` [r, in] and `B` [out, r] per (layer, targeted module).
pub struct LoraParams {
    pub spec: AdapterSpec,
    /// Indexed by [`Module::slot`].
    pairs: Vec<Option<(Var, Var)>>,
}

impl LoraParams {
    /// PEFT's default initialisation: A ~ kaiming_uniform(a = sqrt(5)), i.e. U(-1/sqrt(in),
    /// 1/sqrt(in)); B = 0 (so the adapter starts as the identity).
    pub fn init(spec: AdapterSpec, cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = vec![None; cfg.num_layers * Module::PER_LAYER];
        for layer in 0..cfg.num_layers {
            for &m in &spec.targets {
                let (inp, out) = m.dims(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..spec.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), device)?)?;
                let b = Var::zeros((out, spec.rank), DType::F32, device)?;
                pairs[m.slot(layer)] = Some((a, b));
            }
        }
        Ok(LoraParams { spec, pairs })
    }

    /// Loads a PEFT adapter directory as trainable parameters (to resume, or to start from
    /// given weights).
    pub fn load(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let bytes = std::fs::read(&cfg_path).map_err(io_err(&cfg_path))?;
        let spec = AdapterSpec::from_peft_config(&PeftConfig::from_json(&bytes)?)
            .map_err(|e| files(format!("{cfg_path:?}: {e}")))?;
        let w_path = dir.join("adapter_model.safetensors");
        let mut t = candle_core::safetensors::load(&w_path, device)
            .map_err(|e| files(format!("reading {w_path:?}: {e}")))?;
        let mut pairs = vec![None; cfg.num_layers * Module::PER_LAYER];
        for layer in 0..cfg.num_layers {
            for &m in &spec.targets {
                let (inp, out) = m.dims(cfg);
                let mut take = |ab: &str, shape: [usize; 2]| -> Result<Var> {
                    let k = m.peft_key(layer, ab);
                    let x = t
                        .remove(&k)
                        .ok_or_else(|| files(format!("{w_path:?}: no `{k}`")))?;
                    if x.dims() != shape {
                        return Err(files(format!(
                            "{w_path:?}: `{k}` is {:?}, expected {shape:?}",
                            x.dims()
                        )));
                    }
                    Ok(Var::from_tensor(&x.to_dtype(DType::F32)?)?)
                };
                let a = take("A", [spec.rank, inp])?;
                let b = take("B", [out, spec.rank])?;
                pairs[m.slot(layer)] = Some((a, b));
            }
        }
        if let Some(k) = t.keys().next() {
            return Err(files(format!("{w_path:?}: unexpected tensor `{k}`")));
        }
        Ok(LoraParams { spec, pairs })
    }

    /// The factors of one projection, if targeted.
    pub fn pair(&self, layer: usize, m: Module) -> Option<&(Var, Var)> {
        self.pairs.get(m.slot(layer))?.as_ref()
    }

    /// Every parameter with its PEFT tensor name, in a fixed order.
    pub fn named(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (i, p) in self.pairs.iter().enumerate() {
            if let Some((a, b)) = p {
                let (layer, m) = Module::of_slot(i);
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
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tensors: HashMap<String, Tensor> = self
            .named()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let tmp = dir.join(".adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join("adapter_model.safetensors")).map_err(io_err(dir))?;
        let cfg = serde_json::to_string_pretty(&self.spec.peft_config(base_model).to_json())
            .expect("a JSON value serializes");
        let tmp = dir.join(".adapter_config.json.tmp");
        std::fs::write(&tmp, cfg).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, dir.join("adapter_config.json")).map_err(io_err(dir))?;
        Ok(())
    }
}
