//! Projections against GGML block-quantized weights (Q4_0, Q4_1, Q8_0) with f32 activations,
//! on the CPU.
//!
//! Why not candle's `QMatMul`: it quantizes the activations to Q8 (so results move away from
//! the dequantized model that transformers and the golden tests run), has no SIMD path for Q4_1
//! on x86 (the default SmolLM2 file is Q4_1), and re-reads the weights once per activation row.
//! Here each 32-weight block is decoded into four 8-lane f32 registers (AVX2; two 16-lane ones
//! with AVX-512, picked at run time, portable code elsewhere) exactly as `QTensor::dequantize`
//! would and multiplied into up to four activation rows (eight with AVX-512) while it is in
//! registers, so a weight is read from memory once per call and the arithmetic is the dense
//! model's up to summation order. A single row (a decode step) skips the per-weight scaling:
//! `sum_j (q_j d + m) x_j = d sum_j q_j x_j + m sum_j x_j`, the same sum up to rounding. Both
//! are tested against dense `x W^T` on the dequantized weights. Work is split over output rows
//! with rayon.
//!
//! ```text
//!   x [m, k] f32      W [n, k] in blocks of 32      y [m, n] = x W^T
//!   for each output row j (parallel):  for each block b of W_j:  decode 32 f32 -> 4 ymm
//!       for each tile of <= 4 (AVX-512: 8) rows of x:  acc[row] += w * x[row, b*32 .. b*32+32]
//! ```
//!
//! Few rows (decode steps, the few tokens of an aLoRA call) are memory-bound: this reads 20
//! bytes per 32 weights (Q4_1) instead of 128 (dense f32). Many rows (prefill) are compute-bound:
//! the model's `LinearWeight` then runs [`crate::gemm`], which decodes blocks while packing. The
//! crossover and the speeds are in BENCHMARKS.md (`benches/linear_rows.rs`).

use rayon::prelude::*;

use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::simd::{dot, SendPtr};

/// Weights per block in every supported format.
pub const BLOCK: usize = 32;

/// A GGML block format this module computes with directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale, 16 bytes of nibbles: `(q - 8) * d`.
    Q4_0,
    /// f16 scale and minimum, 16 bytes of nibbles: `q * d + m`.
    Q4_1,
    /// f16 scale, 32 signed bytes: `q * d`.
    Q8_0,
}

impl BlockFormat {
    /// Bytes of quants per block (the rest of a GGML block is its f16 scale and offset).
    fn quant_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => 16,
            BlockFormat::Q8_0 => 32,
        }
    }

    /// Bytes per block of 32 weights in GGML's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }
}

/// A [rows, cols] matrix of GGML blocks, row-major (each row `cols / 32` blocks), held split:
/// the quants in one array, each block's scale (and Q4_1 offset) as f32 in others. The f16 to
/// f32 conversions then happen once at load instead of per block per call (two broadcasts and
/// two conversions per block were half of the single-row kernel's vector instructions), at
/// 4 more bytes per block read (Q4_1: 24 instead of 20).
#[derive(Clone)]
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    qs: Vec<u8>,
    d: Vec<f32>,
    /// Q4_1 only.
    m: Vec<f32>,
}

/// The formats as const parameters of the SIMD kernels: each format's block loop is compiled
/// on its own, with no branch on the format inside it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const Q4_0: u8 = 0;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const Q4_1: u8 = 1;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const Q8_0: u8 = 2;

/// [`BlockFormat::quant_bytes`] for a format's const.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const fn quant_bytes(f: u8) -> usize {
    if f == Q8_0 {
        32
    } else {
        16
    }
}

/// One row of blocks as the SIMD kernels read it: where its quants, scales and (Q4_1)
/// offsets start. Made by [`BlockMatrix::raw_row`], which checks the row exists; a kernel
/// reads `cols / 32` blocks from each.
#[derive(Clone, Copy)]
#[cfg(target_arch = "x86_64")]
struct RawRow {
    qs: *const u8,
    d: *const f32,
    /// Dangling unless Q4_1 (never read then).
    m: *const f32,
}

