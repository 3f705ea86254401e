//! One decoder layer's weights and the projections with their LoRA delta.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use alora_kernels::lora::LoraFactors;

use crate::batch::LoraRows;
use crate::lora::{LoraPair, Module};
use crate::ops::f32_contents;
use crate::weights::{LinearWeight, Permute, WeightSource};

/// Adapted rows up to which a projection's LoRA delta runs in `alora_kernels::lora` (decode
/// steps and aLoRA tails); more go through candle's matmuls, whose gemm wins on many rows.
pub const LORA_KERNEL_MAX_ROWS: usize = 16;

/// A projection with its base weight; LoRA factors come from the step's adapters.
#[derive(Debug)]
pub struct Proj {
    pub weight: LinearWeight,
    pub(super) layer: usize,
    pub(super) module: Module,
}

impl Proj {
    /// `x W^T`, plus each adapter's delta on the rows it adapts.
    pub(super) fn forward(&self, x: &Tensor, groups: &[LoraRows]) -> Result<Tensor> {
        self.add_lora(self.weight.forward(x)?, x, groups)
    }

    /// [`forward`](Self::forward) for several projections of the same input (their base
    /// products in one gemm call: `LinearWeight::forward_many`).
    pub(super) fn forward_many<const N: usize>(
        projs: [&Proj; N],
        x: &Tensor,
        groups: &[LoraRows],
    ) -> Result<[Tensor; N]> {
        let ws = projs.map(|p| &p.weight);
        let ys = LinearWeight::forward_many(&ws, x)?;
        let mut out = Vec::with_capacity(N);
        for (p, y) in projs.iter().zip(ys) {
            out.push(p.add_lora(y, x, groups)?);
        }
        Ok(out.try_into().expect("one output per projection"))
    }

    /// `y` plus each adapter's delta `x A^T B^T * scaling` on the rows it adapts.
    fn add_lora(&self, mut y: Tensor, x: &Tensor, groups: &[LoraRows]) -> Result<Tensor> {
        for g in groups {
            let Some(p) = g.adapter.pair(self.layer, self.module) else {
                continue;
            };
            if let Some(sum) = Self::lora_kernel(&y, x, g, p)? {
                y = sum;
                continue;
            }
            let rows = &g.rows;
            // PEFT computes the delta in f32 and adds it to the base output.
            let xs = x.index_select(rows, 0)?.to_dtype(DType::F32)?;
            let delta = xs.matmul(&p.a_t)?.matmul(&p.b_t)?.affine(p.scaling, 0.0)?;
            y = if y.dtype() == DType::F32 {
                y.index_add(rows, &delta, 0)?
            } else {
                let sum = (y.index_select(rows, 0)?.to_dtype(DType::F32)? + delta)?;
                let sum = sum.to_dtype(y.dtype())?;
                let old = y.index_select(rows, 0)?;
                y.index_add(rows, &(sum - old)?, 0)?
            };
        }
        Ok(y)
    }

    /// The delta through `alora_kernels::lora` (f32 on the CPU, at most
    /// [`LORA_KERNEL_MAX_ROWS`] rows adapted), or `None` for candle's ops.
    fn lora_kernel(y: &Tensor, x: &Tensor, g: &LoraRows, p: &LoraPair) -> Result<Option<Tensor>> {
        let f32_cpu =
            |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous();
        if g.host.len() > LORA_KERNEL_MAX_ROWS || ![y, x, &p.a_t, &p.b_t].into_iter().all(f32_cpu) {
            return Ok(None);
        }
        let (n, out) = y.dims2()?;
        let (inp, rank) = p.a_t.dims2()?;
        let mut sum = y.flatten_all()?.to_vec1::<f32>()?;
        let (xg, ag, bg) = (
            x.storage_and_layout(),
            p.a_t.storage_and_layout(),
            p.b_t.storage_and_layout(),
        );
        let f = LoraFactors {
            a_t: f32_contents(&ag.0, ag.1)?,
            b_t: f32_contents(&bg.0, bg.1)?,
            inp,
            rank,
            out,
            scaling: p.scaling as f32,
        };
        alora_kernels::lora::add_rows(&mut sum, f32_contents(&xg.0, xg.1)?, &g.host, f)?;
        Ok(Some(Tensor::from_vec(sum, (n, out), y.device())?))
    }
}

#[derive(Debug)]
pub(super) struct Attention {
    pub(super) q_proj: Proj,
    pub(super) k_proj: Proj,
    pub(super) v_proj: Proj,
    pub(super) o_proj: Proj,
}

#[derive(Debug)]
pub(super) struct Mlp {
    pub(super) gate_proj: Proj,
    pub(super) up_proj: Proj,
    pub(super) down_proj: Proj,
}

#[derive(Debug)]
pub(super) struct Layer {
    pub(super) input_layernorm: Tensor,
    pub(super) self_attn: Attention,
    pub(super) post_attention_layernorm: Tensor,
    pub(super) mlp: Mlp,
}

impl Proj {
    fn load(
        src: &WeightSource,
        cfg: &ModelConfig,
        layer: usize,
        module: Module,
        (dtype, device): (DType, &Device),
        permute: Permute,
    ) -> Result<Proj> {
        let (inp, out) = module.dims(cfg);
        let name = format!(
            "model.layers.{layer}.{}.{}.weight",
            module.parent(),
            module.name()
        );
        Ok(Proj {
            weight: src.linear(&name, out, inp, dtype, device, permute)?,
            layer,
            module,
        })
    }
}

impl Layer {
    /// Layer `l` from `src`. GGUF files hold Q and K rows in llama.cpp's RoPE order, undone
    /// here (`weights/gguf.rs`).
    pub(super) fn load(
        src: &WeightSource,
        cfg: &ModelConfig,
        l: usize,
        dtype: DType,
        device: &Device,
        gguf: bool,
    ) -> Result<Layer> {
        let _span = tracing::debug_span!("load_layer", l).entered();
        let h = cfg.hidden_size;
        let norm = |name: &str| {
            let name = format!("model.layers.{l}.{name}.weight");
            src.dense(&name, &[h], dtype, device, Permute::None)
        };
        let (qp, kp) = if gguf {
            (
                Permute::Heads(cfg.num_heads),
                Permute::Heads(cfg.num_kv_heads),
            )
        } else {
            (Permute::None, Permute::None)
        };
        let proj = |m: Module, permute| Proj::load(src, cfg, l, m, (dtype, device), permute);
        Ok(Layer {
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            self_attn: Attention {
                q_proj: proj(Module::Q, qp)?,
                k_proj: proj(Module::K, kp)?,
                v_proj: proj(Module::V, Permute::None)?,
                o_proj: proj(Module::O, Permute::None)?,
            },
            mlp: Mlp {
                gate_proj: proj(Module::Gate, Permute::None)?,
                up_proj: proj(Module::Up, Permute::None)?,
                down_proj: proj(Module::Down, Permute::None)?,
            },
        })
    }
}
