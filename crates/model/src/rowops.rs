//! The per-token operations of a layer, on AVX-512 CPUs for f32: the residual add fused with
//! the RMS norm that follows it, RoPE, and the MLP's `silu(gate) * up`. Elsewhere (other
//! devices, dtypes, CPUs) they are candle's ops.
//!
//! Why: with the projections and attention in `gemm`/`flash`, candle's scalar versions of these
//! were ~8% of a 512-token SmolLM2 prefill (RMS norm 3%, RoPE 2.5%, the residual adds 1%, the
//! activation 6% before it was fused, and zeroing their outputs first ~1.6%; perf, BENCHMARKS.md).
//! The fused add + norm is vLLM's `fused_add_rms_norm`: each row is read once for the sum and
//! its square, and the norm's second pass finds the row in L1.
//!
//! Results agree with candle's ops to f32 rounding (sums of squares are taken 16 lanes at a
//! time); the tests compare them, and the golden tests run through them.

use std::mem::MaybeUninit;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::cpu::with_f32;
use crate::error::Result;

/// Elements per parallel task (about 64 KB of f32: 2 cores reach their bandwidth on a few
/// such chunks while a single decode row stays one task).
const CHUNK: usize = 16 * 1024;

/// Whether the kernels here run for these tensors.
#[cfg(target_arch = "x86_64")]
fn runs(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
        && crate::gemm::available()
}

/// `len` f32 written by `fill(first_element, dst)` over chunks of `chunk` elements (a
/// multiple of whatever unit `fill` works in) in parallel, without zeroing the buffer first.
///
/// # Safety
/// `fill` must write every element of each `dst` it is given.
#[cfg(target_arch = "x86_64")]
unsafe fn par_filled(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, *mut f32, usize) + Sync,
) -> Vec<f32> {
    let chunk = chunk.max(1);
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, dst): (usize, &mut [MaybeUninit<f32>])| {
            fill(i * chunk, dst.as_mut_ptr().cast(), dst.len())
        });
    // SAFETY: the caller's `fill` wrote every element of every chunk, and the chunks cover
    // 0..len.
    unsafe { out.set_len(len) };
    out
}

/// Rows of a `hidden`-wide matrix per task.
#[cfg(target_arch = "x86_64")]
fn rows_per_task(hidden: usize) -> usize {
    (CHUNK / hidden.max(1)).max(1)
}

/// RMS norm of each row of `x` [rows, hidden] scaled by `w` [hidden]: `x / sqrt(mean(x²) + eps)
/// * w`, as candle's `rms_norm` and transformers' `LlamaRMSNorm` (in f32).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    #[cfg(target_arch = "x86_64")]
    if runs(&[&x, w]) && x.rank() == 2 {
        return Ok(norm_cpu(&x, None, w, eps)?.1);
    }
    Ok(candle_nn::ops::rms_norm(&x, w, eps as f32)?)
}

/// `s = x + branch * multiplier` (the residual add) and `rms_norm(s, w, eps)`, in one pass
/// over each row; returns `(s, normed)`.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    branch: &Tensor,
    multiplier: f64,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (x, branch) = (x.contiguous()?, branch.contiguous()?);
    #[cfg(target_arch = "x86_64")]
    if runs(&[&x, &branch, w]) && x.rank() == 2 && x.dims() == branch.dims() {
        let (s, n) = norm_cpu(&x, Some((&branch, multiplier)), w, eps)?;
        return Ok((s.expect("the sum is returned when there is a branch"), n));
    }
    let s = if multiplier == 1.0 {
        (x + branch)?
    } else {
        (x + branch.affine(multiplier, 0.0)?)?
    };
    let n = candle_nn::ops::rms_norm(&s, w, eps as f32)?;
    Ok((s, n))
}

/// The AVX-512 norm over rows of x [rows, h], with `add = (branch, multiplier)` first adding
/// the branch (then the sum is returned too).
#[cfg(target_arch = "x86_64")]
fn norm_cpu(
    x: &Tensor,
    add: Option<(&Tensor, f64)>,
    w: &Tensor,
    eps: f64,
) -> Result<(Option<Tensor>, Tensor)> {
    let (rows, h) = x.dims2()?;
    let guard = add.map(|(b, _)| b.storage_and_layout());
    let bs: Option<&[f32]> = match &guard {
        Some((storage, layout)) => Some(crate::cpu::f32_contents(storage, layout)?),
        None => None,
    };
    let r = add.map_or(1.0, |(_, r)| r as f32);
    let mut sum: Vec<f32> = Vec::with_capacity(if add.is_some() { rows * h } else { 0 });
    let sum_at = crate::cpu::SendPtr(sum.as_mut_ptr());
    let normed = with_f32(x, |xs| {
        with_f32(w, |ws| {
            let per = rows_per_task(h);
            // SAFETY: each chunk is whole rows (per * h elements, the last shorter) and
            // `norm_rows` writes every element of them, and with a branch the same element
            // range of `sum` (capacity rows * h); AVX-512 was checked by `runs`.
            unsafe {
                par_filled(rows * h, per * h, |at, dst, len| {
                    x86::norm_rows(
                        xs.as_ptr().add(at),
                        bs.map(|b| b.as_ptr().add(at)),
                        r,
                        ws,
                        h,
                        eps as f32,
                        bs.map(|_| sum_at.get().add(at)),
                        dst,
                        len / h,
                    )
                })
            }
        })
    })??;
    let dev = x.device();
    let sum = match add {
        Some(_) => {
            // SAFETY: the tasks above wrote all rows * h elements of `sum` (`norm_rows`
            // stores each row's sum before normalising it).
            unsafe { sum.set_len(rows * h) };
            Some(Tensor::from_vec(sum, (rows, h), dev)?)
        }
        None => None,
    };
    Ok((sum, Tensor::from_vec(normed, (rows, h), dev)?))
}