/// One row (or a run of its blocks) as the kernels read it.
#[derive(Clone, Copy)]
struct Row<'a> {
    qs: &'a [u8],
    d: &'a [f32],
    /// Empty unless Q4_1.
    m: &'a [f32],
}

impl Row<'_> {
    /// Blocks `b0 .. b1` of the row.
    fn blocks(self, format: BlockFormat, b0: usize, b1: usize) -> Self {
        let qb = format.quant_bytes();
        Row {
            qs: &self.qs[b0 * qb..b1 * qb],
            d: &self.d[b0..b1],
            m: if self.m.is_empty() {
                self.m
            } else {
                &self.m[b0..b1]
            },
        }
    }
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockMatrix({:?}, [{}, {}])",
            self.format, self.rows, self.cols
        )
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl BlockMatrix {
    /// Takes GGML block bytes (as in a GGUF file or `QTensor::data`) for a [rows, cols] matrix.
    pub fn new(format: BlockFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::Shape(format!(
                "{format:?} matrix with {cols} columns: not a multiple of {BLOCK}"
            )));
        }
        let want = rows * cols / BLOCK * format.block_bytes();
        if data.len() != want {
            return Err(KernelError::Shape(format!(
                "{format:?} [{rows}, {cols}]: {} bytes of blocks, expected {want}",
                data.len()
            )));
        }
        let blocks = rows * cols / BLOCK;
        let mut qs = Vec::with_capacity(blocks * format.quant_bytes());
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::new();
        for b in data.chunks_exact(format.block_bytes()) {
            d.push(f16_at(b, 0));
            match format {
                BlockFormat::Q4_1 => {
                    m.push(f16_at(b, 2));
                    qs.extend_from_slice(&b[4..20]);
                }
                BlockFormat::Q4_0 | BlockFormat::Q8_0 => qs.extend_from_slice(&b[2..]),
            }
        }
        Ok(BlockMatrix {
            format,
            rows,
            cols,
            qs,
            d,
            m,
        })
    }

    /// Quantizes a row-major f32 [rows, cols] matrix into GGML blocks the way ggml's reference
    /// quantizers do (Q4_0: scale from the signed absolute maximum over -8; Q4_1: minimum and
    /// (max - min) / 15; Q8_0: absolute maximum over 127; scales stored as f16). For tests and
    /// benchmarks: models arrive quantized.
    pub fn quantize(format: BlockFormat, rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        crate::error::ensure(w.len() == rows * cols, || {
            format!("quantize: {} weights for [{rows}, {cols}]", w.len())
        })?;
        crate::error::ensure(cols.is_multiple_of(BLOCK), || {
            format!("quantize: {cols} columns, not a multiple of {BLOCK}")
        })?;
        let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
        let mut data = Vec::with_capacity(rows * cols / BLOCK * format.block_bytes());
        for b in w.chunks_exact(BLOCK) {
            match format {
                BlockFormat::Q4_0 => {
                    let max = b
                        .iter()
                        .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16(d));
                    let q = |x: f32| ((x * id + 8.5) as u8).min(15);
                    data.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                }
                BlockFormat::Q4_1 => {
                    let (min, max) = b
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16(d));
                    data.extend_from_slice(&f16(min));
                    let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
                    data.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                }
                BlockFormat::Q8_0 => {
                    let amax = b.iter().fold(0f32, |m, &x| m.max(x.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16(d));
                    data.extend(b.iter().map(|&x| (x * id).round() as i8 as u8));
                }
            }
        }
        BlockMatrix::new(format, rows, cols, data)
    }

    /// [rows, cols].
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    #[inline]
    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.cols / BLOCK;
        let qb = self.format.quant_bytes();
        Row {
            qs: &self.qs[r * nb * qb..(r + 1) * nb * qb],
            d: &self.d[r * nb..(r + 1) * nb],
            m: if self.m.is_empty() {
                &self.m
            } else {
                &self.m[r * nb..(r + 1) * nb]
            },
        }
    }

    /// Row `r` (or, with [`RawRow::from`], a run of its blocks) for the SIMD kernels.
    #[inline]
    #[cfg(target_arch = "x86_64")]
    fn raw_row(&self, r: usize) -> RawRow {
        RawRow::from(self.row(r))
    }

    /// Row `r` as f32, exactly what `QTensor::dequantize` gives.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        decode_row(self.format, self.row(r), out);
    }

    /// Rows `r0 .. r0 + out.len() / kc`, columns `k0 .. k0 + kc` (both multiples of 32) as f32
    /// [rows, kc] row-major, exactly what `QTensor::dequantize` gives (the gemm's packing reads
    /// this).
    pub(crate) fn decode_rows(&self, r0: usize, k0: usize, kc: usize, out: &mut [f32]) {
        debug_assert!(k0.is_multiple_of(BLOCK) && kc.is_multiple_of(BLOCK));
        let isa = Isa::get();
        for (i, o) in out.chunks_exact_mut(kc).enumerate() {
            let row = self
                .row(r0 + i)
                .blocks(self.format, k0 / BLOCK, (k0 + kc) / BLOCK);
            #[cfg(target_arch = "x86_64")]
            {
                let raw = RawRow::from(row);
                // SAFETY: `Isa::get` checked the features; `row` holds kc / 32 blocks and `o`
                // kc floats.
                unsafe {
                    match (isa, self.format) {
                        (Isa::Avx512, BlockFormat::Q4_0) => avx512::decode_run::<Q4_0>(raw, o),
                        (Isa::Avx512, BlockFormat::Q4_1) => avx512::decode_run::<Q4_1>(raw, o),
                        (Isa::Avx512, BlockFormat::Q8_0) => avx512::decode_run::<Q8_0>(raw, o),
                        (Isa::Avx2, BlockFormat::Q4_0) => avx2::decode_run::<Q4_0>(raw, o),
                        (Isa::Avx2, BlockFormat::Q4_1) => avx2::decode_run::<Q4_1>(raw, o),
                        (Isa::Avx2, BlockFormat::Q8_0) => avx2::decode_run::<Q8_0>(raw, o),
                        (Isa::Portable, _) => decode_row(self.format, row, o),
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = isa;
                decode_row(self.format, row, o);
            }
        }
    }

    /// The whole matrix as f32 [rows, cols], rows decoded in parallel.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.decode_row(r, o));
        out
    }

    /// `x W^T` for `x` [m, cols] row-major; returns [m, rows].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Isa::get())
    }

    fn matmul_with(&self, x: &[f32], m: usize, isa: Isa) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let isa = isa.min(Isa::get());
        let n = self.rows;
        if m == 0 || n == 0 {
            return vec![0f32; m * n];
        }
        // Output rows per task: a few tasks per thread for balance, not so few rows that the
        // scheduling costs more than the work.
        let threads = rayon::current_num_threads().max(1);
        let chunk = n.div_ceil(threads * 4).clamp(8, 256);
        let mut out = vec![0f32; m * n];
        let dst = SendPtr(out.as_mut_ptr());
        // The single row's sum over each block (see `avx2::single`).
        let sums: Vec<f32> = if isa != Isa::Portable && m == 1 {
            x.chunks_exact(BLOCK)
                .map(|c| c.iter().sum::<f32>())
                .collect()
        } else {
            Vec::new()
        };
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let (r0, rows) = (c * chunk, chunk.min(n - c * chunk));
            match isa {
                // SAFETY: `isa` is at most `Isa::get()` (clamped above), so the CPU has the
                // features; x and sums are sized by the assert above; `out` is [m, n] and
                // this task alone writes its columns r0 .. r0 + rows.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe {
                    avx512::rows_times_x(self, r0, rows, x, &sums, m, dst.get())
                },
                // SAFETY: as above, for AVX2.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::rows_times_x(self, r0, rows, x, &sums, m, dst.get()) },
                _ => {
                    let mut scratch = vec![0f32; self.cols];
                    for j in r0..r0 + rows {
                        decode_row(self.format, self.row(j), &mut scratch);
                        for i in 0..m {
                            let v = dot(&scratch, &x[i * self.cols..(i + 1) * self.cols]);
                            // SAFETY: i < m and j < n index inside `out` ([m, n]); column j is
                            // this task's alone.
                            unsafe { *dst.get().add(i * n + j) = v };
                        }
                    }
                }
            }
        });
        out
    }
}

