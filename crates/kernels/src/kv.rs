//! The element types a KV cache keeps (`--kv-cache-dtype`): f32, or f16 / bf16 for half the
//! bytes a step reads. Kernels take a layer's pools as [`KvPool`]s and widen each element to
//! f32 as they load it (F16C for f16, a shift for bf16); everything after the load is f32.

use half::{bf16, f16};

/// One layer's K or V pool, [slots, kv_heads, head_dim] row-major, in its element type.
#[derive(Debug, Clone, Copy)]
pub enum KvPool<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// [`KvPool`]'s element type as a const-generic tag, for kernels specialised per type.
pub(crate) const F32: u8 = 0;
pub(crate) const F16: u8 = 1;
pub(crate) const BF16: u8 = 2;

impl<'a> KvPool<'a> {
    /// Elements in the pool.
    pub fn len(&self) -> usize {
        match self {
            KvPool::F32(s) => s.len(),
            KvPool::F16(s) => s.len(),
            KvPool::Bf16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn tag(&self) -> u8 {
        match self {
            KvPool::F32(_) => F32,
            KvPool::F16(_) => F16,
            KvPool::Bf16(_) => BF16,
        }
    }

    /// The f32 slice of an f32 pool.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match self {
            KvPool::F32(s) => Some(s),
            _ => None,
        }
    }

    /// Elements `start .. start + out.len()` widened to f32.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            KvPool::F32(s) => out.copy_from_slice(&s[start..start + n]),
            KvPool::F16(s) => {
                for (o, x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = x.to_f32();
                }
            }
            KvPool::Bf16(s) => {
                for (o, x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = x.to_f32();
                }
            }
        }
    }

    /// Bytes per element.
    pub fn elem_size(&self) -> usize {
        match self {
            KvPool::F32(_) => 4,
            KvPool::F16(_) | KvPool::Bf16(_) => 2,
        }
    }

    /// A pointer to element `i` (bytes; the kernels load through it by tag).
    #[inline]
    pub(crate) fn ptr(&self, i: usize) -> *const u8 {
        match self {
            KvPool::F32(s) => s[i..].as_ptr().cast(),
            KvPool::F16(s) => s[i..].as_ptr().cast(),
            KvPool::Bf16(s) => s[i..].as_ptr().cast(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Eight elements of type `E` at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn load8<const E: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller upholds this function's contract (8 elements of `E` at `p`).
        unsafe {
            match E {
                super::F32 => _mm256_loadu_ps(p.cast()),
                super::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(p.cast()),
                ))),
            }
        }
    }

    /// Sixteen elements of type `E` at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(crate) unsafe fn load16<const E: u8>(p: *const u8) -> __m512 {
        // SAFETY: the caller upholds this function's contract (16 elements of `E` at `p`).
        unsafe {
            match E {
                super::F32 => _mm512_loadu_ps(p.cast()),
                super::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(p.cast()),
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_widen_every_type_alike() {
        let xs: Vec<f32> = (0..20).map(|i| i as f32 * 0.5 - 3.0).collect();
        let h: Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<bf16> = xs.iter().map(|&x| bf16::from_f32(x)).collect();
        for p in [KvPool::F32(&xs), KvPool::F16(&h), KvPool::Bf16(&b)] {
            let mut out = [0f32; 8];
            p.read_f32(4, &mut out);
            assert_eq!(out.as_slice(), &xs[4..12], "{:?}", p.tag());
            #[cfg(target_arch = "x86_64")]
            if crate::Isa::test_has(crate::Isa::Avx2) {
                let mut v = [0f32; 8];
                // SAFETY: AVX2 + F16C detected; 8 elements at index 4 of a 20-element pool.
                unsafe {
                    let r = match p.tag() {
                        F32 => x86::load8::<F32>(p.ptr(4)),
                        F16 => x86::load8::<F16>(p.ptr(4)),
                        _ => x86::load8::<BF16>(p.ptr(4)),
                    };
                    std::arch::x86_64::_mm256_storeu_ps(v.as_mut_ptr(), r);
                }
                assert_eq!(v.as_slice(), &xs[4..12]);
            }
            #[cfg(target_arch = "x86_64")]
            if crate::Isa::test_has(crate::Isa::Avx512) {
                let mut v = [0f32; 16];
                // SAFETY: AVX-512F + F16C detected; 16 elements at index 2 of a 20-element pool.
                unsafe {
                    let r = match p.tag() {
                        F32 => x86::load16::<F32>(p.ptr(2)),
                        F16 => x86::load16::<F16>(p.ptr(2)),
                        _ => x86::load16::<BF16>(p.ptr(2)),
                    };
                    std::arch::x86_64::_mm512_storeu_ps(v.as_mut_ptr(), r);
                }
                assert_eq!(v.as_slice(), &xs[2..18]);
            }
        }
    }
}