/// RoPE, half-split convention, on `x` [tokens, heads, head_dim] with per-token `cos`/`sin`
/// [tokens, head_dim / 2]: dimension i pairs with i + head_dim / 2, as candle's `rope_thd`
/// (the same products and differences, so the same values).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let d = *x.dims().last().unwrap_or(&0);
    #[cfg(target_arch = "x86_64")]
    if runs(&[&x, &cos, &sin]) && x.rank() == 3 && d % 2 == 0 {
        let (n, heads, _) = x.dims3()?;
        let out = with_f32(&x, |xs| {
            with_f32(&cos, |cs| {
                with_f32(&sin, |ss| {
                    let per = rows_per_task(heads * d);
                    // SAFETY: chunks are whole tokens (heads * d elements each) and `rope_rows`
                    // writes every element; cos/sin hold d / 2 per token; AVX-512 checked.
                    unsafe {
                        par_filled(n * heads * d, per * heads * d, |at, dst, len| {
                            let t0 = at / (heads * d);
                            x86::rope_tokens(
                                xs.as_ptr().add(at),
                                cs.as_ptr().add(t0 * d / 2),
                                ss.as_ptr().add(t0 * d / 2),
                                heads,
                                d,
                                dst,
                                len / (heads * d),
                            )
                        })
                    }
                })
            })
        })???;
        return Ok(Tensor::from_vec(out, (n, heads, d), x.device())?);
    }
    let r = candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?, &cos, &sin)?;
    Ok(r.squeeze(0)?)
}

