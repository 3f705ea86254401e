//! `y = x W^T` in f32 for many rows (prefill) on CPUs with AVX-512 or AVX2, the weights given
//! as dense f32 rows or as GGML blocks decoded while they are packed.
//!
//! Why not candle's gemm: the `gemm` crate it calls only has AVX2 kernels on stable Rust
//! (its AVX-512 ones are behind a nightly feature), and a perf profile of a 512-token SmolLM2
//! prefill was ~63% in its AVX2 microkernel. torch's oneDNN runs the same shapes at ~240
//! GFLOP/s on the 2 cores BENCHMARKS.md uses; this module is the AVX-512 counterpart, with
//! the usual structure (GotoBLAS / BLIS). On AVX2-only CPUs the same driver runs an 8-lane
//! register tile of 6 rows x 16 columns (each 32-column strip in two halves), which spares
//! the candle route its dequantization of the whole matrix on every call (`Micro` says what
//! an instruction set supplies):
//!
//! ```text
//!   x [m, k] -> packed once per call: tiles of MR rows, k-major   xp[tile][k][MR]
//!   W [n, k] -> per strip of NR = 32 rows and chunk of KC columns: wp[k][32]
//!               (dense rows transposed 16 x 16 in registers; blocks decoded, then transposed)
//!   for each strip (parallel over rayon):  for each k chunk:  pack wp   (x > 4 MB: blocked)
//!       for each tile of MR rows of x:  MR x 32 outputs in 2 * MR zmm accumulators,
//!                                       per k: 2 loads of wp, MR broadcasts of xp, 2 * MR fma
//! ```
//!
//! A block's weights are decoded exactly as `QTensor::dequantize` does, so the result is the
//! dense model's product up to summation order (tested against a plain triple loop).

use rayon::prelude::*;

use crate::isa::Isa;
use crate::qmatmul::BlockMatrix;
use crate::simd::SendPtr;

/// Rows of x per AVX-512 register tile (2 * MR accumulators + 2 weight registers of the 32).
pub const MR: usize = 14;
/// Rows of x per AVX2 register tile (2 * 6 accumulators, 2 weight registers of a half strip
/// and one broadcast: 15 of the 16 ymm registers).
pub const MR_AVX2: usize = 6;
/// Weight rows (output columns) per strip: two 16-lane registers.
pub const NR: usize = 32;
/// Packed x larger than this (f32; 4 MB) runs in blocks of `L2_FLOATS`: below it, streaming
/// x once per strip costs less than packing W ahead (SmolLM2's down projection at 512 rows,
/// x 3 MB: 4.2 ms streamed vs 4.9 blocked; the gate projection at 2048 rows, x 4.7 MB: 20.5
/// vs 17.3; `benches/linear_rows.rs` and a one-off down-shape run).
const X_BLOCKED_FLOATS: usize = 1024 * 1024;
/// f32 of packed x per block of tiles when x is larger (about half of a core's L2).
const L2_FLOATS: usize = 128 * 1024;
/// Strips per packed block of W when x is large (1536 output columns, 3.5 MB at k = 576).
const NC_STRIPS: usize = 48;
/// Columns of k per packed chunk at most (a chunk of a strip, KC x 32 f32, stays in L2).
const KC_MAX: usize = 320;

