//! The 8-lane kernel: a tile is 6 rows x 16 columns (half a strip) in 12 accumulators,
//! the strip's two halves one after the other; W is packed through 8 x 8 transposes.

use std::arch::x86_64::*;

use super::{Micro, MR_AVX2, NR};

pub(super) struct Kernel;

impl Micro for Kernel {
    const MR: usize = MR_AVX2;

    unsafe fn pack_x_tile(x: *const f32, live: usize, k: usize, dst: *mut f32) {
        // SAFETY: as the trait says: x holds `live` rows of k, dst MR * k floats. (Scalar:
        // packing x is O(m k) against the tiles' O(m k n).)
        unsafe {
            for kk in 0..k {
                for i in 0..MR_AVX2 {
                    *dst.add(kk * MR_AVX2 + i) = if i < live { *x.add(i * k + kk) } else { 0.0 };
                }
            }
        }
    }

    unsafe fn transpose_into(
        src: &[f32],
        stride: usize,
        off: usize,
        rows: usize,
        kc: usize,
        wp: &mut [f32],
    ) {
        // SAFETY: as the trait says (the caller checked the CPU).
        unsafe { transpose_into(src, stride, off, rows, kc, wp) }
    }

    unsafe fn tile(
        rows: usize,
        xp: *const f32,
        wp: *const f32,
        kc: usize,
        y: *mut f32,
        ldy: usize,
        cols: usize,
        accumulate: bool,
    ) {
        // SAFETY: as the trait says.
        unsafe { tile(rows, xp, wp, kc, y, ldy, cols, accumulate) }
    }
}

/// `rows` (1..=MR_AVX2) rows of output, columns `..cols` (<= 32) of a strip, from xp
/// [kc][MR_AVX2] and wp [kc][32]; adds to y when `accumulate` (a later k chunk). The strip's
/// two halves of 16 columns run one after the other.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile(
    rows: usize,
    xp: *const f32,
    wp: *const f32,
    kc: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    accumulate: bool,
) {
    // SAFETY: the caller upholds this function's contract; each half reads its 16 lanes
    // of every wp row and writes its columns of y.
    unsafe {
        for half in 0..2 {
            let live = cols.saturating_sub(16 * half).min(16);
            if live == 0 {
                continue;
            }
            let (wh, yh) = (wp.add(16 * half), y.add(16 * half));
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match rows {
                        $($r => half_r::<$r>(xp, wh, kc, yh, ldy, live, accumulate),)*
                        _ => unreachable!("tile rows 1..={MR_AVX2}"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6);
        }
    }
}

/// Lanes `0..n` of 8 set (n clamped to 0..=8), as a mask for maskload / maskstore.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes(n: isize) -> __m256i {
    let n = n.clamp(0, 8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// `R` rows x `cols` (1..=16) columns: xp [kc][MR_AVX2], wp rows of the strip (stride 32,
/// this half's 16 lanes at wp).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn half_r<const R: usize>(
    xp: *const f32,
    wp: *const f32,
    kc: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
    accumulate: bool,
) {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..kc {
            let w0 = _mm256_loadu_ps(wp.add(kk * NR));
            let w1 = _mm256_loadu_ps(wp.add(kk * NR + 8));
            let a = xp.add(kk * MR_AVX2);
            for (i, acc) in acc.iter_mut().enumerate() {
                let xi = _mm256_broadcast_ss(&*a.add(i));
                acc[0] = _mm256_fmadd_ps(xi, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(xi, w1, acc[1]);
            }
        }
        let (m0, m1) = (lanes(cols as isize), lanes(cols as isize - 8));
        for (i, acc) in acc.iter().enumerate() {
            let row = y.add(i * ldy);
            let (mut a0, mut a1) = (acc[0], acc[1]);
            if accumulate {
                a0 = _mm256_add_ps(a0, _mm256_maskload_ps(row, m0));
                a1 = _mm256_add_ps(a1, _mm256_maskload_ps(row.add(8), m1));
            }
            _mm256_maskstore_ps(row, m0, a0);
            _mm256_maskstore_ps(row.add(8), m1, a1);
        }
    }
}

/// Transposes 8 registers (rows) of 8 lanes in place: `r[c]` lane `j` becomes the old
/// `r[j]` lane `c`.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(r: &mut [__m256; 8]) {
    let mut a = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Per 128-bit lane L, b[4i + c] holds column 4L + c of rows 4i .. 4i + 4.
    let mut b = [_mm256_setzero_ps(); 8];
    for i in 0..2 {
        b[4 * i] = _mm256_shuffle_ps::<0x44>(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm256_shuffle_ps::<0xEE>(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm256_shuffle_ps::<0x44>(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm256_shuffle_ps::<0xEE>(a[4 * i + 1], a[4 * i + 3]);
    }
    for c in 0..4 {
        r[c] = _mm256_permute2f128_ps::<0x20>(b[c], b[4 + c]);
        r[4 + c] = _mm256_permute2f128_ps::<0x31>(b[c], b[4 + c]);
    }
}

/// wp[kk][j] = src[j * stride + off + kk] for j < rows (<= 32), kk < kc; zero for
/// j >= rows: per 8 rows, 8 columns at a time through `transpose8`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose_into(
    src: &[f32],
    stride: usize,
    off: usize,
    rows: usize,
    kc: usize,
    wp: &mut [f32],
) {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        debug_assert!(rows <= NR && wp.len() >= kc * NR);
        debug_assert!(rows == 0 || (rows - 1) * stride + off + kc <= src.len());
        let full = kc / 8 * 8;
        for j0 in (0..NR).step_by(8) {
            let live = rows.saturating_sub(j0).min(8);
            // Row j0 may lie past `src` when live is 0; nothing is read from it then.
            let s = src.as_ptr().wrapping_add(j0 * stride + off);
            let dst = wp.as_mut_ptr().add(j0);
            let mut kk = 0;
            while kk < full {
                let mut r = [_mm256_setzero_ps(); 8];
                for (j, r) in r.iter_mut().enumerate().take(live) {
                    *r = _mm256_loadu_ps(s.add(j * stride + kk));
                }
                transpose8(&mut r);
                for (c, r) in r.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((kk + c) * NR), *r);
                }
                kk += 8;
            }
            for kk in full..kc {
                for j in 0..8 {
                    *dst.add(kk * NR + j) = if j < live {
                        *s.add(j * stride + kk)
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}