/// `silu(gate) * up` (the Llama MLP's activation) in one pass (candle's `silu` then `mul` are
/// two passes and a scalar `expf` per element).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if runs(&[gate, up]) && gate.dims() == up.dims() {
        let out = with_f32(gate, |g| {
            with_f32(up, |u| {
                // SAFETY: `silu_mul` writes all `len` elements; AVX-512 checked by `runs`.
                unsafe {
                    par_filled(g.len(), CHUNK, |at, dst, len| {
                        x86::silu_mul(g.as_ptr().add(at), u.as_ptr().add(at), dst, len)
                    })
                }
            })
        })??;
        return Ok(Tensor::from_vec(out, gate.dims(), gate.device())?);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::cpu::x86::exp16;

    /// The mask of the first `min(left, 16)` lanes.
    #[inline]
    fn lanes(left: usize) -> __mmask16 {
        if left >= 16 {
            0xFFFF
        } else {
            ((1u32 << left) - 1) as __mmask16
        }
    }

    /// For `rows` rows of `h`: s = x (+ b * r), stored to `sum` when given, then
    /// dst = s / sqrt(mean(s²) + eps) * w.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn norm_rows(
        x: *const f32,
        b: Option<*const f32>,
        r: f32,
        w: &[f32],
        h: usize,
        eps: f32,
        sum: Option<*mut f32>,
        dst: *mut f32,
        rows: usize,
    ) {
        let rv = _mm512_set1_ps(r);
        for row in 0..rows {
            let (xr, o) = (x.add(row * h), dst.add(row * h));
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i < h {
                let m = lanes(h - i);
                let mut v = _mm512_maskz_loadu_ps(m, xr.add(i));
                if let Some(b) = b {
                    let bv = _mm512_maskz_loadu_ps(m, b.add(row * h + i));
                    v = _mm512_add_ps(v, _mm512_mul_ps(bv, rv));
                }
                if let Some(s) = sum {
                    _mm512_mask_storeu_ps(s.add(row * h + i), m, v);
                }
                acc = _mm512_fmadd_ps(v, v, acc);
                i += 16;
            }
            let mean = _mm512_reduce_add_ps(acc) / h as f32;
            let scale = _mm512_set1_ps(1.0 / (mean + eps).sqrt());
            // The second pass reads the row back (from `sum`, or x when there is no add):
            // it is in L1.
            let src = match sum {
                Some(s) => s.add(row * h) as *const f32,
                None => xr,
            };
            let mut i = 0;
            while i < h {
                let m = lanes(h - i);
                let v = _mm512_maskz_loadu_ps(m, src.add(i));
                let wv = _mm512_maskz_loadu_ps(m, w.as_ptr().add(i));
                _mm512_mask_storeu_ps(o.add(i), m, _mm512_mul_ps(_mm512_mul_ps(v, scale), wv));
                i += 16;
            }
        }
    }

    /// RoPE on `tokens` tokens of `heads` x `d` from `x` into `dst`, with cos/sin rows of d / 2
    /// per token: out[i] = x[i] c - x[i + d/2] s, out[i + d/2] = x[i] s + x[i + d/2] c.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rope_tokens(
        x: *const f32,
        cos: *const f32,
        sin: *const f32,
        heads: usize,
        d: usize,
        dst: *mut f32,
        tokens: usize,
    ) {
        let half = d / 2;
        for t in 0..tokens {
            let (c, s) = (cos.add(t * half), sin.add(t * half));
            for hd in 0..heads {
                let base = (t * heads + hd) * d;
                let (xr, o) = (x.add(base), dst.add(base));
                let mut i = 0;
                while i < half {
                    let m = lanes(half - i);
                    let x1 = _mm512_maskz_loadu_ps(m, xr.add(i));
                    let x2 = _mm512_maskz_loadu_ps(m, xr.add(half + i));
                    let cv = _mm512_maskz_loadu_ps(m, c.add(i));
                    let sv = _mm512_maskz_loadu_ps(m, s.add(i));
                    let lo = _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv));
                    let hi = _mm512_add_ps(_mm512_mul_ps(x1, sv), _mm512_mul_ps(x2, cv));
                    _mm512_mask_storeu_ps(o.add(i), m, lo);
                    _mm512_mask_storeu_ps(o.add(half + i), m, hi);
                    i += 16;
                }
            }
        }
    }

    /// `out = g / (1 + e^-g) * u` for `n` elements.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn silu_mul(g: *const f32, u: *const f32, out: *mut f32, n: usize) {
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let gv = _mm512_maskz_loadu_ps(m, g.add(i));
            let uv = _mm512_maskz_loadu_ps(m, u.add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(out.add(i), m, _mm512_mul_ps(s, uv));
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        for (i, (x, y)) in values(got).iter().zip(&values(want)).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// The fused activation equals candle's `silu(gate) * up` within f32 rounding, including
    /// large negative and positive gates, a length that is not a multiple of 16 and more than
    /// one parallel chunk.
    #[test]
    fn silu_mul_matches_candle() {
        let dev = Device::Cpu;
        for (r, c) in [(7, 37), (3, CHUNK / 2 + 5)] {
            let g = (Tensor::randn(0f32, 4.0, (r, c), &dev).unwrap() * 10.0).unwrap();
            let u = Tensor::randn(0f32, 1.0, (r, c), &dev).unwrap();
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            assert_close(&silu_mul(&g, &u).unwrap(), &want, 1e-6, "silu_mul");
        }
    }

    /// RMS norm and the fused add + norm (multiplier 1 and a Granite-style one) against
    /// candle's ops, for a width with a partial last register and row counts of one task and
    /// of several.
    #[test]
    fn norms_match_candle() {
        let dev = Device::Cpu;
        for (rows, h) in [(1, 576), (5, 37), (CHUNK / 576 * 3 + 2, 576)] {
            let x = Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap();
            let b = Tensor::randn(0f32, 2.0, (rows, h), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.3, h, &dev).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            assert_close(&rms_norm(&x, &w, 1e-5).unwrap(), &want, 1e-5, "rms_norm");
            for r in [1.0, 0.22] {
                let s = (&x + b.affine(r, 0.0).unwrap()).unwrap();
                let want = candle_nn::ops::rms_norm(&s, &w, 1e-5).unwrap();
                let (gs, gn) = add_rms_norm(&x, &b, r, &w, 1e-5).unwrap();
                assert_close(&gs, &s, 1e-6, "sum");
                assert_close(&gn, &want, 1e-5, "add_rms_norm");
            }
        }
    }

    /// RoPE equals candle's `rope_thd` (same arithmetic, so to the last bit here) for head
    /// sizes with a partial register (16: half 8) and whole ones (64, 128), over many tokens.
    #[test]
    fn rope_matches_candle() {
        let dev = Device::Cpu;
        for (n, heads, d) in [(3, 2, 16), (70, 9, 64), (5, 3, 128)] {
            let x = Tensor::randn(0f32, 1.0, (n, heads, d), &dev).unwrap();
            let a = Tensor::randn(0f32, 3.0, (n, d / 2), &dev).unwrap();
            let (cos, sin) = (a.cos().unwrap(), a.sin().unwrap());
            let want = candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0).unwrap(), &cos, &sin)
                .unwrap()
                .squeeze(0)
                .unwrap();
            assert_close(&rope(&x, &cos, &sin).unwrap(), &want, 0.0, "rope");
        }
    }
}
