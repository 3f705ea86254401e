//! Causal attention for prefill chunks on AVX-512 and AVX2 CPUs, flash-style: K and V are read from
//! the KV pools through each sequence's slots, in tiles of [`KT`] keys, and the softmax is
//! computed online (running max and sum per query row), so no score matrix over the whole
//! context is built and no key past a row's position is computed.
//!
//! Work items are (sequence, KV head, a block of 32 query positions); an item's rows are its
//! positions times the query heads sharing the KV head (96 for SmolLM2). Scores are held
//! transposed, keys by rows, so the softmax runs down columns of 16 query rows at once with
//! no horizontal reductions:
//!
//! ```text
//!   once per (sequence, KV head):  Kp [groups of 12 keys][d][12]   (the gemm's x packing)
//!   per item:                      Qt [strips of 32 rows][d][32]   (scaled; the gemm's W packing)
//!   per tile of KT = 4 * MR keys:
//!     S^T [KT][rows] = Kp Qt                        the gemm's 12 x 32 register tile, k = d
//!     per 16 rows: mask keys past each row's position, m' = max(m, max_t S^T),
//!                  P = e^(S^T - m'),  l = l e^(m - m') + sum_t P
//!     O [rows][d] = O e^(m - m') + P^T V            6 rows x d in registers, V rows in place
//! ```
//!
//! and at the end O / l. On AVX2-only CPUs the same item runs with 8-lane registers: the
//! gemm's AVX2 tile (6 keys x 32 rows), tiles of `KT_AVX2` = 48 keys, the softmax down
//! columns of 8 rows (blends for the masks), P V in 6-row x 16-column register blocks.
//! [`crate::attention::reference`] is its reference in the tests here
//! (the model crate's golden tests also run it against PEFT's logits). Decode-like steps use
//! [`crate::paged`], which spreads few query rows over the threads differently.

use rayon::prelude::*;

use crate::attention::{AttnBatch, Shape};
use crate::error::{KernelError, Result};
use crate::isa::Isa;
use crate::kv::KvPool;
use crate::simd::SendPtr;

/// Query positions per work item.
const QB: usize = 32;
/// Keys per score register tile (the gemm's MR).
const MR: usize = crate::gemm::MR;
/// Keys per tile: four register tiles (56).
pub const KT: usize = 4 * MR;
/// The same on AVX2: the gemm's 6-row tile, eight of them per tile of keys (48).
const MR_AVX2: usize = crate::gemm::MR_AVX2;
/// Keys per tile on AVX2.
pub const KT_AVX2: usize = 8 * MR_AVX2;
/// Query rows per register strip (the gemm's NR).
const NR: usize = 32;

/// Whether this CPU and head size run the kernel (AVX2 or AVX-512).
pub fn available(head_dim: usize) -> bool {
    Isa::has_avx2() && matches!(head_dim, 16 | 32 | 64 | 128)
}

/// One work item: query positions `j0 .. j0 + len` of a sequence, one KV head.
#[derive(Clone, Copy)]
struct Item {
    /// The sequence's first row in the step's token order.
    q0: usize,
    j0: usize,
    len: usize,
    /// The sequence's first entry in `gather_slots_host`.
    k0: usize,
    /// The sequence's index in the step.
    seq: usize,
    /// Position of the sequence's first new token.
    start: usize,
    head: usize,
}

