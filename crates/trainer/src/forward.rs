//! The training forward: the same Llama/Granite math as `alora_model::CausalLm::forward`, built
//! only from ops whose gradients candle implements (`rope_slow`, `rms_norm_slow`, `softmax`,
//! matmuls on dense f32 weights), for one sequence at a time.
//!
//! aLoRA training splits each example at its activation start s: the prefix before s runs the
//! base model only, so its K/V do not depend on the adapter and it runs without a graph
//! ([`TrainModel::forward`] with no adapter); the suffix from s runs with the adapter, in the
//! graph, attending to the prefix's K/V. The loss and gradients equal a full forward's (the
//! parity test compares them with PEFT) at a fraction of the cost for long conversations.

use std::cell::RefCell;

use crate::error::{data, Result};
use alora_model::{
    causal_mask, rope::Rope, Architecture, CausalLm, DenseWeights, ModelConfig, Module,
};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::params::LoraParams;

/// Per-layer K and V of the positions already run, each [1, kv_heads, P, head_dim].
#[derive(Debug, Clone)]
pub struct Past {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl Past {
    pub fn len(&self) -> usize {
        self.k.first().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same K/V cut off from any graph (constants for the next chunk).
    pub fn detach(&self) -> Past {
        Past {
            k: self.k.iter().map(|t| t.detach()).collect(),
            v: self.v.iter().map(|t| t.detach()).collect(),
        }
    }
}

/// The adapter as one forward applies it.
pub struct AdapterUse<'a> {
    pub params: &'a LoraParams,
    /// [T, 1] f32: 1 on rows the adapter adapts (p >= s), 0 elsewhere.
    pub rows: Tensor,
    /// Dropout on the adapter's input (training only): probability and the mask source.
    pub dropout: Option<(f64, RefCell<StdRng>)>,
}

impl<'a> AdapterUse<'a> {
    /// Adapts every row of a chunk of `t` tokens.
    pub fn all_rows(params: &'a LoraParams, t: usize, device: &Device) -> Result<Self> {
        Ok(AdapterUse {
            params,
            rows: Tensor::ones((t, 1), DType::F32, device)?,
            dropout: None,
        })
    }

    /// Adapts rows at absolute positions >= `s` of a chunk starting at `start`.
    pub fn from_position(
        params: &'a LoraParams,
        start: usize,
        t: usize,
        s: usize,
        device: &Device,
    ) -> Result<Self> {
        let m: Vec<f32> = (start..start + t)
            .map(|p| if p >= s { 1.0 } else { 0.0 })
            .collect();
        Ok(AdapterUse {
            params,
            rows: Tensor::from_vec(m, (t, 1), device)?,
            dropout: None,
        })
    }

    pub fn with_dropout(mut self, p: f64, seed: u64) -> Self {
        if p > 0.0 {
            self.dropout = Some((p, RefCell::new(StdRng::seed_from_u64(seed))));
        }
        self
    }
}

/// `x W^T` with `W` frozen. candle's matmul backward also computes the gradient of `W` (a full
/// [out, in] tensor per projection per example, allocated, zeroed and summed), which training
/// throws away: measured on SmolLM2 that was most of an aLoRA step. This op's backward returns
/// only the gradient of `x`.
struct FrozenLinear(Tensor);

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("frozen-linear: f32 only")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: input must be contiguous")
        };
        let x = Tensor::from_slice(&v[a..b], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0)?))
    }
}

/// `x W^T` for a frozen base weight `W` [out, in].
fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(
        if x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1(FrozenLinear(w.clone()))?
        } else {
            x.matmul(&w.t()?)?
        },
    )
}