/// The weight matrix W [n, k] of `x W^T`.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    /// Row-major f32.
    Dense(&'a [f32]),
    /// GGML blocks (k a multiple of 32).
    Blocks(&'a BlockMatrix),
}

/// Whether this CPU runs a SIMD kernel, AVX-512 or AVX2 (elsewhere [`matmul_t`] runs a
/// portable loop, correct but slow: callers with a faster gemm at hand use theirs then).
pub fn available() -> bool {
    Isa::has_avx2()
}

/// What one instruction set supplies to the driver: the register tile and the two packings.
#[cfg(target_arch = "x86_64")]
trait Micro {
    /// Rows of x per register tile (the packed x is [tile][k][MR]).
    const MR: usize;
    /// One tile of x packed k-major: dst[kk * MR + i] = x[i * k + kk] for i < live (<= MR),
    /// zero for live <= i < MR.
    ///
    /// # Safety
    /// The CPU has the instruction set; x holds `live` rows of k floats, dst MR * k.
    unsafe fn pack_x_tile(x: *const f32, live: usize, k: usize, dst: *mut f32);
    /// wp[kk][j] = src[j * stride + off + kk] for j < rows (<= 32), kk < kc; zero for j >= rows.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn transpose_into(
        src: &[f32],
        stride: usize,
        off: usize,
        rows: usize,
        kc: usize,
        wp: &mut [f32],
    );
    /// `rows` (1..=MR) rows of output, columns `..cols` (<= 32) of a strip, from xp [kc][MR]
    /// and wp [kc][32]; adds to y when `accumulate` (a later k chunk).
    ///
    /// # Safety
    /// The CPU has the instruction set; the pointers hold what the shapes say.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        rows: usize,
        xp: *const f32,
        wp: *const f32,
        kc: usize,
        y: *mut f32,
        ldy: usize,
        cols: usize,
        accumulate: bool,
    );
}

/// The k chunks: as few as fit `KC_MAX`, of equal size rounded up to 32 (block boundaries).
fn k_chunks(k: usize) -> Vec<(usize, usize)> {
    let parts = k.div_ceil(KC_MAX);
    let size = k.div_ceil(parts).div_ceil(32) * 32;
    (0..parts)
        .map(|p| (p * size, size.min(k.saturating_sub(p * size))))
        .filter(|&(_, len)| len > 0)
        .collect()
}

/// 64 bytes on a 64-byte boundary: packed panels are vectors of these, so no 16-lane load
/// from them straddles two cache lines (measured: see BENCHMARKS.md).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([f32; 16]);

/// `len` f32 of `buf`, 64-byte aligned, growing it (with zeros) when needed. The contents are
/// whatever the last user left: every caller writes what it reads (re-zeroing the packed W
/// strips on each call was ~3% of a prefill).
pub(crate) fn aligned(buf: &mut Vec<Line>, len: usize) -> &mut [f32] {
    let lines = len.div_ceil(16);
    if buf.len() < lines {
        buf.resize(lines, Line([0.0; 16]));
    }
    // SAFETY: `Line` is 16 f32 with no padding (repr(C), size 64), so the buffer holds at
    // least `lines * 16 >= len` initialised f32.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<f32>(), len) }
}

/// `x W^T` for x [m, k] row-major and W [n, k]; returns [m, n] row-major.
///
/// Panics if the shapes disagree.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: WeightRows<'_>, n: usize) -> Vec<f32> {
    let mut ys = matmul_t_many(x, m, k, &[(w, n)], Blocking::MEASURED);
    ys.pop().expect("one product")
}