/// Portable decoding, the reference for the SIMD path (and what `QTensor::dequantize` does).
fn decode_row(format: BlockFormat, row: Row<'_>, out: &mut [f32]) {
    let qb = format.quant_bytes();
    for (b, (q, o)) in row
        .qs
        .chunks_exact(qb)
        .zip(out.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let d = row.d[b];
        match format {
            BlockFormat::Q4_0 => {
                for (j, &q) in q.iter().enumerate() {
                    o[j] = ((q & 0x0F) as i16 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i16 - 8) as f32 * d;
                }
            }
            BlockFormat::Q4_1 => {
                let m = row.m[b];
                for (j, &q) in q.iter().enumerate() {
                    o[j] = (q & 0x0F) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            BlockFormat::Q8_0 => {
                for (j, &q) in q.iter().enumerate() {
                    o[j] = q as i8 as f32 * d;
                }
            }
        }
    }
}

/// The offset part of a single-row product over `nb` blocks: `sum_b c_b S_b` with S_b the
/// block's sum of x (`sums`) and c_b the offset per unit of quant (Q4_1: m; Q4_0: -8 d; Q8_0:
/// none).
///
/// # Safety
/// `row` and `sums` hold `nb` blocks' scales (and offsets) and sums.
#[cfg(target_arch = "x86_64")]
unsafe fn offset_term<const F: u8>(row: RawRow, nb: usize, sums: *const f32) -> f32 {
    // SAFETY: the caller's contract: nb floats at each pointer read.
    let (sums, d) = unsafe {
        (
            std::slice::from_raw_parts(sums, nb),
            std::slice::from_raw_parts(row.d, nb),
        )
    };
    match F {
        // SAFETY: as above; Q4_1 rows have their offsets.
        Q4_1 => dot(unsafe { std::slice::from_raw_parts(row.m, nb) }, sums),
        Q4_0 => -8.0 * dot(d, sums),
        _ => 0.0,
    }
}

#[cfg(target_arch = "x86_64")]
impl From<Row<'_>> for RawRow {
    fn from(r: Row<'_>) -> RawRow {
        RawRow {
            qs: r.qs.as_ptr(),
            d: r.d.as_ptr(),
            m: r.m.as_ptr(),
        }
    }
}

/// `rows_times_x` for a SIMD module: `out[i * n + j] = W_j . x_i` for the `rows` rows of W from
/// `r0` and every row i of x [m, cols] (n = W's row count: `out` is y [m, n] itself, each task
/// writing its own columns, so no transpose afterwards). One row of x goes through the module's
/// `single` (`sums` as it takes them, only read when m is 1), more in tiles of up to `$max` rows
/// through its `tile`: 4 with AVX2 (4 weight and 8 accumulator registers of 16), 8 with AVX-512
/// (2 weight and 16 accumulator registers of 32), so a block is decoded once for that many rows
/// (a 6-row aLoRA step was a tile of 4 and one of 2, each decoding every block). The format is
/// a const parameter of the kernels below the driver, so the block loop has no branch on it,
/// and they address W and x through raw pointers (the slice-indexed version checked the
/// format and a bound on every block, ~48 instructions per block of a 7-row tile against ~41
/// now, and wrote [n, m] for a transpose afterwards: a 6-row step of SmolLM2 after 2,048
/// tokens went from 31.3 to 26.7 ms; BENCHMARKS.md, twentieth session). The loop over W's
/// rows is inside the kernel (called per row, its prologue was ~7% of a decode step). The
/// same driver for both instruction sets, compiled with each one's features.
#[cfg(target_arch = "x86_64")]
macro_rules! rows_times_x {
    ($features:literal, $max:literal, tails: $($tail:literal),+) => {
        /// See the macro's doc: the rows `r0 .. r0 + rows` of W into y [m, n] at `out`.
        ///
        /// # Safety
        /// The CPU has this module's features; x holds m rows of W's width, `sums` one sum per
        /// block when m is 1, `out` m * n floats, and no other thread writes columns
        /// `r0 .. r0 + rows` of it meanwhile.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn rows_times_x(
            mat: &super::BlockMatrix,
            r0: usize,
            rows: usize,
            x: &[f32],
            sums: &[f32],
            m: usize,
            out: *mut f32,
        ) {
            // SAFETY: as the function's contract says; `rows_of` checks the row range.
            unsafe {
                match mat.format {
                    super::BlockFormat::Q4_0 => {
                        rows_of::<{ super::Q4_0 }>(mat, r0, rows, x, sums, m, out)
                    }
                    super::BlockFormat::Q4_1 => {
                        rows_of::<{ super::Q4_1 }>(mat, r0, rows, x, sums, m, out)
                    }
                    super::BlockFormat::Q8_0 => {
                        rows_of::<{ super::Q8_0 }>(mat, r0, rows, x, sums, m, out)
                    }
                }
            }
        }

        /// `rows_times_x` for one block format (`F`, one of the format consts).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn rows_of<const F: u8>(
            mat: &super::BlockMatrix,
            r0: usize,
            rows: usize,
            x: &[f32],
            sums: &[f32],
            m: usize,
            out: *mut f32,
        ) {
            let (n, cols) = (mat.rows, mat.cols);
            let nb = cols / super::BLOCK;
            assert!(r0 + rows <= n && x.len() >= m * cols && (m != 1 || sums.len() >= nb));
            // SAFETY: rows `r0 .. r0 + rows` exist (asserted), so `raw_row` stays in W's
            // arrays; x's rows and `sums` are as long as the kernels read (asserted); `out`
            // holds m * n floats and these columns are this call's (the caller's contract).
            unsafe {
                let xp = x.as_ptr();
                for j in r0..r0 + rows {
                    let row = mat.raw_row(j);
                    if m == 1 {
                        *out.add(j) = single::<F>(row, nb, xp, sums.as_ptr());
                        continue;
                    }
                    let mut i = 0;
                    while i + $max <= m {
                        tile::<F, $max>(row, nb, xp.add(i * cols), cols, out.add(i * n + j), n);
                        i += $max;
                    }
                    let (xi, o) = (xp.add(i * cols), out.add(i * n + j));
                    // The tail: 2 ..= `$max - 1` rows in one tile (the `tails` listed).
                    match m - i {
                        $($tail => tile::<F, $tail>(row, nb, xi, cols, o, n),)+
                        // One row left: redo the row before it in a tile of two (a row's sum
                        // does not depend on the tile it is in, so the redone one is the same).
                        1 => tile::<F, 2>(row, nb, xi.sub(cols), cols, o.sub(n), n),
                        _ => {}
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
// Register tiles are indexed [row][lane group] in several arrays at once; index loops say so
// more plainly than zipped iterators.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{quant_bytes, RawRow, BLOCK, Q4_0, Q4_1, Q8_0};
    use crate::simd::x86::hsum;

    /// Low and high 8 bytes of `v` (signed bytes) as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen(v: __m128i) -> (__m256, __m256) {
        (
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v))),
        )
    }

    /// One block's quants (at `q`) as four registers of 8 f32 (elements 0-7, 8-15, 16-23,
    /// 24-31), without scale or offset: Q4 nibbles as 0..15, Q8 bytes as -128..127.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quants<const F: u8>(q: *const u8) -> [__m256; 4] {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let (lo, hi) = if F == Q8_0 {
                (
                    _mm_loadu_si128(q as *const __m128i),
                    _mm_loadu_si128(q.add(16) as *const __m128i),
                )
            } else {
                let qs = _mm_loadu_si128(q as *const __m128i);
                let nib = _mm_set1_epi8(0x0F);
                // Elements 0..16, then 16..32.
                (
                    _mm_and_si128(qs, nib),
                    _mm_and_si128(_mm_srli_epi16::<4>(qs), nib),
                )
            };
            let (a0, a1) = widen(lo);
            let (a2, a3) = widen(hi);
            [a0, a1, a2, a3]
        }
    }

    /// Block `b` of `row` as four registers of weights, exactly as `QTensor::dequantize`
    /// computes them (`q d + m`, `(q - 8) d`, `q d`; multiply then add, no fma).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weights<const F: u8>(row: RawRow, b: usize) -> [__m256; 4] {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let mut q = quants::<F>(row.qs.add(b * quant_bytes(F)));
            let d = _mm256_set1_ps(*row.d.add(b));
            if F == Q4_0 {
                let eight = _mm256_set1_ps(8.0);
                q = q.map(|v| _mm256_sub_ps(v, eight));
            }
            let w = q.map(|v| _mm256_mul_ps(v, d));
            if F == Q4_1 {
                let m = _mm256_set1_ps(*row.m.add(b));
                return w.map(|v| _mm256_add_ps(v, m));
            }
            w
        }
    }

    /// Decodes `out.len() / 32` blocks of `row` into f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode_run<const F: u8>(row: RawRow, out: &mut [f32]) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
                for (i, w) in weights::<F>(row, b).into_iter().enumerate() {
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * i), w);
                }
            }
        }
    }

    /// `W_row . x` for one row of x, the decode-step case, factored so a block costs no
    /// per-weight scaling: `sum_b d_b (q_b . x_b)` plus the offset part (`offset_term`, from
    /// `sums`, each block's sum of x).
    /// Faster than decoding the weights for one row (102 -> 89 µs per call in
    /// `benches/linear_rows.rs` with AVX2 and f16 scales); from two rows on the decode is
    /// shared and [`tile`] takes over.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn single<const F: u8>(row: RawRow, nb: usize, x: *const f32, sums: *const f32) -> f32 {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                let q = quants::<F>(row.qs.add(b * quant_bytes(F)));
                let x = x.add(b * BLOCK);
                let mut t = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
                t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x.add(8)), t);
                t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x.add(16)), t);
                t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x.add(24)), t);
                acc = _mm256_fmadd_ps(t, _mm256_broadcast_ss(&*row.d.add(b)), acc);
            }
            hsum(acc) + super::offset_term::<F>(row, nb, sums)
        }
    }

    /// `out[r * stride] = W_row . x_r` for `R` (2..=4) rows of x starting at `xs`: each block
    /// decoded to weights once, then 4 fma per row into 2 accumulators per row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const F: u8, const R: usize>(
        row: RawRow,
        nb: usize,
        xs: *const f32,
        cols: usize,
        out: *mut f32,
        stride: usize,
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let xr: [*const f32; R] = std::array::from_fn(|r| xs.add(r * cols));
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for b in 0..nb {
                let w = weights::<F>(row, b);
                for r in 0..R {
                    let x = xr[r].add(b * BLOCK);
                    acc[r][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), acc[r][1]);
                    acc[r][0] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), acc[r][1]);
                }
            }
            for r in 0..R {
                *out.add(r * stride) = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
            }
        }
    }

    rows_times_x!("avx2,fma,f16c", 4, tails: 3, 2);
}

