//! Attention: which path a step takes (the one place that chooses a kernel) and the reference
//! path (per-sequence matmul + mask + softmax) every other path is tested against.

use candle_core::{DType, Device, Tensor};

use super::layer::{Attention, Proj};
use super::{CausalLm, StepCtx};
use crate::batch::Prepared;
use crate::error::{ModelError, Result};
use crate::ops::{self, InPlace};
use crate::rope::Rope;

/// The additive causal mask [rows, keys] for queries at positions `first ..first + rows` over
/// keys at positions `0 ..keys`: 0 where the key is visible (position <= the query's),
/// -inf elsewhere. Every attention path that masks (serving and training) builds it here.
pub fn causal_mask(first: usize, rows: usize, keys: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..rows)
        .flat_map(|j| {
            (0..keys).map(move |t| {
                if t <= first + j {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (rows, keys), device)?)
}

/// Which attention kernel a step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// For decode-like steps (every sequence brings fewer than [`FLASH_MAX_QUERY`] tokens) on
    /// the CPU: the paged kernel for f32, candle's varlen flash kernel for f16. Other steps in
    /// f32 on an AVX2 or AVX-512 CPU: alora's flash kernel (`flash.rs`). The matmul path otherwise.
    Auto,
    /// Per-sequence matmul + mask + softmax: any device and dtype.
    Reference,
    /// The CPU paged kernel for every step (f32 activations on the CPU only; tests).
    Paged,
    /// The CPU flash kernel for every step (f32 on AVX2 / AVX-512 CPUs, head_dim 16/32/64/128; tests).
    Flash,
}

/// Longest per-sequence query chunk that still goes to the CPU flash kernel in `Auto` mode.
pub const FLASH_MAX_QUERY: usize = 32;

/// Whether [`AttentionImpl::Flash`] runs on this CPU for this head size (AVX2 or AVX-512;
/// head_dim 16, 32, 64 or 128).
pub fn flash_available(head_dim: usize) -> bool {
    alora_kernels::flash::available(head_dim)
}

/// The attention computation of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AttnPath {
    /// alora's paged kernel, reading K/V in place from the pools.
    Paged,
    /// alora's flash kernel (AVX2 / AVX-512), reading K/V in place.
    Flash,
    /// candle's varlen flash kernel on gathered K/V (f16 decode on the CPU).
    CandleFlashF16,
    /// Per-sequence matmul + mask + softmax on gathered K/V: any device and dtype.
    Reference,
}

impl AttnPath {
    /// The one rule that picks a step's attention path (see [`AttentionImpl`]).
    pub(super) fn choose(
        forced: AttentionImpl,
        device: &Device,
        dtype: DType,
        kv_dtype: DType,
        head_dim: usize,
        seqlens_q: &[usize],
    ) -> Result<AttnPath> {
        let cpu_f32 = device.is_cpu() && dtype == DType::F32;
        // The CPU kernels read f32, f16 and bf16 pools alike; candle's f16 kernel only f16.
        let kv_f16 = kv_dtype == DType::F16;
        let flash_runs = cpu_f32 && flash_available(head_dim);
        let decode_like = device.is_cpu() && seqlens_q.iter().all(|&n| n < FLASH_MAX_QUERY);
        Ok(match forced {
            AttentionImpl::Paged => AttnPath::Paged,
            AttentionImpl::Flash if flash_runs => AttnPath::Flash,
            AttentionImpl::Flash => {
                return Err(ModelError::Batch(format!(
                    "flash attention needs f32 on an AVX2 CPU and head_dim 16, 32, 64 or 128 \
                     (head_dim {head_dim})"
                )))
            }
            AttentionImpl::Reference => AttnPath::Reference,
            AttentionImpl::Auto if decode_like && dtype == DType::F32 => AttnPath::Paged,
            AttentionImpl::Auto if flash_runs => AttnPath::Flash,
            AttentionImpl::Auto if decode_like && dtype == DType::F16 && kv_f16 => {
                AttnPath::CandleFlashF16
            }
            AttentionImpl::Auto => AttnPath::Reference,
        })
    }
}

