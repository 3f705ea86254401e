//! The AVX-512 item: one run of a sequence's query tokens over a range of its keys, for every
//! KV head at once. A slot's K (and V) rows of all heads lie side by side in the pool, so an
//! item that walks the slots once for all heads streams whole rows; one item per head read a
//! third of each row and left the prefetchers to fetch the rest (the step's attention at 2,048
//! tokens of context was twice as slow out of cache as in it: `attention_30_layers` in
//! `benches/kernels.rs`).
//!
//! Per tile of [`KT`] keys and per KV head: scores with the query rows on the lanes (Q^T packed
//! once per item, scaled; each key's elements broadcast from its pool row, so no key is packed
//! or transposed), an online softmax down each 16-row column (no horizontal reductions), then
//! `O = O * alpha + P V` with V rows loaded once per tile for up to 6 rows at a time. The
//! tile's K and V rows are read from memory once and again from L1/L2.

// Register tiles are indexed [row][lane group] in several arrays at once; index loops say so
// more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{Partial, Pools, Work};
use crate::gemm::{aligned, Line};
use crate::kv::{x86::load16, F32};
use crate::simd::x86::{exp16, softmax_column};

/// Keys per tile: scores, softmax and the V pass of a tile run before the next.
const KT: usize = 32;
/// Keys per score register tile (one broadcast pointer each).
const KB: usize = 8;

/// At most this many rows per head (4 tokens of a group of 3: decode steps, short aLoRA tails)
/// take the narrow scores: head_dim on the lanes, each key's products summed across lanes by a
/// transpose tree, so the softmax runs on 16 keys per register. With more rows, the query rows
/// go on the lanes (no sums across lanes; a decode step there used 3 of 16 lanes).
const NARROW_ROWS: usize = 12;

/// Query rows per narrow score tile (the rows and their accumulators in registers).
const fn narrow_rows(dv: usize) -> usize {
    let r = 12 / dv;
    if r > 4 {
        4
    } else if r < 1 {
        1
    } else {
        r
    }
}

/// Per 128-bit lane: (a0 + a2, b0 + b2, a1 + a3, b1 + b3).
#[inline]
#[target_feature(enable = "avx512f")]
fn pair(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
}

/// Per 128-bit lane, from `pair(a, b)` and `pair(c, d)`: the lane's sums of a, b, c and d.
#[inline]
#[target_feature(enable = "avx512f")]
fn quad(ab: __m512, cd: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
        _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
    )
}

/// 128-bit lanes (x0 + x1, x2 + x3, y0 + y1, y2 + y3): twice over, four `quad`s become the
/// sums of their 16 vectors in order.
#[inline]
#[target_feature(enable = "avx512f")]
fn halves(x: __m512, y: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
    )
}

/// `s[r][t] = q_r . K_t` for 16 keys `k` (f32 rows of head_dim 16 DV) and `R` scaled query
/// rows.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores16<const R: usize, const DV: usize>(
    q: [*const f32; R],
    k: &[*const f32; 16],
    s: [*mut f32; R],
) {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        let mut qr = [[_mm512_setzero_ps(); DV]; R];
        for (r, qr) in qr.iter_mut().enumerate() {
            for (c, x) in qr.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(q[r].add(16 * c));
            }
        }
        let mut hold = [_mm512_setzero_ps(); R];
        let mut half = [[_mm512_setzero_ps(); 2]; R];
        for kb in 0..4 {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for i in 0..4 {
                let kp = k[kb * 4 + i];
                for c in 0..DV {
                    let kc = _mm512_loadu_ps(kp.add(16 * c));
                    for r in 0..R {
                        acc[r][i] = _mm512_fmadd_ps(qr[r][c], kc, acc[r][i]);
                    }
                }
            }
            for r in 0..R {
                let v = quad(pair(acc[r][0], acc[r][1]), pair(acc[r][2], acc[r][3]));
                if kb % 2 == 0 {
                    hold[r] = v;
                } else {
                    half[r][kb / 2] = halves(hold[r], v);
                }
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(s[r], halves(half[r][0], half[r][1]));
        }
    }
}

/// Bytes of one element of the pools' type `E`.
const fn esize<const E: u8>() -> usize {
    if E == F32 {
        4
    } else {
        2
    }
}

/// Whether the AVX-512 item has code for this head size (16 floats per register, `pv`'s
/// register tile up to 8 of them).
pub(super) fn supports(head_dim: usize) -> bool {
    matches!(head_dim, 16 | 32 | 64 | 128)
}