#[cfg(target_arch = "x86_64")]
// As in `avx2`: register tiles indexed [row][half].
#[allow(clippy::needless_range_loop)]
mod avx512 {
    //! The AVX2 kernels' twins on 16 lanes: a block is two registers, so widening, converting
    //! and scaling cost half the instructions.

    use std::arch::x86_64::*;

    use super::{quant_bytes, RawRow, BLOCK, Q4_0, Q4_1, Q8_0};

    /// Quants (at `q`) as two registers (elements 0-15, 16-31).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn quants<const F: u8>(q: *const u8) -> [__m512; 2] {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            if F == Q8_0 {
                let lo = _mm_loadu_si128(q as *const __m128i);
                let hi = _mm_loadu_si128(q.add(16) as *const __m128i);
                [
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
                ]
            } else {
                let qs = _mm_loadu_si128(q as *const __m128i);
                let nib = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(qs, nib);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), nib);
                [
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)),
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)),
                ]
            }
        }
    }

    /// Block `b` of `row` as weights, exactly as `QTensor::dequantize` computes them.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn weights<const F: u8>(row: RawRow, b: usize) -> [__m512; 2] {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let mut q = quants::<F>(row.qs.add(b * quant_bytes(F)));
            let d = _mm512_set1_ps(*row.d.add(b));
            if F == Q4_0 {
                let eight = _mm512_set1_ps(8.0);
                q = q.map(|v| _mm512_sub_ps(v, eight));
            }
            let w = q.map(|v| _mm512_mul_ps(v, d));
            if F == Q4_1 {
                let m = _mm512_set1_ps(*row.m.add(b));
                return w.map(|v| _mm512_add_ps(v, m));
            }
            w
        }
    }

    /// Decodes `out.len() / 32` blocks of `row` into f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn decode_run<const F: u8>(row: RawRow, out: &mut [f32]) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
                let w = weights::<F>(row, b);
                _mm512_storeu_ps(o.as_mut_ptr(), w[0]);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), w[1]);
            }
        }
    }

    /// One row of x, factored as in `avx2::single`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn single<const F: u8>(row: RawRow, nb: usize, x: *const f32, sums: *const f32) -> f32 {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let mut acc = _mm512_setzero_ps();
            for b in 0..nb {
                let q = quants::<F>(row.qs.add(b * quant_bytes(F)));
                let x = x.add(b * BLOCK);
                let t = _mm512_mul_ps(q[0], _mm512_loadu_ps(x));
                let t = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(x.add(16)), t);
                acc = _mm512_fmadd_ps(t, _mm512_set1_ps(*row.d.add(b)), acc);
            }
            // The offset part (`offset_term`), 16 blocks per fma, into the same accumulator.
            let (c, scale) = match F {
                Q4_1 => (row.m, 1.0),
                Q4_0 => (row.d, -8.0),
                _ => return _mm512_reduce_add_ps(acc),
            };
            let scale = _mm512_set1_ps(scale);
            for b in (0..nb).step_by(16) {
                let k: __mmask16 = if nb - b >= 16 {
                    0xFFFF
                } else {
                    (1 << (nb - b)) - 1
                };
                let cv = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, c.add(b)), scale);
                acc = _mm512_fmadd_ps(cv, _mm512_maskz_loadu_ps(k, sums.add(b)), acc);
            }
            _mm512_reduce_add_ps(acc)
        }
    }

    /// `out[r * stride] = W_row . x_r` for `R` (2..=8) rows of x: each block decoded to weights
    /// once, 2 fma per row.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tile<const F: u8, const R: usize>(
        row: RawRow,
        nb: usize,
        xs: *const f32,
        cols: usize,
        out: *mut f32,
        stride: usize,
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let xr: [*const f32; R] = std::array::from_fn(|r| xs.add(r * cols));
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for b in 0..nb {
                let w = weights::<F>(row, b);
                for r in 0..R {
                    let x = xr[r].add(b * BLOCK);
                    acc[r][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x.add(16)), acc[r][1]);
                }
            }
            for r in 0..R {
                *out.add(r * stride) = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
            }
        }
    }

    rows_times_x!("avx512f,avx2,fma,f16c", 8, tails: 7, 6, 5, 4, 3, 2);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        // An offset so Q4_1's minimum is not symmetric around zero.
        (0..rows * cols)
            .map(|_| r.random_range(-1.7f32..2.3))
            .collect()
    }

    const FORMATS: [BlockFormat; 3] = [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0];

    /// Quantizing then decoding stays within half a quantization step of each weight, and the
    /// portable decoder and the SIMD one (through `decode_rows`) give the same bits.
    #[test]
    fn quantize_round_trips_within_a_step() {
        for f in FORMATS {
            let (rows, cols) = (5, 96);
            let w = weights(rows, cols, 1);
            let bm = BlockMatrix::quantize(f, rows, cols, &w).unwrap();
            let back = bm.dequantize();
            for (blk, (a, b)) in w.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let (lo, hi) = a
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                let step = match f {
                    BlockFormat::Q4_0 => lo.abs().max(hi.abs()) / 8.0,
                    BlockFormat::Q4_1 => (hi - lo) / 15.0,
                    BlockFormat::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
                };
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= step * 0.5 + 1e-2 * step + 1e-6,
                        "{f:?} block {blk}: {x} -> {y}"
                    );
                }
            }
            let mut runs = vec![0f32; rows * 64];
            bm.decode_rows(0, 32, 64, &mut runs);
            for r in 0..rows {
                assert_eq!(
                    &runs[r * 64..][..64],
                    &back[r * cols + 32..][..64],
                    "{f:?} row {r}"
                );
            }
        }
    }

    /// Every kernel (portable and each SIMD level this CPU has) agrees with dense f32 `x W^T`
    /// on the decoded weights for every tile shape (1..=17 rows covers the 4- and 8-row tiles
    /// and each tail).
    #[test]
    fn matmul_matches_dense() {
        let (n, k) = (77, 192);
        for f in FORMATS {
            let bm = BlockMatrix::quantize(f, n, k, &weights(n, k, 2)).unwrap();
            let w = bm.dequantize();
            for m in 1..=17 {
                let x = weights(m, k, 3 + m as u64);
                let want = crate::gemm::tests::reference_f64(&x, m, k, &w, n);
                for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
                    if isa != Isa::Portable && !Isa::test_has(isa) {
                        continue;
                    }
                    let got = bm.matmul_with(&x, m, isa);
                    assert_eq!(got.len(), want.len());
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{f:?} m={m} {isa:?} element {i}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// From two rows on, a row's result does not depend on the rows beside it (every tile
    /// sums a row the same way; the driver's one-row tail relies on it, redoing a row in a
    /// tile of two): each row of a 13-row product, bit for bit, against it in a pair.
    #[test]
    fn a_row_is_the_same_in_any_tile() {
        let (n, k) = (40, 96);
        for f in FORMATS {
            let bm = BlockMatrix::quantize(f, n, k, &weights(n, k, 4)).unwrap();
            let m = 13;
            let x = weights(m, k, 5);
            for isa in [Isa::Avx2, Isa::Avx512] {
                if !Isa::test_has(isa) {
                    continue;
                }
                let all = bm.matmul_with(&x, m, isa);
                for i in 0..m {
                    let other = (i + 5) % m;
                    let pair = [&x[i * k..][..k], &x[other * k..][..k]].concat();
                    let two = bm.matmul_with(&pair, 2, isa);
                    assert_eq!(&two[..n], &all[i * n..][..n], "{f:?} {isa:?} row {i}");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(BlockMatrix::new(BlockFormat::Q8_0, 2, 40, vec![0; 68]).is_err());
        assert!(BlockMatrix::new(BlockFormat::Q8_0, 2, 32, vec![0; 67]).is_err());
        assert!(BlockMatrix::new(BlockFormat::Q8_0, 2, 32, vec![0; 68]).is_ok());
        assert!(BlockMatrix::quantize(BlockFormat::Q4_1, 2, 32, &[0.0; 63]).is_err());
    }
}