impl CausalLm {
    pub(super) fn attention_forward(
        &self,
        l: usize,
        a: &Attention,
        h: &Tensor,
        ctx: &StepCtx<'_>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let n = ctx.prep.num_tokens;
        let groups = &ctx.prep.lora_groups;
        let [q, k, v] = Proj::forward_many([&a.q_proj, &a.k_proj, &a.v_proj], h, groups)?;
        let q = q.reshape((n, c.num_heads, c.head_dim))?;
        let k = k.reshape((n, c.num_kv_heads, c.head_dim))?;
        let v = v.reshape((n, c.num_kv_heads, c.head_dim))?;
        let q = Rope::apply(&q, &ctx.cos, &ctx.sin)?;
        let k = Rope::apply(&k, &ctx.cos, &ctx.sin)?;
        ctx.kv.write(l, &ctx.write_idx, &k, &v)?;
        let shape = alora_kernels::Shape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: c.attention_scale as f32,
        };
        let out = match ctx.attn_path {
            AttnPath::Paged | AttnPath::Flash => {
                let (kp, vp) = ctx.kv.pools(l);
                let kernel = match ctx.attn_path {
                    AttnPath::Paged => InPlace::Paged,
                    _ => InPlace::Flash,
                };
                ops::attention_in_place(kernel, &q, kp, vp, &ctx.attn, &shape)?
                    .to_dtype(self.dtype)?
            }
            AttnPath::CandleFlashF16 => {
                let (kc, vc) = ctx.kv.gather(l, &ctx.prep.gather_slots)?;
                let p = ctx.prep;
                let sq: Vec<u32> = p.seqlens_q.iter().map(|&x| x as u32).collect();
                let sk: Vec<u32> = p.seqlens_k.iter().map(|&x| x as u32).collect();
                candle_nn::attention::flash_attn_varlen_cpu(
                    &q,
                    &kc,
                    &vc,
                    None,
                    &Tensor::new(sq.as_slice(), &self.device)?,
                    &Tensor::new(sk.as_slice(), &self.device)?,
                    p.seqlens_q.iter().copied().max().unwrap_or(0),
                    p.seqlens_k.iter().copied().max().unwrap_or(0),
                    c.attention_scale as f32,
                    true,
                    None,
                    None,
                )?
            }
            AttnPath::Reference => {
                let (kc, vc) = ctx.kv.gather(l, &ctx.prep.gather_slots)?;
                self.reference_attention(&q, &kc, &vc, ctx.prep)?
            }
        };
        let out = out.reshape((n, c.num_heads * c.head_dim))?;
        a.o_proj.forward(&out, groups)
    }

    /// Causal attention per sequence with plain ops; q [N, Hq, D], k/v [T, Hk, D].
    ///
    /// Queries go in blocks of `attention_block` rows: a block only computes scores against the
    /// keys it can see (causal), which halves the work of a long prefill and keeps the score
    /// matrix at [Hk, g * block, keys] instead of [Hk, g * N, keys].
    fn reference_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &Prepared,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (hk, d) = (c.num_kv_heads, c.head_dim);
        let g = c.num_heads / hk;
        let (mut qo, mut ko) = (0, 0);
        let mut outs = Vec::with_capacity(p.seqlens_q.len());
        for (i, (&nq, &nk)) in p.seqlens_q.iter().zip(&p.seqlens_k).enumerate() {
            let start = p.start_pos[i];
            // [nq, Hq, D] -> [Hk, g, nq, D]: query head h reads KV head h / g (HF repeat_kv).
            let qi = q
                .narrow(0, qo, nq)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)?;
            let qi = qi.reshape((hk, g, nq, d))?;
            let ki = k
                .narrow(0, ko, nk)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)?;
            let vi = v
                .narrow(0, ko, nk)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)?;
            let mut blocks = Vec::with_capacity(nq.div_ceil(self.attention_block));
            let mut j0 = 0;
            while j0 < nq {
                let nb = (nq - j0).min(self.attention_block);
                // Query j (position start + j) sees keys 0 ..= start + j.
                let visible = start + j0 + nb;
                let qb = qi
                    .narrow(2, j0, nb)?
                    .contiguous()?
                    .reshape((hk, g * nb, d))?;
                let kb = ki.narrow(1, 0, visible)?.contiguous()?;
                let vb = vi.narrow(1, 0, visible)?.contiguous()?;
                let mut scores =
                    (qb.matmul(&kb.t()?)? * c.attention_scale)?.reshape((hk, g, nb, visible))?;
                if nb > 1 {
                    let mask = causal_mask(start + j0, nb, visible, &self.device)?;
                    scores = scores.broadcast_add(&mask)?;
                }
                let probs =
                    candle_nn::ops::softmax_last_dim(&scores.reshape((hk, g * nb, visible))?)?;
                blocks.push(probs.matmul(&vb)?.reshape((hk, g, nb, d))?);
                j0 += nb;
            }
            let o = Tensor::cat(&blocks, 2)?; // [Hk, g, nq, D]
            let o = o
                .reshape((c.num_heads, nq, d))?
                .transpose(0, 1)?
                .to_dtype(self.dtype)?;
            outs.push(o);
            qo += nq;
            ko += nk;
        }
        Ok(Tensor::cat(&outs, 0)?.contiguous()?)
    }
}
