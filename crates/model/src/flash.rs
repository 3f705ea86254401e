//! Causal attention for prefill chunks on AVX-512 CPUs, flash-style: K and V are read where
//! they live in the [`KvStore`] pools through each sequence's slots, in tiles of 32 keys, and
//! the softmax is computed online (running max and sum per query row), so no score matrix
//! over the whole context is built and no key past a row's position is computed.
//!
//! Work items are (sequence, KV head, a block of 32 query positions); an item's rows are its
//! positions times the query heads sharing the KV head. Per key tile:
//!
//! ```text
//!   Kt [d][32]  <- the tile's K rows, transposed (the gemm's packing)
//!   S [rows][32] = Q_scaled Kt            the gemm's 12 x 32 register tile, k = head_dim
//!   per row: mask keys past its position, m' = max(m, max S), P = e^(S - m'),
//!            l = l e^(m - m') + sum P,   O *= e^(m - m')
//!   O [rows][d] += P V                    6 rows x head_dim in registers, V rows in place
//! ```
//!
//! and at the end O / l. The matmul path in `model.rs` (what every other device and dtype
//! runs) is its reference in the tests. Decode-like steps use `paged.rs` instead, which splits
//! few query rows over the threads differently.
//!
//! [`KvStore`]: crate::kv::KvStore

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::batch::Prepared;
use crate::cpu::with_f32;
use crate::error::Result;
use crate::paged::Shape;

/// Query positions per work item.
const QB: usize = 32;
/// Keys per tile (one strip of the gemm's register tile).
const KT: usize = 32;
/// Query rows per score register tile (the gemm's MR).
const MR: usize = crate::gemm::MR;

/// Whether this CPU and head size run the kernel.
pub(crate) fn available(head_dim: usize) -> bool {
    crate::gemm::available() && matches!(head_dim, 16 | 32 | 64 | 128)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every item writes its own (token, head) rows of the output; see `attention`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, which is `Send`).
    fn get(self) -> *mut f32 {
        self.0
    }
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
    /// Position of the sequence's first new token.
    start: usize,
    head: usize,
}

