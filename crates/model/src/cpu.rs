//! What the CPU kernels (`qmatmul`, `paged`, `gemm`, `flash`, `rowops`) share: their inputs'
//! f32 contents without a copy, a portable dot product, SIMD feature detection, the
//! horizontal sum of a register, a vectorised exp.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use crate::error::{ModelError, Result};

/// A raw pointer that rayon tasks may share when each writes its own disjoint part of the
/// buffer (gemm strips, attention items); the users say why theirs are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only ever used for disjoint writes from parallel tasks (see the users).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, which is `Send`).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

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

/// `a . b`, written so the compiler vectorises it (8 partial sums).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// AVX2 with FMA on this CPU (checked at run time; cached by std).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// e^x for 16 lanes (Cephes-style: 2^n * p(r), r = x - n ln 2, degree-6 polynomial, as
    /// `paged`'s 8-lane `exp8`; relative error about 2e-7). Inputs are clamped to [-87, 88]:
    /// callers mask lanes that must be exactly zero.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let r2 = _mm512_mul_ps(r, r);
        let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        let pow2n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(p, _mm512_castsi512_ps(pow2n))
    }
}