pub struct TrainModel {
    cfg: ModelConfig,
    w: DenseWeights,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl TrainModel {
    /// Dense f32 copies of `model`'s weights (shared where they already are).
    pub fn new(model: &CausalLm) -> Result<Self> {
        let device = model.device().clone();
        let all = Tensor::arange(0u32, model.max_positions() as u32, &device)?;
        let (cos, sin) = model.rope().gather(&all)?;
        Ok(TrainModel {
            cfg: model.config().clone(),
            w: model.dense_weights()?,
            cos: cos.to_dtype(DType::F32)?,
            sin: sin.to_dtype(DType::F32)?,
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    fn linear(
        &self,
        x: &Tensor,
        layer: usize,
        m: Module,
        adapter: Option<&AdapterUse<'_>>,
    ) -> Result<Tensor> {
        let y = frozen_matmul(x, self.w.layers[layer].weight(m))?;
        let Some(ad) = adapter else { return Ok(y) };
        let Some((a, b)) = ad.params.pair(layer, m) else {
            return Ok(y);
        };
        let x = match &ad.dropout {
            Some((p, rng)) => {
                let keep = 1.0 - *p;
                let mut rng = rng.borrow_mut();
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| {
                        if rng.random::<f64>() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                (x * Tensor::from_vec(mask, x.shape(), &self.device)?)?
            }
            None => x.clone(),
        };
        let delta = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
        let delta = delta.broadcast_mul(&ad.rows.affine(ad.params.spec.scaling(), 0.0)?)?;
        Ok((y + delta)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm_slow(
            x,
            w,
            self.cfg.rms_norm_eps as f32,
        )?)
    }

    fn residual(&self, x: &Tensor, branch: Tensor) -> Result<Tensor> {
        Ok(self.cfg.residual(x, branch)?)
    }

    /// Runs `ids` at the positions after `past` (0 if none). Returns the final-normed hidden
    /// states [T, hidden] and the K/V of `past` plus these tokens.
    pub fn forward(
        &self,
        ids: &[u32],
        past: Option<&Past>,
        adapter: Option<&AdapterUse<'_>>,
    ) -> Result<(Tensor, Past)> {
        let cfg = &self.cfg;
        let (t, start) = (ids.len(), past.map_or(0, Past::len));
        if t == 0 {
            return Err(data("no tokens to run"));
        }
        if start + t > self.max_positions() {
            return Err(data(format!(
                "{} tokens exceed the model's {} positions",
                start + t,
                self.max_positions()
            )));
        }
        let (nh, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        // Causal mask over [past + new] keys: query i sees keys <= start + i.
        let total = start + t;
        let mask = causal_mask(start, t, total, &self.device)?;

        let ids_t = Tensor::new(ids, &self.device)?;
        let mut x = self.w.embed_tokens.index_select(&ids_t, 0)?;
        if cfg.architecture == Architecture::Granite {
            x = x.affine(cfg.embedding_multiplier, 0.0)?;
        }
        let mut new_past = Past {
            k: Vec::with_capacity(cfg.num_layers),
            v: Vec::with_capacity(cfg.num_layers),
        };
        for l in 0..cfg.num_layers {
            let lw = &self.w.layers[l];
            let h = self.rms_norm(&x, &lw.input_layernorm)?;
            let q = self
                .linear(&h, l, Module::Q, adapter)?
                .reshape((1, t, nh, hd))?;
            let k = self
                .linear(&h, l, Module::K, adapter)?
                .reshape((1, t, kvh, hd))?;
            let v = self
                .linear(&h, l, Module::V, adapter)?
                .reshape((1, t, kvh, hd))?;
            let q = Rope::apply_diff(&q, &cos, &sin)?
                .transpose(1, 2)?
                .contiguous()?;
            let k = Rope::apply_diff(&k, &cos, &sin)?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v.transpose(1, 2)?.contiguous()?;
            let (k, v) = match past {
                Some(p) if !p.is_empty() => (
                    Tensor::cat(&[&p.k[l], &k], 2)?,
                    Tensor::cat(&[&p.v[l], &v], 2)?,
                ),
                _ => (k, v),
            };
            let rep = nh / kvh;
            let expand = |x: &Tensor| -> Result<Tensor> {
                Ok(if rep == 1 {
                    x.clone()
                } else {
                    x.unsqueeze(2)?
                        .broadcast_as((1, kvh, rep, total, hd))?
                        .reshape((1, nh, total, hd))?
                })
            };
            let (kr, vr) = (expand(&k)?, expand(&v)?);
            let att = q
                .matmul(&kr.t()?.contiguous()?)?
                .affine(cfg.attention_scale, 0.0)?
                .broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax(&att, D::Minus1)?;
            let o = p.matmul(&vr)?.transpose(1, 2)?.reshape((t, nh * hd))?;
            let o = self.linear(&o, l, Module::O, adapter)?;
            x = self.residual(&x, o)?;
            let h = self.rms_norm(&x, &lw.post_attention_layernorm)?;
            let gate = self.linear(&h, l, Module::Gate, adapter)?.silu()?;
            let up = self.linear(&h, l, Module::Up, adapter)?;
            let down = self.linear(&(gate * up)?, l, Module::Down, adapter)?;
            x = self.residual(&x, down)?;
            new_past.k.push(k);
            new_past.v.push(v);
        }
        Ok((self.rms_norm(&x, &self.w.norm)?, new_past))
    }

    /// Logits [N, vocab] of final hidden rows [N, hidden].
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let l = frozen_matmul(h, &self.w.lm_head)?;
        Ok(if self.cfg.logits_scaling != 1.0 {
            l.affine(1.0 / self.cfg.logits_scaling, 0.0)?
        } else {
            l
        })
    }
}