/// `q`: [tokens, heads, head_dim] (RoPE applied), the pools [slots, kv_heads, head_dim] of one
/// layer; returns [tokens, heads, head_dim] f32. Panics unless [`available`] for the head size.
pub(crate) fn attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    prep: &Prepared,
    sh: &Shape,
) -> Result<Tensor> {
    let (nh, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
    assert!(
        available(d),
        "flash attention: needs AVX-512 and head_dim 16, 32, 64 or 128"
    );
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let n = prep.num_tokens;
    let mut items = Vec::new();
    let (mut qo, mut ko) = (0, 0);
    for (i, (&nq, &nk)) in prep.seqlens_q.iter().zip(&prep.seqlens_k).enumerate() {
        for head in 0..kvh {
            for j0 in (0..nq).step_by(QB) {
                items.push(Item {
                    q0: qo,
                    j0,
                    len: QB.min(nq - j0),
                    k0: ko,
                    start: prep.start_pos[i],
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
    let slots = &prep.gather_slots_host;
    with_f32(&q, |qd| {
        with_f32(k_pool, |kd| {
            with_f32(v_pool, |vd| {
                let geo = Geometry {
                    q: qd,
                    k: kd,
                    v: vd,
                    slots,
                    heads: nh,
                    kv_heads: kvh,
                    scale: sh.scale,
                };
                items.par_iter().for_each_init(Scratch::default, |s, it| {
                    // SAFETY: `available(d)` was asserted; `Prepared` built the slots
                    // inside the pools; item rows (token, head) are disjoint.
                    unsafe {
                        match d {
                            16 => avx512::item::<1>(&geo, it, s, dst.get()),
                            32 => avx512::item::<2>(&geo, it, s, dst.get()),
                            64 => avx512::item::<4>(&geo, it, s, dst.get()),
                            _ => avx512::item::<8>(&geo, it, s, dst.get()),
                        }
                    }
                })
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (n, nh, d), &Device::Cpu)?)
}

/// What every item reads.
struct Geometry<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    slots: &'a [u32],
    heads: usize,
    kv_heads: usize,
    scale: f32,
}

/// Per-thread buffers, reused across items.
#[derive(Default)]
struct Scratch {
    /// Scaled queries, per tile of MR rows [d][MR].
    qp: Vec<f32>,
    /// The key tile's rows [32][d], then transposed [d][32].
    kbuf: Vec<f32>,
    kt: Vec<crate::gemm::Line>,
    /// Scores, then probabilities [rows][32].
    s: Vec<f32>,
    /// Output accumulators [rows][d], running max and sum, this tile's rescale factor.
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Geometry, Item, Scratch, KT, MR};
    use crate::cpu::x86::exp16;
    use crate::gemm::avx512::{tile, transpose_into};

    /// `O[r] = O[r] * alpha[r] + sum_t P[r][t] V[t]` for `R` rows, `DV` registers of head_dim.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn pv<const R: usize, const DV: usize>(
        p: *const f32,
        v: &[*const f32; KT],
        kn: usize,
        o: *mut f32,
        alpha: *const f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); DV]; R];
        for (t, &vt) in v.iter().enumerate().take(kn) {
            let mut vr = [_mm512_setzero_ps(); DV];
            for (c, vr) in vr.iter_mut().enumerate() {
                *vr = _mm512_loadu_ps(vt.add(16 * c));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let pr = _mm512_set1_ps(*p.add(r * KT + t));
                for c in 0..DV {
                    acc[c] = _mm512_fmadd_ps(pr, vr[c], acc[c]);
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

    /// One item with head_dim = 16 * DV.
    #[target_feature(enable = "avx512f,fma,avx2,f16c")]
    pub(super) unsafe fn item<const DV: usize>(
        g: &Geometry<'_>,
        it: &Item,
        s: &mut Scratch,
        out: *mut f32,
    ) {
        let d = 16 * DV;
        let group = g.heads / g.kv_heads;
        let rows = it.len * group;
        let tiles = rows.div_ceil(MR);
        // Row r is position j0 + r / group of the block, query head head * group + r % group.
        let q_row = |r: usize| {
            let tok = it.q0 + it.j0 + r / group;
            (tok * g.heads + it.head * group + r % group) * d
        };
        s.qp.clear();
        s.qp.resize(tiles * d * MR, 0.0);
        for r in 0..rows {
            let (tl, i) = (r / MR, r % MR);
            let q = &g.q[q_row(r)..][..d];
            for (c, &x) in q.iter().enumerate() {
                s.qp[(tl * d + c) * MR + i] = x * g.scale;
            }
        }
        s.o.clear();
        s.o.resize(rows * d, 0.0);
        s.m.clear();
        s.m.resize(rows, f32::NEG_INFINITY);
        s.l.clear();
        s.l.resize(rows, 0.0);
        s.alpha.resize(rows, 1.0);
        s.s.resize(rows * KT, 0.0);
        s.kbuf.resize(KT * d, 0.0);
        let slots = &g.slots[it.k0..];
        let first_pos = it.start + it.j0;
        // Keys the block's last row sees.
        let kend = first_pos + it.len;
        let kv_row = |slot: u32| (slot as usize * g.kv_heads + it.head) * d;
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut vptr = [std::ptr::null::<f32>(); KT];
        for t0 in (0..kend).step_by(KT) {
            let kn = KT.min(kend - t0);
            for t in 0..kn {
                let at = kv_row(slots[t0 + t]);
                s.kbuf[t * d..(t + 1) * d].copy_from_slice(&g.k[at..at + d]);
                vptr[t] = g.v.as_ptr().add(at);
            }
            let kt = crate::gemm::aligned(&mut s.kt, d * KT);
            transpose_into(&s.kbuf, d, 0, kn, d, kt);
            let kt = kt.as_ptr();
            for tl in 0..tiles {
                let r0 = tl * MR;
                tile(
                    MR.min(rows - r0),
                    s.qp.as_ptr().add(tl * d * MR),
                    kt,
                    d,
                    s.s.as_mut_ptr().add(r0 * KT),
                    KT,
                    kn,
                    false,
                );
            }
            // Online softmax per row over this tile's visible keys.
            for r in 0..rows {
                let pos = first_pos + r / group;
                let valid = (pos + 1).saturating_sub(t0).min(kn);
                let row = s.s.as_mut_ptr().add(r * KT);
                if valid == 0 {
                    _mm512_storeu_ps(row, _mm512_setzero_ps());
                    _mm512_storeu_ps(row.add(16), _mm512_setzero_ps());
                    s.alpha[r] = 1.0;
                    continue;
                }
                let bits = if valid >= 32 {
                    u32::MAX
                } else {
                    (1u32 << valid) - 1
                };
                let (k0, k1) = (bits as __mmask16, (bits >> 16) as __mmask16);
                let s0 = _mm512_mask_loadu_ps(neg_inf, k0, row);
                let s1 = _mm512_mask_loadu_ps(neg_inf, k1, row.add(16));
                let mx = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
                let m_old = s.m[r];
                let m_new = m_old.max(mx);
                let mv = _mm512_set1_ps(m_new);
                let p0 = _mm512_maskz_mov_ps(k0, exp16(_mm512_sub_ps(s0, mv)));
                let p1 = _mm512_maskz_mov_ps(k1, exp16(_mm512_sub_ps(s1, mv)));
                _mm512_storeu_ps(row, p0);
                _mm512_storeu_ps(row.add(16), p1);
                let alpha = (m_old - m_new).exp();
                s.alpha[r] = alpha;
                s.l[r] = s.l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
                s.m[r] = m_new;
            }
            // Rows per value pass: 6 (3 for head_dim 128), so R * DV <= 24 accumulators.
            let rpv = (24 / DV).min(6);
            let mut r0 = 0;
            while r0 < rows {
                let (p, o, a) = (
                    s.s.as_ptr().add(r0 * KT),
                    s.o.as_mut_ptr().add(r0 * d),
                    s.alpha.as_ptr().add(r0),
                );
                match rpv.min(rows - r0) {
                    6 => pv::<6, DV>(p, &vptr, kn, o, a),
                    5 => pv::<5, DV>(p, &vptr, kn, o, a),
                    4 => pv::<4, DV>(p, &vptr, kn, o, a),
                    3 => pv::<3, DV>(p, &vptr, kn, o, a),
                    2 => pv::<2, DV>(p, &vptr, kn, o, a),
                    _ => pv::<1, DV>(p, &vptr, kn, o, a),
                }
                r0 += rpv.min(rows - r0);
            }
        }
        for r in 0..rows {
            let inv = _mm512_set1_ps(1.0 / s.l[r]);
            let dst = out.add(q_row(r));
            for c in 0..DV {
                let x = _mm512_loadu_ps(s.o.as_ptr().add(r * d + 16 * c));
                _mm512_storeu_ps(dst.add(16 * c), _mm512_mul_ps(x, inv));
            }
        }
    }
}
