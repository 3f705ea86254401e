//! What the CPU kernels (`qmatmul`, `paged`) share: their inputs' f32 contents without a copy,
//! a portable dot product, SIMD feature detection and the horizontal sum of a register.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use crate::error::{ModelError, Result};

/// Runs `f` on the contiguous f32 contents of `t` (a CPU tensor).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let err = |msg: &str| ModelError::Batch(format!("CPU kernel: {msg}"));
    let (storage, layout): (_, &Layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Err(err("expects f32 tensors on the CPU"));
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| err("expects contiguous tensors"))?;
    Ok(f(&data[a..b]))
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
}
