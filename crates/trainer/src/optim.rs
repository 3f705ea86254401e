//! AdamW as torch implements it (decoupled weight decay, bias-corrected moments), a linear
//! warmup-then-decay schedule (transformers' `get_linear_schedule_with_warmup`) and global-norm
//! gradient clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! Written here rather than taken from `candle_nn::AdamW` because resuming a run needs the
//! moments, which candle_nn keeps private.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{files, io_err, Result};
use candle_core::{Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' Trainer defaults.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Updates taken so far.
    pub t: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[&Var]) -> Result<Self> {
        Ok(AdamW {
            cfg,
            t: 0,
            m: vars
                .iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update of `vars` with their gradients `grads` (same order) at learning rate `lr`.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.cfg;
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut p = var.as_tensor().clone();
            if c.weight_decay != 0.0 {
                p = (p * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let p = (p - ((&m / denom)? * (lr / bc1))?)?;
            var.set(&p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Saves the moments (named after `names`) and the step count.
    pub fn save(&self, names: &[String], path: &Path) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            t.insert(format!("m.{n}"), self.m[i].clone());
            t.insert(format!("v.{n}"), self.v[i].clone());
        }
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&t, &tmp)?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        Ok(())
    }

    pub fn load(&mut self, names: &[String], path: &Path, t: u64) -> Result<()> {
        let dev = self
            .m
            .first()
            .map(|x| x.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut s = candle_core::safetensors::load(path, &dev)
            .map_err(|e| files(format!("reading {path:?}: {e}")))?;
        for (i, n) in names.iter().enumerate() {
            self.m[i] = s
                .remove(&format!("m.{n}"))
                .ok_or_else(|| files(format!("{path:?}: no m.{n}")))?;
            self.v[i] = s
                .remove(&format!("v.{n}"))
                .ok_or_else(|| files(format!("{path:?}: no v.{n}")))?;
        }
        self.t = t;
        Ok(())
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup over `warmup` steps to `peak`,
/// then linear decay to 0 at `total`.
pub fn linear_schedule(step: u64, warmup: u64, total: u64, peak: f64) -> f64 {
    if step < warmup {
        peak * step as f64 / warmup.max(1) as f64
    } else {
        peak * (total.saturating_sub(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_and_decays_to_zero() {
        assert_eq!(linear_schedule(0, 10, 110, 1.0), 0.0);
        assert_eq!(linear_schedule(5, 10, 110, 1.0), 0.5);
        assert_eq!(linear_schedule(10, 10, 110, 1.0), 1.0);
        assert_eq!(linear_schedule(60, 10, 110, 1.0), 0.5);
        assert_eq!(linear_schedule(110, 10, 110, 1.0), 0.0);
        assert_eq!(linear_schedule(0, 0, 4, 2.0), 2.0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let d = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32, 0.0], &d).unwrap(),
            Tensor::new(&[4.0f32], &d).unwrap(),
        ];
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-6);
        let v = g[0].to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5, "{v:?}");
        let mut small = vec![Tensor::new(&[0.1f32], &d).unwrap()];
        clip_grad_norm(&mut small, 1.0).unwrap();
        assert_eq!(small[0].to_vec1::<f32>().unwrap(), [0.1]);
    }

    /// Two steps against torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p = [1, -2] with
    /// gradients [0.5, 0.25] then [-1, 2] (values computed with torch 2.x).
    #[test]
    fn adamw_matches_torch() {
        let d = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &d).unwrap();
        let mut o = AdamW::new(
            AdamWConfig {
                weight_decay: 0.01,
                ..Default::default()
            },
            &[&p],
        )
        .unwrap();
        o.step(&[&p], &[Tensor::new(&[0.5f32, 0.25], &d).unwrap()], 0.1)
            .unwrap();
        o.step(&[&p], &[Tensor::new(&[-1.0f32, 2.0], &d).unwrap()], 0.1)
            .unwrap();
        let got = p.to_vec1::<f32>().unwrap();
        let want = [0.934_711_4_f32, -2.178_048_6];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
