//! Paged attention on the CPU for short query chunks (decode steps, the few tokens of an aLoRA
//! call after a cached conversation): reads K and V where they live in the [`KvStore`] pools,
//! through each sequence's slot list, instead of gathering and transposing the whole context
//! per layer per step (which cost ~75 ms per decode step at 2048 tokens of context on SmolLM2,
//! more than the attention itself; see BENCHMARKS.md).
//!
//! Per sequence and KV head, for each of its query rows and the `group` query heads sharing that
//! KV head: scores against every visible key (causal, bottom-right aligned: query j at position
//! start + j sees keys 0 ..= start + j), softmax with the max subtracted, then the weighted sum
//! of V rows. f32 throughout; work items run in parallel with rayon.
//!
//! [`KvStore`]: crate::kv::KvStore

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::batch::Prepared;
use crate::error::{ModelError, Result};

fn err(msg: &str) -> ModelError {
    ModelError::Batch(format!("paged attention: {msg}"))
}

/// Runs `f` on the contiguous f32 contents of `t` (a CPU tensor).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout): (_, &Layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Err(err("expects f32 tensors on the CPU"));
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| err("expects contiguous tensors"))?;
    Ok(f(&data[a..b]))
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(out: &mut [f32], p: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += p * x;
    }
}

/// Geometry of one call.
pub(crate) struct Shape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// `q`: [tokens, heads, head_dim] (rope applied), `k_pool`/`v_pool`: one layer's pools
/// [slots, kv_heads, head_dim], `slots`: per sequence its key slots in position order, as
/// [`Prepared`] lays them out. Returns [tokens, heads, head_dim] f32.
pub(crate) fn attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    prep: &Prepared,
    sh: &Shape,
) -> Result<Tensor> {
    let (nh, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
    let group = nh / kvh;
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let n = prep.seqlens_q.iter().sum::<usize>();
    // Work items: (sequence, kv head), with the offsets of its queries and keys.
    let mut items = Vec::new();
    let (mut qo, mut ko) = (0, 0);
    for (i, (&nq, &nk)) in prep.seqlens_q.iter().zip(&prep.seqlens_k).enumerate() {
        for h in 0..kvh {
            items.push((qo, ko, nq, nk, prep.start_pos[i], h));
        }
        qo += nq;
        ko += nk;
    }
    let slots = &prep.gather_slots_host;
    let out = with_f32(&q, |qd| {
        with_f32(k_pool, |kd| {
            with_f32(v_pool, |vd| {
                items
                    .par_iter()
                    .map(|&(qo, ko, nq, nk, start, h)| {
                        let keys = &slots[ko..ko + nk];
                        let mut res = vec![0f32; nq * group * d];
                        let mut scores = vec![0f32; nk];
                        for j in 0..nq {
                            let visible = (start + j + 1).min(nk);
                            for r in 0..group {
                                let head = h * group + r;
                                let qrow = &qd[((qo + j) * nh + head) * d..][..d];
                                let mut max = f32::NEG_INFINITY;
                                for (t, &s) in keys[..visible].iter().enumerate() {
                                    let krow = &kd[(s as usize * kvh + h) * d..][..d];
                                    let x = dot(qrow, krow) * sh.scale;
                                    scores[t] = x;
                                    max = max.max(x);
                                }
                                let mut sum = 0f32;
                                for x in &mut scores[..visible] {
                                    *x = (*x - max).exp();
                                    sum += *x;
                                }
                                let o = &mut res[(j * group + r) * d..][..d];
                                for (t, &s) in keys[..visible].iter().enumerate() {
                                    axpy(o, scores[t], &vd[(s as usize * kvh + h) * d..][..d]);
                                }
                                let inv = 1.0 / sum;
                                o.iter_mut().for_each(|x| *x *= inv);
                            }
                        }
                        res
                    })
                    .collect::<Vec<_>>()
            })
        })
    })???;
    let mut flat = vec![0f32; n * nh * d];
    for (&(qo, _, nq, _, _, h), res) in items.iter().zip(out) {
        for j in 0..nq {
            for r in 0..group {
                let head = h * group + r;
                flat[((qo + j) * nh + head) * d..][..d]
                    .copy_from_slice(&res[(j * group + r) * d..][..d]);
            }
        }
    }
    Ok(Tensor::from_vec(flat, (n, nh, d), &Device::Cpu)?)
}

/// The same attention for chunks of several tokens, through candle's gemm: per sequence one
/// gather of its K/V rows, then per KV head `Q_h K_h^T` and `P V_h` on strided views of that
/// gather (no transposed copies). Faster than [`attention`] once a chunk has a few query rows
/// (an aLoRA call's recomputed tail and invocation), slower for single-token decode, where the
/// per-call overhead dominates.
pub(crate) fn attention_gemm(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    prep: &Prepared,
    sh: &Shape,
) -> Result<Tensor> {
    let (nh, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
    let group = nh / kvh;
    let dev = q.device().clone();
    let q = q.to_dtype(DType::F32)?;
    let (mut qo, mut ko) = (0, 0);
    let mut outs = Vec::with_capacity(prep.seqlens_q.len());
    for (i, (&nq, &nk)) in prep.seqlens_q.iter().zip(&prep.seqlens_k).enumerate() {
        let start = prep.start_pos[i];
        let slots = Tensor::new(&prep.gather_slots_host[ko..ko + nk], &dev)?;
        let ks = k_pool.index_select(&slots, 0)?.reshape((nk, kvh * d))?;
        let vs = v_pool.index_select(&slots, 0)?.reshape((nk, kvh * d))?;
        // Query j sees keys 0 ..= start + j.
        let mask = crate::model::causal_mask(start, nq, nk, &dev)?.reshape((nq, 1, nk))?;
        let qi = q.narrow(0, qo, nq)?; // [nq, nh, d]
        let mut heads = Vec::with_capacity(kvh);
        for h in 0..kvh {
            // Rows (j, r) for the group's query heads: [nq * group, d].
            let qh = qi
                .narrow(1, h * group, group)?
                .contiguous()?
                .reshape((nq * group, d))?;
            let kh = ks.narrow(1, h * d, d)?;
            let vh = vs.narrow(1, h * d, d)?;
            let scores = (qh.matmul(&kh.t()?)? * sh.scale as f64)?.reshape((nq, group, nk))?;
            let scores = scores.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores.reshape((nq * group, nk))?)?;
            heads.push(p.matmul(&vh)?.reshape((nq, group, d))?);
        }
        outs.push(Tensor::cat(&heads, 1)?); // [nq, nh, d]
        qo += nq;
        ko += nk;
    }
    Ok(Tensor::cat(&outs, 0)?)
}
