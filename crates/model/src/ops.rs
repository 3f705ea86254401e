//! The model's one door to `alora-kernels`: candle tensors in, the kernels' slice views, candle
//! tensors out. Each op here decides once whether the kernel runs (CPU, f32, contiguous, the
//! CPU has the instruction set) or candle's op does (other devices, dtypes, CPUs); the model
//! calls only these.

use alora_kernels::{flash, paged, rowops, AttnBatch, KvPool, Shape};
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};

use crate::error::{ModelError, Result};

/// Runs `f` on the contiguous f32 contents of `t` (a CPU tensor).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    Ok(f(f32_contents(&storage, layout)?))
}

/// The contiguous f32 contents of a tensor's storage and layout (as `Tensor::storage_and_layout`
/// returns them; hold the guard while the slice is used).
pub(crate) fn f32_contents<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let err = |msg: &str| ModelError::Batch(format!("CPU kernel: {msg}"));
    let Storage::Cpu(CpuStorage::F32(data)) = storage else {
        return Err(err("expects f32 tensors on the CPU"));
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| err("expects contiguous tensors"))?;
    Ok(&data[a..b])
}

/// Whether the row-op kernels run for these tensors (else candle's ops do).
fn rowops_run(ts: &[&Tensor]) -> bool {
    rowops::available()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// RMS norm of each row of `x` [rows, hidden] scaled by `w` [hidden], as transformers'
/// `LlamaRMSNorm` in f32.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    if rowops_run(&[&x, w]) && x.rank() == 2 {
        let y = with_f32(&x, |xs| {
            with_f32(w, |ws| rowops::rms_norm(xs, ws, eps as f32))
        })???;
        return Ok(Tensor::from_vec(y, x.dims(), x.device())?);
    }
    Ok(candle_nn::ops::rms_norm(&x, w, eps as f32)?)
}

/// `s = x + branch * multiplier` (the residual add) and `rms_norm(s, w, eps)`; returns
/// `(s, normed)` (one pass per row with the kernel).
pub(crate) fn add_rms_norm(
    x: &Tensor,
    branch: &Tensor,
    multiplier: f64,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (x, branch) = (x.contiguous()?, branch.contiguous()?);
    if rowops_run(&[&x, &branch, w]) && x.rank() == 2 && x.dims() == branch.dims() {
        let (s, n) = with_f32(&x, |xs| {
            with_f32(&branch, |bs| {
                with_f32(w, |ws| {
                    rowops::add_rms_norm(xs, bs, multiplier as f32, ws, eps as f32)
                })
            })
        })????;
        let dev = x.device();
        return Ok((
            Tensor::from_vec(s, x.dims(), dev)?,
            Tensor::from_vec(n, x.dims(), dev)?,
        ));
    }
    let s = if multiplier == 1.0 {
        (x + branch)?
    } else {
        (x + branch.affine(multiplier, 0.0)?)?
    };
    let n = candle_nn::ops::rms_norm(&s, w, eps as f32)?;
    Ok((s, n))
}

/// RoPE, half-split, on `x` [tokens, heads, head_dim] with `cos`/`sin` [tokens, head_dim / 2]
/// (candle's `rope_thd` where the kernel does not run).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    if rowops_run(&[&x, &cos, &sin]) && x.rank() == 3 {
        let (_, heads, d) = x.dims3()?;
        let y = with_f32(&x, |xs| {
            with_f32(&cos, |cs| {
                with_f32(&sin, |ss| rowops::rope(xs, cs, ss, heads, d))
            })
        })????;
        return Ok(Tensor::from_vec(y, x.dims(), x.device())?);
    }
    let r = candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?, &cos, &sin)?;
    Ok(r.squeeze(0)?)
}

/// `silu(gate) * up`, the Llama MLP's activation (one pass with the kernel).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if rowops_run(&[gate, up]) && gate.dims() == up.dims() {
        let y = with_f32(gate, |g| with_f32(up, |u| rowops::silu_mul(g, u)))???;
        return Ok(Tensor::from_vec(y, gate.dims(), gate.device())?);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

/// Which in-place attention kernel a step's layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InPlace {
    /// `alora_kernels::paged` (decode-like steps).
    Paged,
    /// `alora_kernels::flash` (prefill chunks; AVX2 / AVX-512).
    Flash,
}

/// Attention for `q` [tokens, heads, head_dim] over one layer's pools [slots, kv_heads,
/// head_dim] through the step's slots (`batch`, built once per step), with the chosen kernel; returns [tokens, heads,
/// head_dim] f32.
pub(crate) fn attention_in_place(
    kernel: InPlace,
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    batch: &AttnBatch<'_>,
    sh: &Shape,
) -> Result<Tensor> {
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let (kg, vg) = (k_pool.storage_and_layout(), v_pool.storage_and_layout());
    let (kp, vp) = (kv_contents(&kg.0, kg.1)?, kv_contents(&vg.0, vg.1)?);
    let out = with_f32(&q, |qd| match kernel {
        InPlace::Paged => paged::attention(qd, kp, vp, batch, sh),
        InPlace::Flash => flash::attention(qd, kp, vp, batch, sh),
    })??;
    Ok(Tensor::from_vec(
        out,
        (batch.num_tokens(), sh.num_heads, sh.head_dim),
        &Device::Cpu,
    )?)
}

/// A KV pool's contiguous CPU contents in its element type (f32, f16 or bf16).
fn kv_contents<'a>(storage: &'a Storage, layout: &Layout) -> Result<KvPool<'a>> {
    let err = |msg: &str| ModelError::Batch(format!("CPU attention: {msg}"));
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| err("expects contiguous KV pools"))?;
    Ok(match storage {
        Storage::Cpu(CpuStorage::F32(d)) => KvPool::F32(&d[a..b]),
        Storage::Cpu(CpuStorage::F16(d)) => KvPool::F16(&d[a..b]),
        Storage::Cpu(CpuStorage::BF16(d)) => KvPool::Bf16(&d[a..b]),
        _ => return Err(err("expects f32, f16 or bf16 KV pools on the CPU")),
    })
}
