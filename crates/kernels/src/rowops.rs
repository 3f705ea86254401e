//! The per-token operations of a layer on f32 rows: the residual add fused with the RMS norm
//! that follows it, RoPE, and the MLP's `silu(gate) * up`. AVX-512 or AVX2 where the CPU has
//! it, a portable loop elsewhere (also the reference in the tests).
//!
//! Why: with the projections and attention in `gemm`/`flash`, candle's scalar versions of these
//! were ~8% of a 512-token SmolLM2 prefill (RMS norm 3%, RoPE 2.5%, the residual adds 1%, the
//! activation 6% before it was fused, and zeroing their outputs first ~1.6%; perf, BENCHMARKS.md).
//! The fused add + norm is vLLM's `fused_add_rms_norm`: each row is read once for the sum and
//! its square, and the norm's second pass finds the row in L1.
//!
//! AVX2-only CPUs run the same loops in 8 lanes (masked loads and stores for a row's tail).
//! The SIMD results agree with the portable ones to f32 rounding (sums of squares are taken 16
//! or 8 lanes at a time; RoPE is the same products and differences, so the same bits).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::error::{ensure, Result};
use crate::isa::Isa;

/// Elements per parallel task (about 64 KB of f32: 2 cores reach their bandwidth on a few
/// such chunks while a single decode row stays one task).
const CHUNK: usize = 16 * 1024;

/// Whether the SIMD kernels here run on this CPU (callers with their own fast portable ops,
/// such as candle's, may prefer those elsewhere).
pub fn available() -> bool {
    Isa::has_avx2()
}

/// `len` f32 written by `fill(first_element, dst, len)` over chunks of `chunk` elements (a
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
fn rows_per_task(hidden: usize) -> usize {
    (CHUNK / hidden.max(1)).max(1)
}

fn check_rows(what: &str, x: &[f32], h: usize) -> Result<()> {
    ensure(h > 0 && x.len().is_multiple_of(h), || {
        format!("{what}: {} elements are not whole rows of {h}", x.len())
    })
}

/// RMS norm of each row of `x` [rows, w.len()] scaled by `w`: `x / sqrt(mean(x²) + eps) * w`,
/// as transformers' `LlamaRMSNorm` (in f32).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
    check_rows("rms_norm", x, w.len())?;
    Ok(norm(x, None, w, eps, Isa::get()).1)
}

/// `s = x + branch * multiplier` (the residual add) and `rms_norm(s, w, eps)`, in one pass
/// over each row; returns `(s, normed)`.
pub fn add_rms_norm(
    x: &[f32],
    branch: &[f32],
    multiplier: f32,
    w: &[f32],
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_rows("add_rms_norm", x, w.len())?;
    ensure(branch.len() == x.len(), || {
        format!(
            "add_rms_norm: branch of {} for x of {}",
            branch.len(),
            x.len()
        )
    })?;
    let (s, n) = norm(x, Some((branch, multiplier)), w, eps, Isa::get());
    Ok((s.expect("the sum is returned when there is a branch"), n))
}

/// The norm over rows of x (shapes checked) with the kernel of `isa` (at most this CPU's).
fn norm(
    x: &[f32],
    add: Option<(&[f32], f32)>,
    w: &[f32],
    eps: f32,
    isa: Isa,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let h = w.len();
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && isa <= Isa::get() {
        let rows = x.len() / h;
        let bs = add.map(|(b, _)| b);
        let r = add.map_or(1.0, |(_, r)| r);
        let mut sum: Vec<f32> = Vec::with_capacity(if add.is_some() { rows * h } else { 0 });
        let sum_at = crate::simd::SendPtr(sum.as_mut_ptr());
        let per = rows_per_task(h);
        // SAFETY: each chunk is whole rows (per * h elements, the last shorter) and
        // `norm_rows` writes every element of them, and with a branch the same element range
        // of `sum` (capacity rows * h); x and the branch hold rows * h (checked by the
        // callers); the CPU has `isa` (checked above).
        let normed = unsafe {
            par_filled(rows * h, per * h, |at, dst, len| {
                let f = if isa == Isa::Avx512 {
                    x86::norm_rows
                } else {
                    x86::norm_rows_avx2
                };
                f(
                    x.as_ptr().add(at),
                    bs.map(|b| b.as_ptr().add(at)),
                    r,
                    w,
                    h,
                    eps,
                    bs.map(|_| sum_at.get().add(at)),
                    dst,
                    len / h,
                )
            })
        };
        let sum = add.map(|_| {
            // SAFETY: the tasks above wrote all rows * h elements of `sum` (`norm_rows`
            // stores each row's sum before normalising it).
            unsafe { sum.set_len(rows * h) };
            sum
        });
        return (sum, normed);
    }
    let _ = isa;
    let sum: Option<Vec<f32>> = add.map(|(b, r)| x.iter().zip(b).map(|(x, b)| x + b * r).collect());
    let src = sum.as_deref().unwrap_or(x);
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(rows_per_task(h) * h)
        .zip(src.par_chunks(rows_per_task(h) * h))
        .for_each(|(o, s)| {
            for (o, s) in o.chunks_exact_mut(h).zip(s.chunks_exact(h)) {
                let mean = s.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let scale = 1.0 / (mean + eps).sqrt();
                for ((o, v), w) in o.iter_mut().zip(s).zip(w) {
                    *o = v * scale * w;
                }
            }
        });
    (sum, out)
}