/// `q`: [tokens, heads, head_dim] (RoPE applied), the pools [slots, kv_heads, head_dim] of one
/// layer, the sequences as `b` lays them out; returns [tokens, heads, head_dim]. Errors unless
/// [`available`] for the head size.
///
/// Pools of f16 / bf16 are read once per call into f32 copies of the batch's rows (a prefill
/// chunk's attention outweighs that pass many times over), then run as f32.
pub fn attention(
    q: &[f32],
    k_pool: KvPool<'_>,
    v_pool: KvPool<'_>,
    b: &AttnBatch<'_>,
    sh: &Shape,
) -> Result<Vec<f32>> {
    if let (Some(k), Some(v)) = (k_pool.as_f32(), v_pool.as_f32()) {
        return attention_f32(q, k, v, b, sh);
    }
    b.check_lens(q.len(), k_pool.len(), v_pool.len(), sh)?;
    let row = sh.num_kv_heads * sh.head_dim;
    let slots = b.slots();
    let widen = |pool: KvPool<'_>| {
        let mut out = vec![0f32; slots.len() * row];
        out.par_chunks_mut(row)
            .zip(slots.par_iter())
            .for_each(|(o, &s)| pool.read_f32(s as usize * row, o));
        out
    };
    let (k, v) = (widen(k_pool), widen(v_pool));
    let dense: Vec<u32> = (0..slots.len() as u32).collect();
    let b = AttnBatch::new(b.seqlens_q(), b.seqlens_k(), b.start_pos(), &dense)?;
    attention_f32(q, &k, &v, &b, sh)
}

fn attention_f32(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    b: &AttnBatch<'_>,
    sh: &Shape,
) -> Result<Vec<f32>> {
    attention_isa(q, k_pool, v_pool, b, sh, Isa::get())
}

/// The attention with the kernel of `isa` (at most this CPU's level; AVX2 or AVX-512).
fn attention_isa(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    b: &AttnBatch<'_>,
    sh: &Shape,
    isa: Isa,
) -> Result<Vec<f32>> {
    b.check(q, k_pool, v_pool, sh)?;
    let (nh, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
    if !available(d) || isa < Isa::Avx2 || isa > Isa::get() {
        return Err(KernelError::Shape(format!(
            "flash attention: needs AVX2 and head_dim 16, 32, 64 or 128 (head_dim {d})"
        )));
    }
    // Keys per register tile of this kernel: the packing groups keys by it.
    let mr = if isa == Isa::Avx512 { MR } else { MR_AVX2 };
    let (seqlens_q, seqlens_k) = (b.seqlens_q(), b.seqlens_k());
    let n = b.num_tokens();
    let mut items = Vec::new();
    let (mut qo, mut ko) = (0, 0);
    for (i, (&nq, &nk)) in seqlens_q.iter().zip(seqlens_k).enumerate() {
        for head in 0..kvh {
            for j0 in (0..nq).step_by(QB) {
                items.push(Item {
                    q0: qo,
                    j0,
                    len: QB.min(nq - j0),
                    k0: ko,
                    seq: i,
                    start: b.start_pos()[i],
                    head,
                });
            }
        }
        qo += nq;
        ko += nk;
    }
    // Longest items (most keys) first, so the last ones to finish are short.
    items.sort_by_key(|it| std::cmp::Reverse(it.start + it.j0 + it.len));
    let mut out = vec![0f32; n * nh * d];
    let dst = SendPtr(out.as_mut_ptr());
    let slots = b.slots();
    // Where each (sequence, KV head)'s packed keys start in `kp`.
    let mut kp_at = Vec::with_capacity(seqlens_k.len() * kvh);
    let mut total = 0;
    for &nk in seqlens_k {
        for _ in 0..kvh {
            kp_at.push(total);
            total += nk.div_ceil(mr) * mr * d;
        }
    }
    let mut kp = vec![0f32; total];
    pack_keys(&mut kp, k_pool, slots, seqlens_k, kvh, d, mr);
    let geo = Geometry {
        q,
        kp: &kp,
        kp_at: &kp_at,
        v: v_pool,
        slots,
        heads: nh,
        kv_heads: kvh,
        scale: sh.scale,
    };
    #[cfg(target_arch = "x86_64")]
    items.par_iter().for_each_init(Scratch::default, |s, it| {
        // SAFETY: the CPU has `isa` and the head size has a kernel (checked above);
        // `AttnBatch::check` put the slots inside the pools and sized q; the keys are packed
        // in groups of this kernel's tile; item rows (token, head) are disjoint, so no two
        // tasks write the same output row.
        unsafe {
            match (isa, d) {
                (Isa::Avx512, 16) => avx512::item::<1>(&geo, it, s, dst.get()),
                (Isa::Avx512, 32) => avx512::item::<2>(&geo, it, s, dst.get()),
                (Isa::Avx512, 64) => avx512::item::<4>(&geo, it, s, dst.get()),
                (Isa::Avx512, _) => avx512::item::<8>(&geo, it, s, dst.get()),
                (_, 16) => avx2::item::<1>(&geo, it, s, dst.get()),
                (_, 32) => avx2::item::<2>(&geo, it, s, dst.get()),
                (_, 64) => avx2::item::<4>(&geo, it, s, dst.get()),
                _ => avx2::item::<8>(&geo, it, s, dst.get()),
            }
        }
    });
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (geo, dst, items);
    Ok(out)
}

/// Each (sequence, KV head)'s keys in groups of `mr`, each group [d][mr] (key-minor, zero
/// past the last key): the x-side packing of the gemm's register tile.
fn pack_keys(
    kp: &mut [f32],
    k: &[f32],
    slots: &[u32],
    seqlens_k: &[usize],
    kv_heads: usize,
    d: usize,
    mr: usize,
) {
    let mut jobs = Vec::with_capacity(seqlens_k.len() * kv_heads);
    let mut rest = kp;
    let mut k0 = 0;
    for &nk in seqlens_k {
        for h in 0..kv_heads {
            let (mine, tail) = rest.split_at_mut(nk.div_ceil(mr) * mr * d);
            rest = tail;
            jobs.push((mine, &slots[k0..k0 + nk], h));
        }
        k0 += nk;
    }
    jobs.into_par_iter().for_each(|(dst, keys, h)| {
        for (t, &slot) in keys.iter().enumerate() {
            let row = &k[(slot as usize * kv_heads + h) * d..][..d];
            let group = &mut dst[t / mr * mr * d..][..mr * d];
            for (c, &x) in row.iter().enumerate() {
                group[c * mr + t % mr] = x;
            }
        }
    });
}

/// What every item reads.
struct Geometry<'a> {
    q: &'a [f32],
    /// Packed keys (see `pack_keys`) and where each (sequence, KV head) starts.
    kp: &'a [f32],
    kp_at: &'a [usize],
    v: &'a [f32],
    slots: &'a [u32],
    heads: usize,
    kv_heads: usize,
    scale: f32,
}