/// `x W_j^T` for each `(W_j, n_j)` of `ws` with one x: x is packed once and the strips of
/// every W share one parallel loop (Q/K/V and gate/up read the same normed input; packing x
/// once instead of three and two times saves ~1.5% of a 512-token prefill).
///
/// Panics as [`matmul_t`].
pub fn matmul_t_shared(
    x: &[f32],
    m: usize,
    k: usize,
    ws: &[(WeightRows<'_>, usize)],
) -> Vec<Vec<f32>> {
    matmul_t_many(x, m, k, ws, Blocking::MEASURED)
}

/// When and how `matmul_t` blocks (tests use small values to reach every loop order).
#[derive(Clone, Copy)]
struct Blocking {
    x_blocked_floats: usize,
    l2_floats: usize,
    nc_strips: usize,
}

impl Blocking {
    const MEASURED: Blocking = Blocking {
        x_blocked_floats: X_BLOCKED_FLOATS,
        l2_floats: L2_FLOATS,
        nc_strips: NC_STRIPS,
    };
}

/// x [m, k] packed per tile of MR rows, k-major (xp[tile][k][MR]), rows past m zero.
#[cfg(target_arch = "x86_64")]
fn pack_x<K: Micro>(x: &[f32], m: usize, k: usize) -> Vec<Line> {
    let mr = K::MR;
    let tiles = m.div_ceil(mr);
    // Not zeroed first (memset was ~3% of a prefill): the packing writes every element
    // (zeros for rows past m) and the length is set once that is done.
    let mut xp_buf: Vec<Line> = Vec::with_capacity((tiles * mr * k).div_ceil(16));
    let xp_ptr = SendPtr(xp_buf.as_mut_ptr().cast::<f32>());
    (0..tiles).into_par_iter().for_each(|t| {
        let live = mr.min(m - t * mr);
        // SAFETY: tile t owns xp[t * MR * k ..][.. MR * k], inside the capacity reserved
        // above; x holds rows t * MR .. + live of k floats; the caller checked the CPU for K.
        unsafe {
            K::pack_x_tile(
                x.as_ptr().add(t * mr * k),
                live,
                k,
                xp_ptr.get().add(t * mr * k),
            )
        };
    });
    let lines = (tiles * mr * k).div_ceil(16);
    for i in tiles * mr * k..lines * 16 {
        // SAFETY: the tail of the last Line, inside the capacity.
        unsafe { *xp_ptr.get().add(i) = 0.0 };
    }
    // SAFETY: every f32 of the `lines` Lines was written above.
    unsafe { xp_buf.set_len(lines) };
    xp_buf
}

fn matmul_t_many(
    x: &[f32],
    m: usize,
    k: usize,
    ws: &[(WeightRows<'_>, usize)],
    blocking: Blocking,
) -> Vec<Vec<f32>> {
    assert_eq!(x.len(), m * k, "gemm: x shape");
    for &(w, n) in ws {
        match w {
            WeightRows::Dense(w) => assert_eq!(w.len(), n * k, "gemm: W shape"),
            WeightRows::Blocks(b) => assert_eq!(b.dims(), (n, k), "gemm: W shape"),
        }
    }
    if m == 0 {
        return ws.iter().map(|_| Vec::new()).collect();
    }
    matmul_isa(x, m, k, ws, blocking, Isa::get())
}

/// The product with the kernel of `isa` (at most this CPU's level).
fn matmul_isa(
    x: &[f32],
    m: usize,
    k: usize,
    ws: &[(WeightRows<'_>, usize)],
    blocking: Blocking,
    isa: Isa,
) -> Vec<Vec<f32>> {
    debug_assert!(isa <= Isa::get());
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return matmul_simd::<avx512::Kernel>(x, m, k, ws, blocking),
        Isa::Avx2 => return matmul_simd::<avx2::Kernel>(x, m, k, ws, blocking),
        Isa::Portable => {}
    }
    let _ = (blocking, isa);
    ws.iter().map(|&(w, n)| reference(x, m, k, w, n)).collect()
}

/// The portable product (the fallback without AVX2): per output row, W's rows (decoded for
/// blocks) dotted with x's.
pub fn reference(x: &[f32], m: usize, k: usize, w: WeightRows<'_>, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    let mut row = vec![0f32; k];
    for j in 0..n {
        let wj: &[f32] = match w {
            WeightRows::Dense(d) => &d[j * k..(j + 1) * k],
            WeightRows::Blocks(b) => {
                b.decode_row(j, &mut row);
                &row
            }
        };
        for i in 0..m {
            y[i * n + j] = crate::simd::dot(&x[i * k..(i + 1) * k], wj);
        }
    }
    y
}

/// The driver for kernel K (shapes checked by the caller, the CPU by `matmul_isa`).
#[cfg(target_arch = "x86_64")]
fn matmul_simd<K: Micro>(
    x: &[f32],
    m: usize,
    k: usize,
    ws: &[(WeightRows<'_>, usize)],
    blocking: Blocking,
) -> Vec<Vec<f32>> {
    // The outputs are not zeroed first: the strips together write every element of each y
    // in their first k chunk; the lengths are set once that is done.
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|&(_, n)| Vec::with_capacity(m * n)).collect();
    let outs: Vec<SendPtr> = ys.iter_mut().map(|y| SendPtr(y.as_mut_ptr())).collect();
    // Every 32-column strip of every W, as (which W, first column).
    let strip_of: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(j, &(_, n))| (0..n.div_ceil(NR)).map(move |s| (j, s * NR)))
        .collect();
    let strips = strip_of.len();
    let mr = K::MR;
    let tiles = m.div_ceil(mr);
    let xp_buf = pack_x::<K>(x, m, k);
    // SAFETY: Lines are 16 initialised f32 each (repr(C), no padding).
    let xp: &[f32] =
        unsafe { std::slice::from_raw_parts(xp_buf.as_ptr().cast::<f32>(), tiles * mr * k) };
    let chunks = k_chunks(k);
    // Packs strip `s`'s chunk (k0, kc) into wp.
    let pack = |s: usize, k0: usize, kc: usize, wp: &mut [f32], scratch: &mut Vec<f32>| {
        let (j, n0) = strip_of[s];
        let (w, n) = ws[j];
        pack_strip::<K>(w, k, n0, NR.min(n - n0), k0, kc, wp, scratch);
    };
    // One register tile: rows of tile t, columns of strip s, from wp (strip s's chunk c).
    let run_tile = |t: usize, s: usize, c: usize, wp: *const f32| {
        let (k0, kc) = chunks[c];
        let (j, n0) = strip_of[s];
        let n = ws[j].1;
        // SAFETY: the CPU has K's instructions (`matmul_isa`); xp holds tile t's [k][MR] and
        // wp the strip's [kc][32]; output rows t*MR.. and columns n0..n0+32 (clipped) lie
        // inside y_j (capacity m * n), and only the task that owns strip s writes its columns.
        unsafe {
            let xt = xp.as_ptr().add(t * mr * k + k0 * mr);
            let yt = outs[j].get().add(t * mr * n + n0);
            K::tile(mr.min(m - t * mr), xt, wp, kc, yt, n, NR.min(n - n0), c > 0);
        }
    };
    // Tiles of x per block so a block of packed x stays in L2 (~512 KB).
    let mc = (blocking.l2_floats / k / mr).max(4);
    if tiles * mr * k <= blocking.x_blocked_floats || tiles <= mc {
        // x fits: each task packs its strip chunk by chunk (in L1/L2) and runs every tile.
        (0..strips).into_par_iter().for_each_init(
            || (Vec::<Line>::new(), Vec::new()),
            |(wp, scratch), s| {
                for (c, &(k0, kc)) in chunks.iter().enumerate() {
                    let wp = aligned(wp, kc * NR);
                    pack(s, k0, kc, wp, scratch);
                    for t in 0..tiles {
                        run_tile(t, s, c, wp.as_ptr());
                    }
                }
            },
        );
    } else {
        // Many rows (GotoBLAS order): pack a block of NC_STRIPS strips whole, then run it
        // against x one L2-sized block of tiles at a time, so neither operand streams from
        // L3 once per strip (a 2048-token prefill's x is 4.7-12.6 MB).
        let mut wbuf = Vec::<Line>::new();
        for nb in (0..strips).step_by(blocking.nc_strips) {
            let nbs = blocking.nc_strips.min(strips - nb);
            let wpk = aligned(&mut wbuf, nbs * k * NR);
            wpk.par_chunks_mut(k * NR)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (i, dst)| {
                    for &(k0, kc) in &chunks {
                        pack(nb + i, k0, kc, &mut dst[k0 * NR..(k0 + kc) * NR], scratch);
                    }
                });
            let wpk = &*wpk;
            for t0 in (0..tiles).step_by(mc) {
                (0..nbs).into_par_iter().for_each(|i| {
                    for (c, &(k0, _)) in chunks.iter().enumerate() {
                        let wp = wpk[i * k * NR + k0 * NR..].as_ptr();
                        for t in t0..(t0 + mc).min(tiles) {
                            run_tile(t, nb + i, c, wp);
                        }
                    }
                });
            }
        }
    }
    for (y, &(_, n)) in ys.iter_mut().zip(ws) {
        // SAFETY: each strip wrote all m rows of its columns (chunk 0 stores, later chunks
        // add), and the strips of W_j cover columns 0..n_j of y_j.
        unsafe { y.set_len(m * n) };
    }
    ys
}

/// Packs W rows `n0 .. n0 + cols` (cols <= 32), columns `k0 .. k0 + kc`, as wp [kc][32]
/// (zero past `cols`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn pack_strip<K: Micro>(
    w: WeightRows<'_>,
    k: usize,
    n0: usize,
    cols: usize,
    k0: usize,
    kc: usize,
    wp: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (src, stride, off): (&[f32], usize, usize) = match w {
        WeightRows::Dense(d) => (&d[n0 * k..(n0 + cols) * k], k, k0),
        WeightRows::Blocks(b) => {
            scratch.resize(cols * kc, 0f32);
            b.decode_rows(n0, k0, kc, &mut scratch[..cols * kc]);
            (&scratch[..cols * kc], kc, 0)
        }
    };
    // SAFETY: the caller checked the CPU for K; `src` holds `cols` rows of `stride` floats
    // with columns off .. off + kc inside, wp holds kc * 32.
    unsafe { K::transpose_into(src, stride, off, cols, kc, wp) };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::qmatmul::BlockFormat;

    /// `x W^T` accumulated in f64: the reference of every projection kernel's tests.
    pub(crate) fn reference_f64(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// The SIMD kernels this CPU runs (each test checks every one of them).
    fn kernels() -> Vec<Isa> {
        [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&l| Isa::test_has(l))
            .collect()
    }

    /// The register tile's rows of `isa`'s kernel (so the blocked order blocks every kernel).
    fn tile_rows(isa: Isa) -> usize {
        if isa == Isa::Avx512 {
            MR
        } else {
            MR_AVX2
        }
    }

    fn randn(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| r.random_range(-1f32..1.0)).collect()
    }

    /// Every tile height, a partial strip, one and several k chunks (with a remainder that is
    /// not a multiple of 16), both loop orders (several x and W blocks), against a plain loop
    /// in f64.
    #[test]
    fn dense_matches_reference() {
        for isa in kernels() {
            for &(m, k, n) in &[
                (1, 16, 1),
                (7, 8, 9),
                (13, 40, 33),
                (MR * 2 + 5, 96, 64),
                (37, KC_MAX + 200, 70),
                (5, 3 * KC_MAX + 8, 31),
                (MR * 9 + 1, 2 * KC_MAX + 40, 5 * NR + 3),
            ] {
                let x = randn(m * k, 1);
                let w = randn(n * k, 2);
                let want = reference_f64(&x, m, k, &w, n);
                let dense = [(WeightRows::Dense(&w), n)];
                let got = matmul_isa(&x, m, k, &dense, Blocking::MEASURED, isa).remove(0);
                let d = max_diff(&got, &want);
                assert!(d < 1e-4, "{isa:?} [{m},{k}] x [{n},{k}]^T: max |diff| {d}");
                // The blocked order (x in blocks of 4 tiles, W in blocks of 2 strips).
                let small = Blocking {
                    x_blocked_floats: 0,
                    l2_floats: 4 * tile_rows(isa) * k,
                    nc_strips: 2,
                };
                let got = matmul_isa(&x, m, k, &dense, small, isa).remove(0);
                let d = max_diff(&got, &want);
                assert!(
                    d < 1e-4,
                    "{isa:?} blocked [{m},{k}] x [{n},{k}]^T: max |diff| {d}"
                );
            }
        }
    }

    /// Several weights against one x (dense and blocks mixed, widths with partial strips):
    /// each product equals the plain loop, in both loop orders.
    #[test]
    fn shared_x_matches_each_product() {
        for isa in kernels() {
            shared_x_matches_with(isa);
        }
    }

    fn shared_x_matches_with(isa: Isa) {
        let (m, k) = (MR * 5 + 3, KC_MAX + 96);
        let x = randn(m * k, 7);
        let w1 = randn(70 * k, 8);
        let w3 = randn(32 * k, 9);
        let b = BlockMatrix::quantize(BlockFormat::Q4_1, 45, k, &randn(45 * k, 10)).unwrap();
        let w2: Vec<f32> = b.dequantize();
        let ws = [
            (WeightRows::Dense(&w1), 70),
            (WeightRows::Blocks(&b), 45),
            (WeightRows::Dense(&w3), 32),
        ];
        let want = [
            reference_f64(&x, m, k, &w1, 70),
            reference_f64(&x, m, k, &w2, 45),
            reference_f64(&x, m, k, &w3, 32),
        ];
        let small = Blocking {
            x_blocked_floats: 0,
            l2_floats: 2 * tile_rows(isa) * k,
            nc_strips: 3,
        };
        for got in [
            matmul_isa(&x, m, k, &ws, Blocking::MEASURED, isa),
            matmul_isa(&x, m, k, &ws, small, isa),
        ] {
            assert_eq!(got.len(), 3);
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = max_diff(g, w);
                assert!(d < 1e-3, "{isa:?} W{j}: max |diff| {d}");
            }
        }
    }

    /// Block weights give the product with their dequantized values.
    #[test]
    fn blocks_match_their_dequantized_values() {
        for isa in kernels() {
            for fmt in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
                let (m, k, n) = (29, KC_MAX + 64, 45);
                let b = BlockMatrix::quantize(fmt, n, k, &randn(n * k, 11)).unwrap();
                let dense = b.dequantize();
                let x = randn(m * k, 3);
                let blocks = [(WeightRows::Blocks(&b), n)];
                let got = matmul_isa(&x, m, k, &blocks, Blocking::MEASURED, isa).remove(0);
                let want = reference_f64(&x, m, k, &dense, n);
                let d = max_diff(&got, &want);
                assert!(d < 1e-3, "{isa:?} {fmt:?}: max |diff| {d}");
            }
        }
        // What the public entry runs here (the CPU's best kernel, or the portable loop).
        let b = BlockMatrix::quantize(BlockFormat::Q4_1, 40, 64, &randn(40 * 64, 4)).unwrap();
        let x = randn(20 * 64, 5);
        let got = matmul_t(&x, 20, 64, WeightRows::Blocks(&b), 40);
        let d = max_diff(&got, &reference_f64(&x, 20, 64, &b.dequantize(), 40));
        assert!(d < 1e-3, "matmul_t: max |diff| {d}");
    }

    /// The portable fallback (what runs without AVX2) against the f64 loop, dense and blocks.
    #[test]
    fn portable_fallback_matches_reference() {
        let (m, k, n) = (5, 96, 7);
        let x = randn(m * k, 12);
        let w = randn(n * k, 13);
        let d = max_diff(
            &reference(&x, m, k, WeightRows::Dense(&w), n),
            &reference_f64(&x, m, k, &w, n),
        );
        assert!(d < 1e-4, "dense: {d}");
        let b = BlockMatrix::quantize(BlockFormat::Q8_0, n, k, &w).unwrap();
        let got = reference(&x, m, k, WeightRows::Blocks(&b), n);
        let d = max_diff(&got, &reference_f64(&x, m, k, &b.dequantize(), n));
        assert!(d < 1e-4, "blocks: {d}");
    }

    #[test]
    fn k_chunks_cover_k_on_block_boundaries() {
        for k in [16, 32, 576, 768, 769, 1536, 8192, 11008] {
            let c = k_chunks(k);
            assert_eq!(c[0].0, 0);
            assert_eq!(c.iter().map(|x| x.1).sum::<usize>(), k, "k = {k}");
            assert!(c.iter().all(|&(k0, len)| k0 % 32 == 0 && len <= KC_MAX));
            assert!(c.windows(2).all(|p| p[0].0 + p[0].1 == p[1].0));
        }
    }
}