/// RoPE, half-split convention, on `x` [tokens, heads, head_dim] with per-token `cos`/`sin`
/// [tokens, head_dim / 2]: dimension i pairs with i + head_dim / 2 (`out[i] = x[i] c - x[i +
/// d/2] s`, `out[i + d/2] = x[i] s + x[i + d/2] c`), as candle's `rope_thd`.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    head_dim: usize,
) -> Result<Vec<f32>> {
    rope_with(x, cos, sin, heads, head_dim, Isa::get())
}

fn rope_with(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    d: usize,
    isa: Isa,
) -> Result<Vec<f32>> {
    check_rows("rope", x, heads * d)?;
    ensure(d.is_multiple_of(2), || format!("rope: odd head_dim {d}"))?;
    let n = x.len() / (heads * d);
    ensure(cos.len() == n * d / 2 && sin.len() == cos.len(), || {
        format!(
            "rope: cos/sin of {} / {} for {n} tokens of head_dim {d}",
            cos.len(),
            sin.len()
        )
    })?;
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && isa <= Isa::get() {
        let per = rows_per_task(heads * d);
        // SAFETY: chunks are whole tokens (heads * d elements each) and `rope_tokens` writes
        // every element; x holds n tokens and cos/sin d / 2 per token (checked above); the
        // CPU has `isa`.
        let out = unsafe {
            par_filled(n * heads * d, per * heads * d, |at, dst, len| {
                let t0 = at / (heads * d);
                let f = if isa == Isa::Avx512 {
                    x86::rope_tokens
                } else {
                    x86::rope_tokens_avx2
                };
                f(
                    x.as_ptr().add(at),
                    cos.as_ptr().add(t0 * d / 2),
                    sin.as_ptr().add(t0 * d / 2),
                    heads,
                    d,
                    dst,
                    len / (heads * d),
                )
            })
        };
        return Ok(out);
    }
    let _ = isa;
    let half = d / 2;
    let mut out = vec![0f32; x.len()];
    for (t, (o, xt)) in out
        .chunks_exact_mut(heads * d)
        .zip(x.chunks_exact(heads * d))
        .enumerate()
    {
        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for (o, xr) in o.chunks_exact_mut(d).zip(xt.chunks_exact(d)) {
            for i in 0..half {
                let (x1, x2) = (xr[i], xr[i + half]);
                o[i] = x1 * c[i] - x2 * s[i];
                o[i + half] = x1 * s[i] + x2 * c[i];
            }
        }
    }
    Ok(out)
}

/// `silu(gate) * up` (the Llama MLP's activation) in one pass.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
    silu_mul_with(gate, up, Isa::get())
}