/// `S[i][0 .. 16 NB] = sum_c K_i[c] Q^T[c][..]` for the [`KB`] keys `k` (f32 rows of `d`), the
/// rows of Q^T being `rp` floats apart (64-byte aligned); `S` rows `rp` apart.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn scores<const NB: usize>(
    k: &[*const f32; KB],
    qt: *const f32,
    rp: usize,
    d: usize,
    s: *mut f32,
) {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NB]; KB];
        for c in 0..d {
            let mut qv = [_mm512_setzero_ps(); NB];
            for (b, qv) in qv.iter_mut().enumerate() {
                *qv = _mm512_load_ps(qt.add(c * rp + 16 * b));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let kb = _mm512_set1_ps(*k[i].add(c));
                for b in 0..NB {
                    acc[b] = _mm512_fmadd_ps(kb, qv[b], acc[b]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (b, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(s.add(i * rp + 16 * b), *acc);
            }
        }
    }
}

/// `O[r] = O[r] * alpha[r] + sum_t P(t, r) V_t` for `R` rows of head_dim `16 DV`, with P(t, r) at
/// `p[t * pt + r * pr]`, `v` the tile's V rows (type `E`).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn pv<const E: u8, const R: usize, const DV: usize>(
    p: *const f32,
    (pt, pr): (usize, usize),
    v: &[*const u8],
    o: *mut f32,
    alpha: *const f32,
) {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // every pointer and index stays inside the buffers the caller passed, as it says at the call).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); DV]; R];
        for (t, &vt) in v.iter().enumerate() {
            let mut vr = [_mm512_setzero_ps(); DV];
            for (c, vr) in vr.iter_mut().enumerate() {
                *vr = load16::<E>(vt.add(16 * c * esize::<E>()));
            }
            let p = p.add(t * pt);
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*p.add(r * pr));
                for c in 0..DV {
                    acc[c] = _mm512_fmadd_ps(w, vr[c], acc[c]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let a = _mm512_set1_ps(*alpha.add(r));
            let orow = o.add(r * DV * 16);
            for (c, acc) in acc.iter().enumerate() {
                let old = _mm512_loadu_ps(orow.add(16 * c));
                _mm512_storeu_ps(orow.add(16 * c), _mm512_fmadd_ps(old, a, *acc));
            }
        }
    }
}

/// The V pass of one head's tile for `rows` rows, in register tiles of up to 6 rows (24 / DV).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn pv_rows<const E: u8, const DV: usize>(
    s: *const f32,
    (pt, pr): (usize, usize),
    v: &[*const u8],
    o: *mut f32,
    alpha: *const f32,
    rows: usize,
) {
    // SAFETY: as for `pv`, row by row.
    unsafe {
        let per = (24 / DV).clamp(1, 6);
        let mut r0 = 0;
        while r0 < rows {
            let n = per.min(rows - r0);
            let (p, o, a) = (s.add(r0 * pr), o.add(r0 * 16 * DV), alpha.add(r0));
            let st = (pt, pr);
            match n {
                6 => pv::<E, 6, DV>(p, st, v, o, a),
                5 => pv::<E, 5, DV>(p, st, v, o, a),
                4 => pv::<E, 4, DV>(p, st, v, o, a),
                3 => pv::<E, 3, DV>(p, st, v, o, a),
                2 => pv::<E, 2, DV>(p, st, v, o, a),
                _ => pv::<E, 1, DV>(p, st, v, o, a),
            }
            r0 += n;
        }
    }
}