/// Per-thread buffers, reused across items.
#[derive(Default)]
struct Scratch {
    /// Scaled query rows [rows][d], then transposed per strip of 32 rows [d][32].
    qbuf: Vec<f32>,
    qt: Vec<crate::gemm::Line>,
    /// Transposed scores, then probabilities [KT][padded rows].
    s: Vec<crate::gemm::Line>,
    /// Output accumulators [rows][d]; per padded row the running max and sum, and this
    /// tile's rescale factor.
    o: Vec<f32>,
    m: Vec<crate::gemm::Line>,
    l: Vec<crate::gemm::Line>,
    alpha: Vec<crate::gemm::Line>,
}

#[cfg(target_arch = "x86_64")]
/// An item's block of query rows as both SIMD bodies lay it out: row r is position
/// `j0 + r / group` of the block and query head `head * group + r % group`, padded to whole
/// strips of `NR` rows (`rp`).
struct Block {
    d: usize,
    group: usize,
    heads: usize,
    head: usize,
    /// The block's first token in the step's order.
    tok0: usize,
    rows: usize,
    strips: usize,
    rp: usize,
    /// Position of the block's first row, and the keys its last row sees.
    first_pos: usize,
    kend: usize,
}

#[cfg(target_arch = "x86_64")]
impl Block {
    fn new(g: &Geometry<'_>, it: &Item, d: usize) -> Block {
        let group = g.heads / g.kv_heads;
        let rows = it.len * group;
        let strips = rows.div_ceil(NR);
        let first_pos = it.start + it.j0;
        Block {
            d,
            group,
            heads: g.heads,
            head: it.head,
            tok0: it.q0 + it.j0,
            rows,
            strips,
            rp: strips * NR,
            first_pos,
            kend: first_pos + it.len,
        }
    }