fn silu_mul_with(gate: &[f32], up: &[f32], isa: Isa) -> Result<Vec<f32>> {
    ensure(gate.len() == up.len(), || {
        format!("silu_mul: gate of {} and up of {}", gate.len(), up.len())
    })?;
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && isa <= Isa::get() {
        // SAFETY: `silu_mul` writes all `len` elements of each chunk; gate and up hold as
        // many (checked above); the CPU has `isa`.
        let out = unsafe {
            par_filled(gate.len(), CHUNK, |at, dst, len| {
                let f = if isa == Isa::Avx512 {
                    x86::silu_mul
                } else {
                    x86::silu_mul_avx2
                };
                f(gate.as_ptr().add(at), up.as_ptr().add(at), dst, len)
            })
        };
        return Ok(out);
    }
    let _ = isa;
    Ok(gate
        .iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::simd::x86::{exp16, exp8, hsum};

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
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
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
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
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
    }

    /// `out = g / (1 + e^-g) * u` for `n` elements.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn silu_mul(g: *const f32, u: *const f32, out: *mut f32, n: usize) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
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

    /// The mask of the first `min(left, 8)` lanes, for maskload / maskstore.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lanes8(left: usize) -> __m256i {
        let n = left.min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// [`norm_rows`] in 8 lanes.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn norm_rows_avx2(
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
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let rv = _mm256_set1_ps(r);
            for row in 0..rows {
                let (xr, o) = (x.add(row * h), dst.add(row * h));
                let mut acc = _mm256_setzero_ps();
                let mut i = 0;
                while i < h {
                    let m = lanes8(h - i);
                    let mut v = _mm256_maskload_ps(xr.add(i), m);
                    if let Some(b) = b {
                        let bv = _mm256_maskload_ps(b.add(row * h + i), m);
                        v = _mm256_add_ps(v, _mm256_mul_ps(bv, rv));
                    }
                    if let Some(s) = sum {
                        _mm256_maskstore_ps(s.add(row * h + i), m, v);
                    }
                    acc = _mm256_fmadd_ps(v, v, acc);
                    i += 8;
                }
                let mean = hsum(acc) / h as f32;
                let scale = _mm256_set1_ps(1.0 / (mean + eps).sqrt());
                let src = match sum {
                    Some(s) => s.add(row * h) as *const f32,
                    None => xr,
                };
                let mut i = 0;
                while i < h {
                    let m = lanes8(h - i);
                    let v = _mm256_maskload_ps(src.add(i), m);
                    let wv = _mm256_maskload_ps(w.as_ptr().add(i), m);
                    _mm256_maskstore_ps(o.add(i), m, _mm256_mul_ps(_mm256_mul_ps(v, scale), wv));
                    i += 8;
                }
            }
        }
    }

    /// [`rope_tokens`] in 8 lanes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rope_tokens_avx2(
        x: *const f32,
        cos: *const f32,
        sin: *const f32,
        heads: usize,
        d: usize,
        dst: *mut f32,
        tokens: usize,
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let half = d / 2;
            for t in 0..tokens {
                let (c, s) = (cos.add(t * half), sin.add(t * half));
                for hd in 0..heads {
                    let base = (t * heads + hd) * d;
                    let (xr, o) = (x.add(base), dst.add(base));
                    let mut i = 0;
                    while i < half {
                        let m = lanes8(half - i);
                        let x1 = _mm256_maskload_ps(xr.add(i), m);
                        let x2 = _mm256_maskload_ps(xr.add(half + i), m);
                        let cv = _mm256_maskload_ps(c.add(i), m);
                        let sv = _mm256_maskload_ps(s.add(i), m);
                        let lo = _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv));
                        let hi = _mm256_add_ps(_mm256_mul_ps(x1, sv), _mm256_mul_ps(x2, cv));
                        _mm256_maskstore_ps(o.add(i), m, lo);
                        _mm256_maskstore_ps(o.add(half + i), m, hi);
                        i += 8;
                    }
                }
            }
        }
    }

    /// [`silu_mul`] in 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_avx2(g: *const f32, u: *const f32, out: *mut f32, n: usize) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let one = _mm256_set1_ps(1.0);
            let mut i = 0;
            while i < n {
                let m = lanes8(n - i);
                let gv = _mm256_maskload_ps(g.add(i), m);
                let uv = _mm256_maskload_ps(u.add(i), m);
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
                _mm256_maskstore_ps(out.add(i), m, _mm256_mul_ps(s, uv));
                i += 8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn randn(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| r.random_range(-1.0f32..1.0) * scale)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Every path: portable always, AVX2 and AVX-512 where the CPU has them.
    fn paths() -> Vec<Isa> {
        let mut p = vec![Isa::Portable];
        p.extend(
            [Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|&l| Isa::test_has(l)),
        );
        p
    }

    /// `silu(g) * u` in f64, large negative and positive gates, a length that is not a
    /// multiple of 16 and more than one parallel chunk.
    #[test]
    fn silu_mul_matches_f64() {
        for n in [7 * 37, 3 * (CHUNK / 2 + 5)] {
            let g = randn(n, 40.0, 1);
            let u = randn(n, 1.0, 2);
            let want: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32)
                .collect();
            for isa in paths() {
                assert_close(
                    &silu_mul_with(&g, &u, isa).unwrap(),
                    &want,
                    1e-6,
                    "silu_mul",
                );
            }
        }
    }

    /// RMS norm and the fused add + norm (multiplier 1 and a Granite-style one) against f64,
    /// for a width with a partial last register and row counts of one task and of several.
    #[test]
    fn norms_match_f64() {
        for (rows, h) in [(1, 576), (5, 37), (CHUNK / 576 * 3 + 2, 576)] {
            let x = randn(rows * h, 1.0, 3);
            let b = randn(rows * h, 2.0, 4);
            let w: Vec<f32> = randn(h, 0.3, 5).iter().map(|v| v + 1.0).collect();
            let f64_norm = |s: &[f32]| -> Vec<f32> {
                s.chunks(h)
                    .flat_map(|r| {
                        let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
                        let sc = 1.0 / (ms + 1e-5).sqrt();
                        r.iter()
                            .zip(&w)
                            .map(move |(v, w)| (*v as f64 * sc * *w as f64) as f32)
                    })
                    .collect()
            };
            for isa in paths() {
                let (_, n) = norm(&x, None, &w, 1e-5, isa);
                assert_close(&n, &f64_norm(&x), 1e-5, "rms_norm");
                for r in [1.0, 0.22] {
                    let s: Vec<f32> = x.iter().zip(&b).map(|(x, b)| x + b * r).collect();
                    let (gs, gn) = norm(&x, Some((&b, r)), &w, 1e-5, isa);
                    assert_close(&gs.unwrap(), &s, 1e-6, "sum");
                    assert_close(&gn, &f64_norm(&s), 1e-5, "add_rms_norm");
                }
            }
        }
        assert!(rms_norm(&[0.0; 5], &[1.0; 2], 1e-5).is_err());
        assert!(add_rms_norm(&[0.0; 4], &[0.0; 2], 1.0, &[1.0; 2], 1e-5).is_err());
    }

    /// RoPE against the rotation written out in f64, for head sizes with a partial register
    /// (16: half 8) and whole ones (64, 128), over many tokens; the SIMD path equals the
    /// portable one to the last bit (same products and differences).
    #[test]
    fn rope_matches_the_rotation() {
        for (n, heads, d) in [(3, 2, 16), (70, 9, 64), (5, 3, 128)] {
            let x = randn(n * heads * d, 1.0, 6);
            let a = randn(n * d / 2, 3.0, 7);
            let cos: Vec<f32> = a.iter().map(|v| v.cos()).collect();
            let sin: Vec<f32> = a.iter().map(|v| v.sin()).collect();
            let half = d / 2;
            let mut want = vec![0f32; x.len()];
            for t in 0..n {
                for hd in 0..heads {
                    let base = (t * heads + hd) * d;
                    for i in 0..half {
                        let (x1, x2) = (x[base + i] as f64, x[base + half + i] as f64);
                        let (c, s) = (cos[t * half + i] as f64, sin[t * half + i] as f64);
                        want[base + i] = (x1 * c - x2 * s) as f32;
                        want[base + half + i] = (x1 * s + x2 * c) as f32;
                    }
                }
            }
            let portable = rope_with(&x, &cos, &sin, heads, d, Isa::Portable).unwrap();
            assert_close(&portable, &want, 1e-6, "rope");
            for isa in paths() {
                assert_eq!(
                    rope_with(&x, &cos, &sin, heads, d, isa).unwrap(),
                    portable,
                    "rope bits"
                );
            }
        }
        assert!(rope(&[0.0; 8], &[0.0; 3], &[0.0; 3], 1, 8).is_err());
    }
}