/// Reusable buffers of one item (64-byte aligned).
#[derive(Default)]
struct Scratch {
    qt: Vec<Line>,
    s: Vec<Line>,
    m: Vec<Line>,
    l: Vec<Line>,
    alpha: Vec<Line>,
    k: Vec<Line>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Item `w` (all KV heads, keys `keys` = the part's slots) for queries `q` [tokens, nh, d].
/// Rows of the result are (head, token, head in group).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn item<const E: u8>(
    q: &[f32],
    nh: usize,
    w: &Work,
    keys: &[u32],
    pools: &Pools<'_>,
) -> Partial {
    SCRATCH.with_borrow_mut(|s| {
        // SAFETY: as this function's contract says; `item_in` checks nothing more.
        unsafe {
            match pools.head_dim {
                16 => item_in::<E, 1>(q, nh, w, keys, pools, s),
                32 => item_in::<E, 2>(q, nh, w, keys, pools, s),
                64 => item_in::<E, 4>(q, nh, w, keys, pools, s),
                _ => item_in::<E, 8>(q, nh, w, keys, pools, s),
            }
        }
    })
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn item_in<const E: u8, const DV: usize>(
    q: &[f32],
    nh: usize,
    w: &Work,
    keys: &[u32],
    pools: &Pools<'_>,
    scr: &mut Scratch,
) -> Partial {
    // SAFETY: the caller upholds this function's contract (the CPU has its target features;
    // `AttnBatch::check_lens` put every slot inside the pools and every query row inside `q`).
    unsafe {
        let d = 16 * DV;
        let heads = w.heads;
        let group = nh / pools.kv_heads;
        let rows = w.nq * group;
        let rp = rows.div_ceil(16) * 16;
        let cols = rp / 16;
        let narrow = rows <= NARROW_ROWS;
        // Narrow: the scaled query rows, [head][row][d]. Wide: Q^T per head, scaled, zero past
        // the live rows, [head][c][rp].
        let qt = aligned(&mut scr.qt, heads * d * rp);
        if !narrow {
            qt.fill(0.0);
        }
        for hh in 0..heads {
            for r in 0..rows {
                let head = (w.head + hh) * group + r % group;
                let src = &q[((w.qo + r / group) * nh + head) * d..][..d];
                for (c, &x) in src.iter().enumerate() {
                    let at = if narrow {
                        (hh * rows + r) * d + c
                    } else {
                        (hh * d + c) * rp + r
                    };
                    qt[at] = x * pools.scale;
                }
            }
        }
        // Each row's visible keys of this part; 0 for the padding rows.
        let visible = |r: usize| -> usize {
            if r >= rows {
                return 0;
            }
            let sees = (w.start + r / group + 1).min(w.seq_keys);
            sees.saturating_sub(w.k0).min(w.nk)
        };
        let vis: Vec<__m512i> = (0..cols)
            .map(|c| {
                let v: [i32; 16] = std::array::from_fn(|i| visible(c * 16 + i) as i32);
                _mm512_loadu_si512(v.as_ptr().cast())
            })
            .collect();
        let kend = (0..rows).map(visible).max().unwrap_or(0);
        let m = aligned(&mut scr.m, heads * rp);
        m.fill(f32::NEG_INFINITY);
        let l = aligned(&mut scr.l, heads * rp);
        l.fill(0.0);
        let alpha = aligned(&mut scr.alpha, rp).as_mut_ptr();
        let st = aligned(&mut scr.s, KT * rp).as_mut_ptr();
        let kconv = aligned(&mut scr.k, KT * d).as_mut_ptr();
        let mut out = vec![0f32; heads * rows * d];
        let (m, l) = (m.as_mut_ptr(), l.as_mut_ptr());
        let qt = qt.as_ptr();
        let mut kp = [std::ptr::null::<f32>(); KT];
        let mut vp = [std::ptr::null::<u8>(); KT];
        // A slot's K (or V) rows of every head, in bytes, side by side in the pool.
        let slot_bytes = pools.kv_heads * d * esize::<E>();
        for t0 in (0..kend).step_by(KT) {
            let kn = KT.min(kend - t0);
            // The next tile's K and V rows into L2 while this one computes: the heads' rows
            // of a slot are read one after another, a stride the prefetchers follow late.
            for &slot in keys.get(t0 + KT..kend.min(t0 + 2 * KT)).unwrap_or(&[]) {
                let (kr, vr) = (pools.k_ptr(slot, 0), pools.v_ptr(slot, 0));
                for off in (0..slot_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(kr.add(off).cast());
                    _mm_prefetch::<_MM_HINT_T1>(vr.add(off).cast());
                }
            }
            for hh in 0..heads {
                let h = w.head + hh;
                for t in 0..kn {
                    let slot = keys[t0 + t];
                    kp[t] = if E == F32 {
                        pools.k_ptr(slot, h).cast()
                    } else {
                        // Widened once into the tile's scratch: the score tile broadcasts
                        // single elements.
                        let src = pools.k_ptr(slot, h);
                        let dst = kconv.add(t * d);
                        for c in 0..DV {
                            let x = load16::<E>(src.add(16 * c * esize::<E>()));
                            _mm512_storeu_ps(dst.add(16 * c), x);
                        }
                        dst
                    };
                    vp[t] = pools.v_ptr(slot, h);
                }
                // Past the tile's last key, score tiles read key 0 again (masked below).
                let tile = if narrow { 16 } else { KB };
                for t in kn..kn.div_ceil(tile) * tile {
                    kp[t] = kp[0];
                }
                let (mh, lh) = (m.add(hh * rp), l.add(hh * rp));
                let o = out.as_mut_ptr().add(hh * rows * d);
                if narrow {
                    // S [row][KT], then each row's online softmax over the tile's lanes.
                    let per = narrow_rows(DV);
                    for tb in (0..kn).step_by(16) {
                        let ks: &[*const f32; 16] = kp[tb..tb + 16].try_into().expect("16 keys");
                        let mut r0 = 0;
                        while r0 < rows {
                            let n = per.min(rows - r0);
                            let qr = |i: usize| qt.add((hh * rows + r0 + i.min(n - 1)) * d);
                            let sr = |i: usize| st.add((r0 + i.min(n - 1)) * KT + tb);
                            match n {
                                4 => scores16::<4, DV>(
                                    [0, 1, 2, 3].map(qr),
                                    ks,
                                    [0, 1, 2, 3].map(sr),
                                ),
                                3 => scores16::<3, DV>([0, 1, 2].map(qr), ks, [0, 1, 2].map(sr)),
                                2 => scores16::<2, DV>([0, 1].map(qr), ks, [0, 1].map(sr)),
                                _ => scores16::<1, DV>([qr(0)], ks, [sr(0)]),
                            }
                            r0 += n;
                        }
                    }
                    let lanes =
                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                    for r in 0..rows {
                        let row = st.add(r * KT);
                        let left = _mm512_set1_epi32(visible(r) as i32 - t0 as i32);
                        let sees = |j: usize| {
                            let t = _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * j as i32));
                            _mm512_cmplt_epi32_mask(t, left)
                        };
                        let nv = kn.div_ceil(16);
                        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
                        for j in 0..nv {
                            let x = _mm512_loadu_ps(row.add(16 * j));
                            mx = _mm512_mask_max_ps(mx, sees(j), mx, x);
                        }
                        let m_old = *mh.add(r);
                        let m_new = m_old.max(_mm512_reduce_max_ps(mx));
                        let mut sum = _mm512_setzero_ps();
                        let mv = _mm512_set1_ps(m_new);
                        for j in 0..nv {
                            // Nothing seen yet (m' = -inf): every lane is masked to 0.
                            let x = _mm512_sub_ps(_mm512_loadu_ps(row.add(16 * j)), mv);
                            let p = _mm512_maskz_mov_ps(sees(j), exp16(x));
                            _mm512_storeu_ps(row.add(16 * j), p);
                            sum = _mm512_add_ps(sum, p);
                        }
                        let a = if m_old == m_new {
                            1.0
                        } else {
                            (m_old - m_new).exp()
                        };
                        *alpha.add(r) = a;
                        *lh.add(r) = *lh.add(r) * a + _mm512_reduce_add_ps(sum);
                        *mh.add(r) = m_new;
                    }
                    pv_rows::<E, DV>(st, (1, KT), &vp[..kn], o, alpha, rows);
                    continue;
                }
                // S^T [t][rp].
                let qth = qt.add(hh * d * rp);
                for tb in (0..kn).step_by(KB) {
                    let ks: &[*const f32; KB] = kp[tb..tb + KB].try_into().expect("KB keys");
                    let mut c = 0;
                    while c < cols {
                        let dst = st.add(tb * rp + 16 * c);
                        if c + 2 <= cols {
                            scores::<2>(ks, qth.add(16 * c), rp, d, dst);
                            c += 2;
                        } else {
                            scores::<1>(ks, qth.add(16 * c), rp, d, dst);
                            c += 1;
                        }
                    }
                }
                // Online softmax down each column of 16 rows.
                for (c, &vis) in vis.iter().enumerate() {
                    let (m, l, a) = (mh.add(c * 16), lh.add(c * 16), alpha.add(c * 16));
                    softmax_column(st.add(c * 16), rp, (t0, kn), vis, m, l, a);
                }
                pv_rows::<E, DV>(st, (rp, 1), &vp[..kn], o, alpha, rows);
            }
        }
        let take = |x: *const f32| -> Vec<f32> {
            (0..heads)
                .flat_map(|hh| std::slice::from_raw_parts(x.add(hh * rp), rows).to_vec())
                .collect()
        };
        Partial {
            out,
            max: take(m),
            sum: take(l),
        }
    }
}
