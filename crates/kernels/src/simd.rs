//! What the kernels share: a portable dot product, a pointer for disjoint parallel writes,
//! and (x86-64) the horizontal sums and vectorised exp of the SIMD paths.

/// A raw pointer that rayon tasks may share when each writes its own disjoint part of the
/// buffer (gemm strips, attention items, row chunks); the users say why theirs are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only ever used for disjoint writes from parallel tasks (see the users), into a
// buffer that outlives the parallel loop.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: tasks never write the same element.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, which is `Send`).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `a . b`, written so the compiler vectorises it (8 partial sums).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// The Cephes-style e^x the SIMD paths compute lane by lane (2^n * p(r), r = x - n ln 2 with
/// ln 2 split in two, a degree-6 polynomial, inputs clamped to [-87, 88]), in scalar form:
/// the reference the vector versions are tested against, bit for bit up to FMA rounding.
pub fn exp_ref(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_359_4;
    let r = r - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = p * r + c;
    }
    let p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// e^x for 8 lanes ([`super::exp_ref`] per lane; relative error about 2e-7). Inputs are
    /// clamped to [-87, 88]: callers mask lanes that must be exactly zero.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n))
    }

    /// e^x for 16 lanes, the same computation as [`exp8`].
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    pub(crate) fn exp16(x: __m512) -> __m512 {
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

    /// One tile's step of an online softmax down a column of 16 query rows: `col[t * ld]` holds
    /// the rows' scores against key `t0 + t` for `t < kn`, and a row sees the keys below its
    /// lane of `limit`. Overwrites the scores with `e^(s - m')` (0 where not seen), updates
    /// the running max `m` and sum `l` (16 floats each, 64-byte aligned) and writes to `alpha`
    /// the factor `e^(m - m')` by which the row's output so far must be scaled. Shared by the
    /// flash and the paged AVX-512 items.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `col` holds `kn` rows `ld` floats apart, 16 floats each.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    pub(crate) unsafe fn softmax_column(
        col: *mut f32,
        ld: usize,
        (t0, kn): (usize, usize),
        limit: __m512i,
        m: *mut f32,
        l: *mut f32,
        alpha: *mut f32,
    ) {
        // SAFETY: as this function's contract says.
        unsafe {
            let sees =
                |t: usize| _mm512_cmpgt_epi32_mask(limit, _mm512_set1_epi32((t0 + t) as i32));
            let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
            for t in 0..kn {
                mx = _mm512_mask_max_ps(mx, sees(t), mx, _mm512_loadu_ps(col.add(t * ld)));
            }
            let m_old = _mm512_load_ps(m);
            let m_new = _mm512_max_ps(m_old, mx);
            let mut sum = _mm512_setzero_ps();
            for t in 0..kn {
                let x = _mm512_sub_ps(_mm512_loadu_ps(col.add(t * ld)), m_new);
                let p = _mm512_maskz_mov_ps(sees(t), exp16(x));
                _mm512_storeu_ps(col.add(t * ld), p);
                sum = _mm512_add_ps(sum, p);
            }
            // e^(m - m'): ~0 on a row's first visible tile (m = -inf; exp16 clamps to e^-87,
            // and O and l are 0 there), 1 where this tile had nothing visible.
            let a = exp16(_mm512_sub_ps(m_old, m_new));
            let a = _mm512_mask_mov_ps(
                a,
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_old, m_new),
                _mm512_set1_ps(1.0),
            );
            _mm512_store_ps(alpha, a);
            _mm512_store_ps(l, _mm512_fmadd_ps(_mm512_load_ps(l), a, sum));
            _mm512_store_ps(m, m_new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Isa;

    /// Inputs over the whole clamped range and past both ends.
    fn inputs() -> Vec<f32> {
        (-1100..=1000).map(|i| i as f32 * 0.0913).collect()
    }

    #[test]
    fn exp_ref_is_close_to_std_exp() {
        for x in inputs() {
            let want = x.clamp(-87.0, 88.0).exp();
            let got = exp_ref(x);
            assert!(
                (got - want).abs() <= 4e-7 * want,
                "exp_ref({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.5 - i as f32 * 0.125).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!(
            (dot(&a, &b) as f64 - want).abs() < 1e-3,
            "{} vs {want}",
            dot(&a, &b)
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exps_match_the_scalar_reference() {
        use std::arch::x86_64::*;
        let xs = inputs();
        if Isa::test_has(Isa::Avx2) {
            for c in xs.chunks_exact(8) {
                let mut out = [0f32; 8];
                // SAFETY: AVX2 + FMA detected; `c` and `out` hold 8 floats.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), x86::exp8(_mm256_loadu_ps(c.as_ptr())))
                };
                for (x, got) in c.iter().zip(out) {
                    let want = exp_ref(*x);
                    assert!(
                        (got - want).abs() <= 2e-7 * want,
                        "exp8({x}) = {got} vs {want}"
                    );
                }
            }
        }
        if Isa::test_has(Isa::Avx512) {
            for c in xs.chunks_exact(16) {
                let mut out = [0f32; 16];
                // SAFETY: AVX-512F + FMA detected; `c` and `out` hold 16 floats.
                unsafe {
                    _mm512_storeu_ps(out.as_mut_ptr(), x86::exp16(_mm512_loadu_ps(c.as_ptr())))
                };
                for (x, got) in c.iter().zip(out) {
                    let want = exp_ref(*x);
                    assert!(
                        (got - want).abs() <= 2e-7 * want,
                        "exp16({x}) = {got} vs {want}"
                    );
                }
            }
        }
    }
}