    /// Where row r starts in q (and in the output).
    fn q_row(&self, r: usize) -> usize {
        let tok = self.tok0 + r / self.group;
        (tok * self.heads + self.head * self.group + r % self.group) * self.d
    }

    /// What both bodies start from, in `s`: the rows scaled into `qbuf` and transposed per
    /// strip into `qt` (by the instruction set's `transpose`), O zeroed, each padded row's
    /// running max -inf and sum 0; returns the aligned buffers, sized for `kt` keys a tile.
    ///
    /// # Safety
    /// The CPU runs `transpose` (the gemm's `transpose_into` of the caller's instruction set).
    unsafe fn start(
        &self,
        g: &Geometry<'_>,
        s: &mut Scratch,
        kt: usize,
        transpose: unsafe fn(&[f32], usize, usize, usize, usize, &mut [f32]),
    ) -> Bufs {
        let (d, rp) = (self.d, self.rp);
        s.qbuf.clear();
        s.qbuf.resize(rp * d, 0.0);
        for r in 0..self.rows {
            let src = &g.q[self.q_row(r)..][..d];
            for (o, &x) in s.qbuf[r * d..(r + 1) * d].iter_mut().zip(src) {
                *o = x * g.scale;
            }
        }
        let qt = crate::gemm::aligned(&mut s.qt, self.strips * d * NR);
        for st in 0..self.strips {
            let live = NR.min(self.rows - st * NR);
            let dst = &mut qt[st * d * NR..(st + 1) * d * NR];
            // SAFETY: the caller says the CPU runs `transpose`; `qbuf` holds whole strips of
            // d-long rows and `dst` one strip's d x NR.
            unsafe { transpose(&s.qbuf[st * NR * d..], d, 0, live, d, dst) };
        }
        s.o.clear();
        s.o.resize(rp * d, 0.0);
        let m = crate::gemm::aligned(&mut s.m, rp);
        m.fill(f32::NEG_INFINITY);
        let l = crate::gemm::aligned(&mut s.l, rp);
        l.fill(0.0);
        Bufs {
            qt: qt.as_ptr(),
            m: m.as_mut_ptr(),
            l: l.as_mut_ptr(),
            alpha: crate::gemm::aligned(&mut s.alpha, rp).as_mut_ptr(),
            scores: crate::gemm::aligned(&mut s.s, kt * self.rp).as_mut_ptr(),
        }
    }
}

