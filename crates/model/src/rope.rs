//! Rotary position embeddings, half-split (HF) convention.
//!
//! Every model here runs RoPE on the HF layout: dimension `i` of a head pairs with `i + d/2`.
//! GGUF files store Q and K rows permuted for llama.cpp's interleaved RoPE; the GGUF loader
//! undoes that permutation (see `weights/gguf.rs`), so one convention serves both formats and PEFT
//! adapters trained on the HF layout apply unchanged. Getting this wrong does not crash: it
//! produces fluent-looking nonsense, which is why the GGUF path is tested against transformers.
//!
//! The tables are computed in f32 as transformers does, so positions far from 0 round alike.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// Precomputed cos/sin for every position up to the context length.
#[derive(Debug, Clone)]
pub struct Rope {
    /// [max_positions, head_dim / 2]
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
}

/// Inverse frequencies, with Llama 3 scaling when configured.
pub fn inv_freqs(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let inv: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            let (factor, lo, hi) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position as f32;
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            inv.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv = inv_freqs(cfg);
        let n = cfg.max_position_embeddings;
        let half = inv.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok(Rope {
            cos,
            sin,
            max_positions: n,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// cos/sin rows for the given positions ([N] u32), each [N, head_dim / 2].
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `x` laid out [N, heads, head_dim] with per-token cos/sin [N, head_dim / 2]
    /// (`ops::rope`: AVX-512 on f32 CPU tensors, candle's `rope_thd` elsewhere).
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::ops::rope(x, cos, sin)
    }

    /// The differentiable version of [`Rope::apply`] (the fused kernel drops gradients).
    pub fn apply_diff(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // rope_slow wants [b, h, t, d]; our layout is [b, t, h, d].
        let xt = x.transpose(1, 2)?;
        Ok(candle_nn::rotary_emb::rope_slow(&xt, cos, sin)?.transpose(1, 2)?)
    }
}
