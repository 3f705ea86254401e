//! The 16-lane kernel (AVX-512): 14 x 32 register tiles of 28 accumulators, W packed through
//! 16 x 16 transposes.

use std::arch::x86_64::*;

use super::{Micro, MR, NR};

/// The 16-lane kernel: 14 x 32 register tiles, 16 x 16 transposes in the packings.
pub(super) struct Kernel;

impl Micro for Kernel {
    const MR: usize = MR;

    unsafe fn pack_x_tile(x: *const f32, live: usize, k: usize, dst: *mut f32) {
        // SAFETY: as the trait says (the caller checked the CPU).
        unsafe { pack_x_tile(x, live, k, dst) }
    }

    unsafe fn transpose_into(
        src: &[f32],
        stride: usize,
        off: usize,
        rows: usize,
        kc: usize,
        wp: &mut [f32],
    ) {
        // SAFETY: as the trait says.
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

/// `tile` for a const row count: the register tile itself.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile_r<const R: usize>(
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
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for kk in 0..kc {
            let w0 = _mm512_loadu_ps(wp.add(kk * NR));
            let w1 = _mm512_loadu_ps(wp.add(kk * NR + 16));
            let a = xp.add(kk * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let xi = _mm512_set1_ps(*a.add(i));
                acc[0] = _mm512_fmadd_ps(xi, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(xi, w1, acc[1]);
            }
        }
        let m0: __mmask16 = if cols >= 16 { 0xFFFF } else { (1 << cols) - 1 };
        let m1: __mmask16 = if cols >= 32 {
            0xFFFF
        } else if cols > 16 {
            (1 << (cols - 16)) - 1
        } else {
            0
        };
        for (i, acc) in acc.iter().enumerate() {
            let row = y.add(i * ldy);
            let (mut a0, mut a1) = (acc[0], acc[1]);
            if accumulate {
                a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(m0, row));
                a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(m1, row.add(16)));
            }
            _mm512_mask_storeu_ps(row, m0, a0);
            _mm512_mask_storeu_ps(row.add(16), m1, a1);
        }
    }
}

/// `rows` (1..=MR) rows of output, columns `..cols` (<= 32) of a strip, from xp [kc][MR]
/// and wp [kc][32]; adds to y when `accumulate` (a later k chunk).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,fma")]
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
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        macro_rules! dispatch {
        ($($r:literal)*) => {
            match rows {
                $($r => tile_r::<$r>(xp, wp, kc, y, ldy, cols, accumulate),)*
                _ => unreachable!("tile rows 1..={MR}"),
            }
        };
    }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
    }
}

/// Transposes 16 registers (rows) of 16 lanes in place: `r[c]` lane `j` becomes the old
/// `r[j]` lane `c`.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512; 16]) {
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Per 128-bit lane L, b[4i + c] holds column 4L + c of rows 4i .. 4i + 4.
    let mut b = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_shuffle_ps::<0x44>(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_shuffle_ps::<0x44>(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(a[4 * i + 1], a[4 * i + 3]);
    }
    for c in 0..4 {
        let c1 = _mm512_shuffle_f32x4::<0x88>(b[c], b[4 + c]);
        let c2 = _mm512_shuffle_f32x4::<0xDD>(b[c], b[4 + c]);
        let d1 = _mm512_shuffle_f32x4::<0x88>(b[8 + c], b[12 + c]);
        let d2 = _mm512_shuffle_f32x4::<0xDD>(b[8 + c], b[12 + c]);
        r[c] = _mm512_shuffle_f32x4::<0x88>(c1, d1);
        r[8 + c] = _mm512_shuffle_f32x4::<0xDD>(c1, d1);
        r[4 + c] = _mm512_shuffle_f32x4::<0x88>(c2, d2);
        r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(c2, d2);
    }
}

/// Up to 16 rows of a strided source, transposed: dst[kk * ld + j] = src[j * stride + kk]
/// for j < live, zero for live <= j < width (<= 16), kk < cols; 16 columns at a time
/// through `transpose16`. Both packings (x tiles, W strips) are this.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_rows(
    src: *const f32,
    stride: usize,
    live: usize,
    cols: usize,
    dst: *mut f32,
    ld: usize,
    width: usize,
) {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        debug_assert!(live <= width && width <= 16);
        let store: __mmask16 = ((1u32 << width) - 1) as __mmask16;
        let full = cols / 16 * 16;
        let mut kk = 0;
        while kk < full {
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, r) in r.iter_mut().enumerate().take(live) {
                *r = _mm512_loadu_ps(src.add(j * stride + kk));
            }
            transpose16(&mut r);
            for (c, r) in r.iter().enumerate() {
                _mm512_mask_storeu_ps(dst.add((kk + c) * ld), store, *r);
            }
            kk += 16;
        }
        for kk in full..cols {
            for j in 0..width {
                *dst.add(kk * ld + j) = if j < live {
                    *src.add(j * stride + kk)
                } else {
                    0.0
                };
            }
        }
    }
}

/// One tile of x packed k-major: dst[kk * MR + i] = x[i * k + kk] for i < live (<= MR),
/// zero for live <= i < MR.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pack_x_tile(x: *const f32, live: usize, k: usize, dst: *mut f32) {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        const { assert!(MR <= 16) };
        transpose_rows(x, k, live, k, dst, MR, MR);
    }
}

/// wp[kk][j] = src[j * stride + off + kk] for j < rows (<= 32), kk < kc; zero for j >= rows.
#[target_feature(enable = "avx512f")]
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
        for j0 in [0, 16] {
            let live = rows.saturating_sub(j0).min(16);
            // Row j0 may lie past `src` when live is 0; nothing is read from it then.
            let s = src.as_ptr().wrapping_add(j0 * stride + off);
            transpose_rows(s, stride, live, kc, wp.as_mut_ptr().add(j0), NR, 16);
        }
    }
}