/// The aligned scratch an item works in (pointers into its `Scratch`, valid while that is not
/// resized): transposed queries, per padded row the running max, sum and this tile's rescale,
/// and the transposed scores [kt][rp].
#[cfg(target_arch = "x86_64")]
struct Bufs {
    qt: *const f32,
    m: *mut f32,
    l: *mut f32,
    alpha: *mut f32,
    scores: *mut f32,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Block, Bufs, Geometry, Item, Scratch, KT, MR, NR};
    use crate::gemm::avx512::{tile, transpose_into};
    use crate::kv::F32;
    use crate::paged::avx512::pv_rows;
    use crate::simd::x86::softmax_column;

    /// One item with head_dim = 16 * DV.
    #[target_feature(enable = "avx512f,fma,avx2,f16c")]
    pub(super) unsafe fn item<const DV: usize>(
        g: &Geometry<'_>,
        it: &Item,
        s: &mut Scratch,
        out: *mut f32,
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let d = 16 * DV;
            let b = Block::new(g, it, d);
            let (rows, strips, rp) = (b.rows, b.strips, b.rp);
            let (group, first_pos, kend) = (b.group, b.first_pos, b.kend);
            let q_row = |r: usize| b.q_row(r);
            let Bufs {
                qt,
                m,
                l,
                alpha,
                scores: st_buf,
            } = b.start(g, s, KT, transpose_into);
            let kp = g.kp.as_ptr().add(g.kp_at[it.seq * g.kv_heads + it.head]);
            let slots = &g.slots[it.k0..];
            // Per 16-row column: each row's position (-1 past the last row: sees nothing).
            let pos: Vec<__m512i> = (0..rp / 16)
                .map(|c| {
                    let mut p = [-1i32; 16];
                    for (i, p) in p.iter_mut().enumerate() {
                        let r = c * 16 + i;
                        if r < rows {
                            *p = (first_pos + r / group) as i32;
                        }
                    }
                    _mm512_loadu_si512(p.as_ptr().cast())
                })
                .collect();
            let mut vptr = [std::ptr::null::<u8>(); KT];
            for t0 in (0..kend).step_by(KT) {
                let kn = KT.min(kend - t0);
                for (t, v) in vptr.iter_mut().enumerate().take(kn) {
                    let at = (slots[t0 + t] as usize * g.kv_heads + it.head) * d;
                    *v = g.v.as_ptr().add(at).cast();
                }
                // S^T [kn][rp]: 12 keys x 32 rows per register tile.
                for k0 in (0..kn).step_by(MR) {
                    let xk = kp.add((t0 + k0) * d);
                    for st in 0..strips {
                        tile(
                            MR.min(kn - k0),
                            xk,
                            qt.add(st * d * NR),
                            d,
                            st_buf.add(k0 * rp + st * NR),
                            rp,
                            NR,
                            false,
                        );
                    }
                }
                // Online softmax down each column of 16 rows (a row at position p sees keys
                // below p + 1).
                for (c, &pos) in pos.iter().enumerate() {
                    let limit = _mm512_add_epi32(pos, _mm512_set1_epi32(1));
                    let (m, l, a) = (m.add(c * 16), l.add(c * 16), alpha.add(c * 16));
                    softmax_column(st_buf.add(c * 16), rp, (t0, kn), limit, m, l, a);
                }
                // O = O * alpha + P V (the paged AVX-512 item's V pass; V rows are f32 here).
                let o = s.o.as_mut_ptr();
                pv_rows::<{ F32 }, DV>(st_buf, (rp, 1), &vptr[..kn], o, alpha, rows);
            }
            for r in 0..rows {
                let inv = _mm512_set1_ps(1.0 / *l.add(r));
                let dst = out.add(q_row(r));
                for c in 0..DV {
                    let x = _mm512_loadu_ps(s.o.as_ptr().add(r * d + 16 * c));
                    _mm512_storeu_ps(dst.add(16 * c), _mm512_mul_ps(x, inv));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Block, Bufs, Geometry, Item, Scratch, KT_AVX2 as KT, MR_AVX2 as MR, NR};
    use crate::gemm::avx2::{tile, transpose_into};
    use crate::simd::x86::exp8;

    /// Rows per P V register block: 6 rows x 16 columns in 12 accumulators, two V registers
    /// and a broadcast (15 of the 16 ymm registers).
    const PV_ROWS: usize = 6;

    /// `O[r][c0 .. c0 + 16] = O[r][..] * alpha[r] + sum_t P[t][r] V[t][c0 .. c0 + 16]` for `R`
    /// rows (O rows of `ldo` floats); P is [t][ldp] (transposed scores).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pv<const R: usize>(
        p: *const f32,
        ldp: usize,
        v: &[*const f32; KT],
        kn: usize,
        c0: usize,
        o: *mut f32,
        ldo: usize,
        alpha: *const f32,
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for (t, &vt) in v.iter().enumerate().take(kn) {
                let v0 = _mm256_loadu_ps(vt.add(c0));
                let v1 = _mm256_loadu_ps(vt.add(c0 + 8));
                let pt = p.add(t * ldp);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pr = _mm256_broadcast_ss(&*pt.add(r));
                    acc[0] = _mm256_fmadd_ps(pr, v0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(pr, v1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let a = _mm256_broadcast_ss(&*alpha.add(r));
                let orow = o.add(r * ldo + c0);
                let old0 = _mm256_loadu_ps(orow);
                let old1 = _mm256_loadu_ps(orow.add(8));
                _mm256_storeu_ps(orow, _mm256_fmadd_ps(old0, a, acc[0]));
                _mm256_storeu_ps(orow.add(8), _mm256_fmadd_ps(old1, a, acc[1]));
            }
        }
    }

    /// One item with head_dim = 16 * DV (the AVX-512 item's computation in 8 lanes).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn item<const DV: usize>(
        g: &Geometry<'_>,
        it: &Item,
        s: &mut Scratch,
        out: *mut f32,
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let d = 16 * DV;
            let b = Block::new(g, it, d);
            let (rows, strips, rp) = (b.rows, b.strips, b.rp);
            let (group, first_pos, kend) = (b.group, b.first_pos, b.kend);
            let q_row = |r: usize| b.q_row(r);
            let Bufs {
                qt,
                m,
                l,
                alpha,
                scores: st_buf,
            } = b.start(g, s, KT, transpose_into);
            let kp = g.kp.as_ptr().add(g.kp_at[it.seq * g.kv_heads + it.head]);
            let slots = &g.slots[it.k0..];
            // Per 8-row column: each row's position (-1 past the last row: sees nothing).
            let pos: Vec<__m256i> = (0..rp / 8)
                .map(|c| {
                    let mut p = [-1i32; 8];
                    for (i, p) in p.iter_mut().enumerate() {
                        let r = c * 8 + i;
                        if r < rows {
                            *p = (first_pos + r / group) as i32;
                        }
                    }
                    _mm256_loadu_si256(p.as_ptr().cast())
                })
                .collect();
            let mut vptr = [std::ptr::null::<f32>(); KT];
            for t0 in (0..kend).step_by(KT) {
                let kn = KT.min(kend - t0);
                for (t, v) in vptr.iter_mut().enumerate().take(kn) {
                    *v =
                        g.v.as_ptr()
                            .add((slots[t0 + t] as usize * g.kv_heads + it.head) * d);
                }
                // S^T [kn][rp]: 6 keys x 32 rows per register tile.
                for k0 in (0..kn).step_by(MR) {
                    let xk = kp.add((t0 + k0) * d);
                    for st in 0..strips {
                        tile(
                            MR.min(kn - k0),
                            xk,
                            qt.add(st * d * NR),
                            d,
                            st_buf.add(k0 * rp + st * NR),
                            rp,
                            NR,
                            false,
                        );
                    }
                }
                // Online softmax down each column of 8 rows; key t is visible to a row when
                // its position is >= t, i.e. > t - 1.
                let one = _mm256_set1_ps(1.0);
                for (c, &pos) in pos.iter().enumerate() {
                    let col = st_buf.add(c * 8);
                    let vis = |t: usize| {
                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                            pos,
                            _mm256_set1_epi32((t0 + t) as i32 - 1),
                        ))
                    };
                    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
                    for t in 0..kn {
                        let x = _mm256_loadu_ps(col.add(t * rp));
                        mx = _mm256_blendv_ps(mx, _mm256_max_ps(mx, x), vis(t));
                    }
                    let m_old = _mm256_loadu_ps(m.add(c * 8));
                    let m_new = _mm256_max_ps(m_old, mx);
                    let mut sum = _mm256_setzero_ps();
                    for t in 0..kn {
                        let x = _mm256_sub_ps(_mm256_loadu_ps(col.add(t * rp)), m_new);
                        let p = _mm256_and_ps(exp8(x), vis(t));
                        _mm256_storeu_ps(col.add(t * rp), p);
                        sum = _mm256_add_ps(sum, p);
                    }
                    // e^(m - m'): ~0 on a row's first visible tile (m = -inf; exp8 clamps to
                    // e^-87, and O and l are 0 there), 1 where this tile had nothing visible
                    // (which also covers -inf - -inf on rows that see nothing).
                    let a = exp8(_mm256_sub_ps(m_old, m_new));
                    let a = _mm256_blendv_ps(a, one, _mm256_cmp_ps::<_CMP_EQ_OQ>(m_old, m_new));
                    _mm256_storeu_ps(alpha.add(c * 8), a);
                    let l_old = _mm256_loadu_ps(l.add(c * 8));
                    _mm256_storeu_ps(l.add(c * 8), _mm256_fmadd_ps(l_old, a, sum));
                    _mm256_storeu_ps(m.add(c * 8), m_new);
                }
                let mut r0 = 0;
                while r0 < rows {
                    let n = PV_ROWS.min(rows - r0);
                    let (p, o, a) = (st_buf.add(r0), s.o.as_mut_ptr().add(r0 * d), alpha.add(r0));
                    for c0 in (0..d).step_by(16) {
                        match n {
                            6 => pv::<6>(p, rp, &vptr, kn, c0, o, d, a),
                            5 => pv::<5>(p, rp, &vptr, kn, c0, o, d, a),
                            4 => pv::<4>(p, rp, &vptr, kn, c0, o, d, a),
                            3 => pv::<3>(p, rp, &vptr, kn, c0, o, d, a),
                            2 => pv::<2>(p, rp, &vptr, kn, c0, o, d, a),
                            _ => pv::<1>(p, rp, &vptr, kn, c0, o, d, a),
                        }
                    }
                    r0 += n;
                }
            }
            for r in 0..rows {
                let inv = _mm256_set1_ps(1.0 / *l.add(r));
                let dst = out.add(q_row(r));
                for c in 0..2 * DV {
                    let x = _mm256_loadu_ps(s.o.as_ptr().add(r * d + 8 * c));
                    _mm256_storeu_ps(dst.add(8 * c), _mm256_mul_ps(x, inv));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{reference, testing};
    use crate::Isa;

    /// The kernels this CPU runs (each test checks every one of them).
    fn kernels() -> Vec<Isa> {
        [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&l| Isa::test_has(l))
            .collect()
    }

    /// Every kernel and supported head size against the f64 reference: several sequences,
    /// chunks that start after cached keys, lengths that are not multiples of the item (32)
    /// or of either kernel's tile (56, 48), one token, grouped heads; f16 pools.
    #[test]
    fn matches_reference() {
        let seqs: &[(usize, usize)] = &[(45, 0), (1, 7), (70, 61), (3, 0), (33, 100)];
        for isa in kernels() {
            for (i, d) in [16, 32, 64, 128].into_iter().enumerate() {
                let (nh, kvh) = (6, 2);
                let c = testing::case(seqs, nh, kvh, d, 40 + i as u64);
                let sh = Shape {
                    num_heads: nh,
                    num_kv_heads: kvh,
                    head_dim: d,
                    scale: 1.0 / (d as f32).sqrt(),
                };
                let b = c.batch();
                let want = reference(&c.q, &c.k, &c.v, &b, &sh).unwrap();
                let got = attention_isa(&c.q, &c.k, &c.v, &b, &sh, isa).unwrap();
                testing::assert_close(&got, &want, 1e-5, &format!("flash {isa:?} d={d}"));
            }
        }
        // f16 pools (this CPU's kernel): widened to f32 first, so equal to the reference on
        // the rounded values.
        if kernels().is_empty() {
            return;
        }
        let (nh, kvh, d) = (6, 2, 64);
        let c = testing::case(seqs, nh, kvh, d, 7);
        let sh = Shape {
            num_heads: nh,
            num_kv_heads: kvh,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let b = c.batch();
        let kh: Vec<half::f16> = c.k.iter().map(|&x| half::f16::from_f32(x)).collect();
        let vh: Vec<half::f16> = c.v.iter().map(|&x| half::f16::from_f32(x)).collect();
        let kw: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
        let vw: Vec<f32> = vh.iter().map(|x| x.to_f32()).collect();
        let want = reference(&c.q, &kw, &vw, &b, &sh).unwrap();
        let got = attention(&c.q, KvPool::F16(&kh), KvPool::F16(&vh), &b, &sh).unwrap();
        testing::assert_close(&got, &want, 1e-5, "flash f16 pools");
    }

    #[test]
    fn refuses_head_sizes_it_has_no_kernel_for() {
        let c = testing::case(&[(2, 0)], 2, 1, 24, 1);
        let sh = Shape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 24,
            scale: 1.0,
        };
        assert!(attention(&c.q, KvPool::F32(&c.k), KvPool::F32(&c.v), &c.batch(), &sh).is_err());
    }
}
