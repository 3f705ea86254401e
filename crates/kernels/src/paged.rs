//! Paged attention on the CPU for short query chunks (decode steps, the few tokens of an aLoRA
//! call after a cached conversation): reads K and V where they live in the KV pools,
//! through each sequence's slot list, instead of gathering and transposing the whole context
//! per layer per step (which cost ~75 ms per decode step at 2048 tokens of context on SmolLM2,
//! more than the attention itself; see BENCHMARKS.md).
//!
//! Per sequence and KV head, for each of its query rows and the `group` query heads sharing that
//! KV head: scores against every visible key (causal, bottom-right aligned: query j at position
//! start + j sees keys 0 ..= start + j), softmax with the max subtracted, then the weighted sum
//! of V rows. f32 throughout; work items (sequence, KV head, a run of its tokens) run in
//! parallel with rayon. With AVX2 + FMA an item runs a register-tiled kernel (2 query rows x 4
//! keys per score pass, a vectorised exp, 2 rows x 32 floats per value pass): the 7-token step
//! of an aLoRA call after 2,048 cached tokens went from 125 to 75 ms on SmolLM2 with it
//! (`benches/smollm2.rs`, `tail7`). Elsewhere the portable loop runs, which is also the SIMD
//! kernel's reference in the tests below; both are tested against [`crate::attention::reference`].
//!
//! Split-K (flash-decoding): a step with fewer items than twice the threads (one sequence's
//! decode or aLoRA tail: 3 KV heads on 2 threads kept one thread idle a third of the time)
//! also splits each item's keys into parts of at least `MIN_KEYS_PER_PART`, each returning
//! its unnormalised sums with their max and total, merged exactly after. On SmolLM2 at ~1,120
//! tokens of context (2 threads, A/B over 3 server restarts): an adapted decode step 15.0 ->
//! 12.2 ms, the 3-token aLoRA step 18.6 -> 16.7 ms.
//!
//! With AVX-512 (and a head size of 16, 32, 64 or 128) an item is instead one sequence's run
//! over a range of its keys for every KV head at once (`paged/avx512.rs`): it walks the slots' whole
//! K/V rows once, in tiles with an online softmax, and prefetches the next tile. Split-K then
//! cuts each sequence's keys into up to two parts per thread. Out of cache (30 layers' pools,
//! 2,048 tokens of context, `attention_30_layers` in `benches/kernels.rs`, 2 threads) a decode
//! step's attention went from 12.1 to 6.7 ms, a 7-token tail's from 22.4 to 13.2 ms.

use rayon::prelude::*;

use crate::attention::{AttnBatch, Shape};
use crate::error::{ensure, Result};
use crate::isa::Isa;
use crate::kv::{self, KvPool};
use crate::simd::dot;

#[inline]
fn axpy(out: &mut [f32], p: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += p * x;
    }
}

/// One work item: a sequence's query rows that share one KV head.
struct Item<'a> {
    /// Query rows, each `head_dim` long, in (token j, head in group) order.
    rows: Vec<&'a [f32]>,
    /// Per row, how many of `keys` it sees (causal: position start + j sees start + j + 1).
    visible: Vec<usize>,
    /// The sequence's key slots in position order.
    keys: &'a [u32],
    head: usize,
}

/// The KV pools of one layer as seen by a kernel: element offsets of rows, and (for the SIMD
/// path) byte pointers to them.
struct Pools<'a> {
    k: KvPool<'a>,
    v: KvPool<'a>,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

impl Pools<'_> {
    /// The first element of (slot, KV head)'s row.
    #[inline]
    fn row(&self, slot: u32, h: usize) -> usize {
        (slot as usize * self.kv_heads + h) * self.head_dim
    }
    /// Byte pointers to the K / V row (the SIMD kernel loads through them by element type).
    #[inline]
    fn k_ptr(&self, slot: u32, h: usize) -> *const u8 {
        self.k.ptr(self.row(slot, h))
    }
    #[inline]
    fn v_ptr(&self, slot: u32, h: usize) -> *const u8 {
        self.v.ptr(self.row(slot, h))
    }
}

/// What an item computes per query row over its keys: the softmax numerator's weighted sum of
/// V rows (not yet divided), the max score and the sum of `exp(score - max)`. A row that sees
/// none of the item's keys has max -inf and sum 0. Parts over disjoint key ranges of the same
/// rows merge exactly ([`merge`]); one part alone gives `out / sum`.
struct Partial {
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// The portable kernel (and the reference for the SIMD one): per row, scores against every
/// visible key, softmax with the max subtracted, weighted sum of V rows.
fn item_portable(it: &Item<'_>, p: &Pools<'_>) -> Partial {
    let d = p.head_dim;
    let nr = it.rows.len();
    let mut res = Partial {
        out: vec![0f32; nr * d],
        max: vec![f32::NEG_INFINITY; nr],
        sum: vec![0f32; nr],
    };
    let mut scores = vec![0f32; it.keys.len()];
    let mut row = vec![0f32; d];
    for (r, (qrow, &visible)) in it.rows.iter().zip(&it.visible).enumerate() {
        let mut max = f32::NEG_INFINITY;
        for (t, &s) in it.keys[..visible].iter().enumerate() {
            p.k.read_f32(p.row(s, it.head), &mut row);
            let x = dot(qrow, &row) * p.scale;
            scores[t] = x;
            max = max.max(x);
        }
        let mut sum = 0f32;
        for x in &mut scores[..visible] {
            *x = (*x - max).exp();
            sum += *x;
        }
        let o = &mut res.out[r * d..][..d];
        for (t, &s) in it.keys[..visible].iter().enumerate() {
            p.v.read_f32(p.row(s, it.head), &mut row);
            axpy(o, scores[t], &row);
        }
        res.max[r] = max;
        res.sum[r] = sum;
    }
    res
}

/// Row `r` of the parts of one item split over key ranges: `sum_c e^(m_c - M) out_c /
/// sum_c e^(m_c - M) sum_c` with `M` the largest max (flash-decoding's merge), written to `dst`.
/// With one part the weights are exactly 1 and this is `out / sum`.
fn merge(parts: &[&Partial], r: usize, d: usize, dst: &mut [f32]) {
    let m = parts
        .iter()
        .filter(|p| p.sum[r] > 0.0)
        .map(|p| p.max[r])
        .fold(f32::NEG_INFINITY, f32::max);
    dst.fill(0.0);
    let mut total = 0f32;
    for p in parts.iter().filter(|p| p.sum[r] > 0.0) {
        let w = (p.max[r] - m).exp();
        total += p.sum[r] * w;
        axpy(dst, w, &p.out[r * d..][..d]);
    }
    let inv = 1.0 / total;
    dst.iter_mut().for_each(|x| *x *= inv);
}

/// `q`: [tokens, heads, head_dim] (RoPE applied), `k_pool` / `v_pool`: one layer's pools
/// [slots, kv_heads, head_dim] in the cache's element type, the sequences as `b` lays them
/// out. Returns [tokens, heads, head_dim] f32.
///
/// Work items are (sequence, KV head, a run of its query tokens), so a few-token chunk of one
/// sequence still spreads over the threads; each item reads its keys and values in place.
pub fn attention(
    q: &[f32],
    k_pool: KvPool<'_>,
    v_pool: KvPool<'_>,
    b: &AttnBatch<'_>,
    sh: &Shape,
) -> Result<Vec<f32>> {
    attention_with(q, k_pool, v_pool, b, sh, Isa::get())
}

/// [`attention`] with the kernels of at most `isa` (tests run each level this CPU has).
fn attention_with(
    q: &[f32],
    k_pool: KvPool<'_>,
    v_pool: KvPool<'_>,
    b: &AttnBatch<'_>,
    sh: &Shape,
    isa: Isa,
) -> Result<Vec<f32>> {
    ensure(k_pool.tag() == v_pool.tag(), || {
        "attention: K and V pools of different element types".to_string()
    })?;
    b.check_lens(q.len(), k_pool.len(), v_pool.len(), sh)?;
    let (nh, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
    let group = nh / kvh;
    let (seqlens_q, seqlens_k, start_pos) = (b.seqlens_q(), b.seqlens_k(), b.start_pos());
    let n = b.num_tokens();
    let isa = isa.min(Isa::get());
    let simd = isa >= Isa::Avx2 && d.is_multiple_of(8);
    #[cfg(target_arch = "x86_64")]
    let wide = isa >= Isa::Avx512 && avx512::supports(d);
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    let threads = rayon::current_num_threads().max(1);
    let items = if wide {
        plan_all_heads(seqlens_q, seqlens_k, start_pos, kvh, threads)
    } else {
        plan(seqlens_q, seqlens_k, start_pos, kvh, threads)
    };
    let slots = b.slots();
    let pools = Pools {
        k: k_pool,
        v: v_pool,
        kv_heads: kvh,
        head_dim: d,
        scale: sh.scale,
    };
    let out = items
        .par_iter()
        .map(|w| {
            let keys = &slots[w.ko + w.k0..w.ko + w.k0 + w.nk];
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: AVX-512F, AVX2, FMA and F16C were detected; the head size is one
                // the item has code for, and `AttnBatch::check_lens` put every slot inside
                // the pools and every query row inside `q`.
                return unsafe {
                    match pools.k.tag() {
                        kv::F32 => avx512::item::<{ kv::F32 }>(q, nh, w, keys, &pools),
                        kv::F16 => avx512::item::<{ kv::F16 }>(q, nh, w, keys, &pools),
                        _ => avx512::item::<{ kv::BF16 }>(q, nh, w, keys, &pools),
                    }
                };
            }
            let mut rows = Vec::with_capacity(w.nq * group);
            let mut visible = Vec::with_capacity(w.nq * group);
            for j in 0..w.nq {
                // Causal: query j at position start + j sees keys 0 ..= start + j; of this
                // part's keys k0 .. k0 + nk, those below that bound.
                let sees = (w.start + j + 1).min(w.seq_keys);
                for r in 0..group {
                    rows.push(&q[((w.qo + j) * nh + w.head * group + r) * d..][..d]);
                    visible.push(sees.saturating_sub(w.k0).min(w.nk));
                }
            }
            let it = Item {
                rows,
                visible,
                keys,
                head: w.head,
            };
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2, FMA and F16C were detected; every row is head_dim long, a
                // multiple of 8, and `AttnBatch::check_lens` put every slot inside the pools.
                return unsafe {
                    match pools.k.tag() {
                        kv::F32 => avx2::item::<{ kv::F32 }>(&it, &pools),
                        kv::F16 => avx2::item::<{ kv::F16 }>(&it, &pools),
                        _ => avx2::item::<{ kv::BF16 }>(&it, &pools),
                    }
                };
            }
            item_portable(&it, &pools)
        })
        .collect::<Vec<_>>();
    let mut flat = vec![0f32; n * nh * d];
    // The parts of one (query run, heads) are consecutive in `items`; their rows are
    // (KV head, token, head in group).
    let mut i = 0;
    while i < items.len() {
        let w = &items[i];
        let end = i + items[i..]
            .iter()
            .take_while(|x| (x.qo, x.head) == (w.qo, w.head))
            .count();
        let parts: Vec<&Partial> = out[i..end].iter().collect();
        for hh in 0..w.heads {
            for j in 0..w.nq {
                for r in 0..group {
                    let head = (w.head + hh) * group + r;
                    let dst = &mut flat[((w.qo + j) * nh + head) * d..][..d];
                    merge(&parts, (hh * w.nq + j) * group + r, d, dst);
                }
            }
        }
        i = end;
    }
    Ok(flat)
}

/// One work item: a run of a sequence's query tokens, one KV head, a range of its keys.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Work {
    /// First query row of the run (global), and its length.
    qo: usize,
    nq: usize,
    /// The sequence's first slot in the batch's slot list, its key count, and the position
    /// of the run's first token.
    ko: usize,
    seq_keys: usize,
    start: usize,
    /// The KV heads `head .. head + heads` (one, or all of them for the AVX-512 item).
    head: usize,
    heads: usize,
    /// This part's keys: k0 .. k0 + nk of the sequence's.
    k0: usize,
    nk: usize,
}

/// Keys below which a part is not split further (each part re-reads its query rows and pays
/// a merge; a few hundred keys of 64 floats are ~100 KB of K and V).
const MIN_KEYS_PER_PART: usize = 256;

/// The work items of a step. A sequence's tokens are split into runs only when there are
/// fewer (sequence, head) pairs than threads (each run reads all of the sequence's K and V
/// again); when the step has fewer items than twice the threads (one sequence's few-token
/// step over a long context: 3 KV heads on 2 threads left one idle half the time), each
/// item's keys are also split into parts (split-K, flash-decoding), merged after.
fn plan(
    seqlens_q: &[usize],
    seqlens_k: &[usize],
    start_pos: &[usize],
    kvh: usize,
    threads: usize,
) -> Vec<Work> {
    let mut runs = Vec::new();
    let (mut qo, mut ko) = (0, 0);
    for (i, (&nq, &nk)) in seqlens_q.iter().zip(seqlens_k).enumerate() {
        let parts = threads.div_ceil(seqlens_q.len() * kvh).clamp(1, nq.max(1));
        let per = nq.div_ceil(parts);
        for h in 0..kvh {
            let mut j = 0;
            while j < nq {
                let len = per.min(nq - j);
                runs.push((qo + j, len, ko, nk, start_pos[i] + j, h));
                j += len;
            }
        }
        qo += nq;
        ko += nk;
    }
    let few = runs.len() < 2 * threads;
    let mut items = Vec::new();
    for (qo, nq, ko, nk, start, head) in runs {
        // Keys past the run's last query are never seen.
        let seen = (start + nq).min(nk);
        let split = if few {
            threads.min(seen / MIN_KEYS_PER_PART).max(1)
        } else {
            1
        };
        let run = Work {
            qo,
            nq,
            ko,
            seq_keys: nk,
            start,
            head,
            heads: 1,
            k0: 0,
            nk: 0,
        };
        push_parts(&mut items, run, seen, split);
    }
    items
}

/// `run` once per part of its first `seen` keys cut into `split` near-equal parts (one part,
/// possibly empty, when `split` is 1).
fn push_parts(items: &mut Vec<Work>, run: Work, seen: usize, split: usize) {
    let per = seen.div_ceil(split).max(1);
    let mut k0 = 0;
    loop {
        let nk = per.min(seen - k0);
        items.push(Work { k0, nk, ..run });
        k0 += nk;
        if k0 >= seen {
            break;
        }
    }
}

/// Keys below which a part of an all-heads item is not split further (three heads' rows per
/// key: the same bytes per part as `MIN_KEYS_PER_PART` for one head at about half the keys).
const MIN_KEYS_PER_WIDE_PART: usize = 128;

/// The work items of a step for the all-heads (AVX-512) item: one per sequence with all its
/// new tokens and KV heads, each sequence's keys split into parts (split-K) when the step has
/// fewer sequences than twice the threads, up to two parts per thread so a slow thread's part
/// can be taken by another.
fn plan_all_heads(
    seqlens_q: &[usize],
    seqlens_k: &[usize],
    start_pos: &[usize],
    kvh: usize,
    threads: usize,
) -> Vec<Work> {
    let seqs = seqlens_q.iter().filter(|&&n| n > 0).count().max(1);
    let few = seqs < 2 * threads;
    let mut items = Vec::new();
    let (mut qo, mut ko) = (0, 0);
    for (i, (&nq, &nk)) in seqlens_q.iter().zip(seqlens_k).enumerate() {
        let start = start_pos[i];
        let seen = (start + nq).min(nk);
        if nq > 0 {
            let split = if few {
                (2 * threads)
                    .div_ceil(seqs)
                    .min(seen / MIN_KEYS_PER_WIDE_PART)
                    .max(1)
            } else {
                1
            };
            let run = Work {
                qo,
                nq,
                ko,
                seq_keys: nk,
                start,
                head: 0,
                heads: kvh,
                k0: 0,
                nk: 0,
            };
            push_parts(&mut items, run, seen, split);
        }
        qo += nq;
        ko += nk;
    }
    items
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

#[cfg(target_arch = "x86_64")]
// Register tiles are indexed [row][lane group] in several arrays at once; index loops say so
// more plainly than zipped iterators.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    //! The same item with AVX2: scores for 2 query rows x 4 keys per pass (8 accumulators over
    //! head_dim, each key row loaded once for both rows), a vectorised exp for the softmax,
    //! then the weighted sum of V for 2 rows at a time over 32-float (or 8-float) slices.

    use std::arch::x86_64::*;

    use super::{Item, Partial, Pools};
    use crate::kv::{x86::load8, F32};
    use crate::simd::x86::{exp8, hsum};

    /// Bytes of one element of the pools' type `E`.
    const fn esize<const E: u8>() -> usize {
        if E == F32 {
            4
        } else {
            2
        }
    }

    /// The sums of four registers as one [s0, s1, s2, s3].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b); // a01 a23 b01 b23 | a45 a67 b45 b67
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd); // a0123 b0123 c0123 d0123 | a4567 ...
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    /// Scores of `R` rows against keys `t0..t0 + 4` (rows of type `E` at `k`) into
    /// `s[r * nk + t]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_tile<const E: u8, const R: usize>(
        q: [&[f32]; R],
        k: [*const u8; 4],
        s: &mut [f32],
        nk: usize,
        t0: usize,
        scale: f32,
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let d = q[0].len();
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            let mut c = 0;
            while c < d {
                let mut qc = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    qc[r] = _mm256_loadu_ps(q[r].as_ptr().add(c));
                }
                for t in 0..4 {
                    let kc = load8::<E>(k[t].add(c * esize::<E>()));
                    for r in 0..R {
                        acc[r][t] = _mm256_fmadd_ps(qc[r], kc, acc[r][t]);
                    }
                }
                c += 8;
            }
            let sc = _mm_set1_ps(scale);
            for r in 0..R {
                let v = _mm_mul_ps(hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), sc);
                _mm_storeu_ps(s.as_mut_ptr().add(r * nk + t0), v);
            }
        }
    }

    /// `out[r] += sum_t p[r][t] V_t` over keys `keys` for `R` rows, on `W` registers (8W
    /// floats) of head_dim starting at `c0`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values_tile<const E: u8, const R: usize, const W: usize>(
        it: &Item<'_>,
        pools: &Pools<'_>,
        probs: [&[f32]; R],
        keys: std::ops::Range<usize>,
        c0: usize,
        out: [*mut f32; R],
    ) {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); W]; R];
            for r in 0..R {
                for w in 0..W {
                    acc[r][w] = _mm256_loadu_ps(out[r].add(c0 + 8 * w));
                }
            }
            for t in keys {
                let v = pools.v_ptr(it.keys[t], it.head).add(c0 * esize::<E>());
                let mut p = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    p[r] = _mm256_set1_ps(*probs[r].get_unchecked(t));
                }
                for w in 0..W {
                    let vw = load8::<E>(v.add(8 * w * esize::<E>()));
                    for r in 0..R {
                        acc[r][w] = _mm256_fmadd_ps(p[r], vw, acc[r][w]);
                    }
                }
            }
            for r in 0..R {
                for w in 0..W {
                    _mm256_storeu_ps(out[r].add(c0 + 8 * w), acc[r][w]);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn item<const E: u8>(it: &Item<'_>, pools: &Pools<'_>) -> Partial {
        // SAFETY: the caller upholds this function's contract (the CPU has its target features;
        // every pointer and index stays inside the buffers the caller passed, as it says at the call).
        unsafe {
            let d = pools.head_dim;
            let nr = it.rows.len();
            let nk = it.keys.len();
            let h = it.head;
            // Scores for every key (masked ones are zeroed after the softmax).
            let mut s = vec![0f32; nr * nk];
            let t4 = nk / 4 * 4;
            let mut t = 0;
            while t < t4 {
                let k = [0, 1, 2, 3].map(|i| pools.k_ptr(it.keys[t + i], h));
                let mut r = 0;
                while r + 2 <= nr {
                    scores_tile::<E, 2>(
                        [it.rows[r], it.rows[r + 1]],
                        k,
                        &mut s[r * nk..],
                        nk,
                        t,
                        pools.scale,
                    );
                    r += 2;
                }
                if r < nr {
                    scores_tile::<E, 1>([it.rows[r]], k, &mut s[r * nk..], nk, t, pools.scale);
                }
                t += 4;
            }
            for t in t4..nk {
                let k = pools.k_ptr(it.keys[t], h);
                for r in 0..nr {
                    let mut acc = _mm256_setzero_ps();
                    for c in (0..d).step_by(8) {
                        acc = _mm256_fmadd_ps(
                            _mm256_loadu_ps(it.rows[r].as_ptr().add(c)),
                            load8::<E>(k.add(c * esize::<E>())),
                            acc,
                        );
                    }
                    s[r * nk + t] = hsum(acc) * pools.scale;
                }
            }
            // Softmax numerators over each row's visible keys; the rest become 0.
            let mut maxes = vec![f32::NEG_INFINITY; nr];
            let mut sums = vec![0f32; nr];
            for r in 0..nr {
                let vis = it.visible[r];
                let row = &mut s[r * nk..(r + 1) * nk];
                // Max over the visible scores, 8 lanes at a time (a scalar fold is a serial chain).
                let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut t = 0;
                while t + 8 <= vis {
                    mv = _mm256_max_ps(mv, _mm256_loadu_ps(row.as_ptr().add(t)));
                    t += 8;
                }
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
                let max = lanes
                    .iter()
                    .chain(&row[t..vis])
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let m = _mm256_set1_ps(max);
                let mut sum = _mm256_setzero_ps();
                let mut t = 0;
                while t + 8 <= vis {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row.as_ptr().add(t)), m));
                    _mm256_storeu_ps(row.as_mut_ptr().add(t), e);
                    sum = _mm256_add_ps(sum, e);
                    t += 8;
                }
                let mut total = hsum(sum);
                for x in &mut row[t..vis] {
                    *x = (*x - max).exp();
                    total += *x;
                }
                row[vis..].iter_mut().for_each(|x| *x = 0.0);
                maxes[r] = max;
                sums[r] = total;
            }
            // Weighted sums of V, in tiles of keys so a tile's V rows stay in L1 while every row
            // pair reads them.
            const KEY_TILE: usize = 64;
            let mut out = vec![0f32; nr * d];
            let o = out.as_mut_ptr();
            let prob = |r: usize| &s[r * nk..(r + 1) * nk];
            let all = it.visible.iter().copied().max().unwrap_or(0);
            let mut t0 = 0;
            while t0 < all {
                let t1 = (t0 + KEY_TILE).min(all);
                let mut r = 0;
                while r < nr {
                    let two = r + 2 <= nr;
                    let vis = if two {
                        it.visible[r].max(it.visible[r + 1])
                    } else {
                        it.visible[r]
                    };
                    let keys = t0..t1.min(vis);
                    let mut c = 0;
                    while c < d && !keys.is_empty() {
                        let wide = c + 32 <= d;
                        let k = keys.clone();
                        match (two, wide) {
                            (true, true) => values_tile::<E, 2, 4>(
                                it,
                                pools,
                                [prob(r), prob(r + 1)],
                                k,
                                c,
                                [o.add(r * d), o.add((r + 1) * d)],
                            ),
                            (true, false) => values_tile::<E, 2, 1>(
                                it,
                                pools,
                                [prob(r), prob(r + 1)],
                                k,
                                c,
                                [o.add(r * d), o.add((r + 1) * d)],
                            ),
                            (false, true) => {
                                values_tile::<E, 1, 4>(it, pools, [prob(r)], k, c, [o.add(r * d)])
                            }
                            (false, false) => {
                                values_tile::<E, 1, 1>(it, pools, [prob(r)], k, c, [o.add(r * d)])
                            }
                        }
                        c += if wide { 32 } else { 8 };
                    }
                    r += if two { 2 } else { 1 };
                }
                t0 = t1;
            }
            Partial {
                out,
                max: maxes,
                sum: sums,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{reference, testing};

    fn shape(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Shape {
        Shape {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 0.3,
        }
    }

    const SHAPES: [(usize, usize, usize); 5] =
        [(4, 2, 16), (9, 3, 64), (2, 1, 64), (4, 2, 128), (6, 2, 40)];

    /// The kernel levels to check here: the portable loop, then each SIMD level this CPU has
    /// (a missing one fails instead where `ALORA_REQUIRE_SIMD` asks for it).
    fn levels() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        v.extend(
            [Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|&l| Isa::test_has(l)),
        );
        v
    }

    /// Each kernel level against the f64 reference: decode steps over scattered slots, a
    /// few-token chunk after a long context (over 16 and 32 rows per head for the AVX-512
    /// item's row columns), an odd number of rows, key counts that are not multiples of 4 or
    /// of a tile, one key; a head size (40) the AVX-512 item leaves to the AVX2 one.
    #[test]
    fn kernels_match_reference() {
        let seqs: &[&[(usize, usize)]] = &[
            &[(1, 36), (1, 0), (1, 129)],
            &[(7, 300)],
            &[(3, 2), (5, 0)],
            &[(12, 70), (2, 33)],
        ];
        for (si, seqs) in seqs.iter().enumerate() {
            for (hi, &(nh, kvh, d)) in SHAPES.iter().enumerate() {
                let c = testing::case(seqs, nh, kvh, d, (si * 10 + hi) as u64);
                let sh = shape(nh, kvh, d);
                let b = c.batch();
                let want = reference(&c.q, &c.k, &c.v, &b, &sh).unwrap();
                for isa in levels() {
                    let got =
                        attention_with(&c.q, KvPool::F32(&c.k), KvPool::F32(&c.v), &b, &sh, isa)
                            .unwrap();
                    testing::assert_close(&got, &want, 1e-5, &format!("{isa:?} {seqs:?} d={d}"));
                }
            }
        }
    }

    /// Split-K: one sequence's few tokens over a long context, on pools of 2 and 5 threads
    /// (parts of 256+ keys each), against the reference; and beside other sequences.
    #[test]
    fn split_keys_match_reference() {
        let seqs: &[&[(usize, usize)]] = &[&[(3, 1500)], &[(1, 600)], &[(2, 900), (1, 40)]];
        for threads in [2, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (si, seqs) in seqs.iter().enumerate() {
                let (nh, kvh, d) = (9, 3, 64);
                let c = testing::case(seqs, nh, kvh, d, 70 + si as u64);
                let sh = shape(nh, kvh, d);
                let b = c.batch();
                let want = reference(&c.q, &c.k, &c.v, &b, &sh).unwrap();
                for isa in levels() {
                    let got = pool.install(|| {
                        attention_with(&c.q, KvPool::F32(&c.k), KvPool::F32(&c.v), &b, &sh, isa)
                    });
                    let what = format!("{threads} threads, {isa:?}, {seqs:?}");
                    testing::assert_close(&got.unwrap(), &want, 1e-5, &what);
                }
            }
        }
    }

    /// f16 and bf16 pools: the kernels widen each element as they load it, so they match the
    /// reference on the same values rounded to the pool's type (split-K included).
    #[test]
    fn half_pools_match_the_reference_on_their_values() {
        let seqs: &[&[(usize, usize)]] = &[&[(1, 36), (1, 0), (1, 129)], &[(3, 1500)], &[(7, 300)]];
        for (si, seqs) in seqs.iter().enumerate() {
            let (nh, kvh, d) = (9, 3, 64);
            let c = testing::case(seqs, nh, kvh, d, 90 + si as u64);
            let sh = shape(nh, kvh, d);
            let b = c.batch();
            let f16s = |x: &[f32]| -> Vec<half::f16> {
                x.iter().map(|&v| half::f16::from_f32(v)).collect()
            };
            let bf16s = |x: &[f32]| -> Vec<half::bf16> {
                x.iter().map(|&v| half::bf16::from_f32(v)).collect()
            };
            let (kh, vh) = (f16s(&c.k), f16s(&c.v));
            let (kb, vb) = (bf16s(&c.k), bf16s(&c.v));
            let cases = [
                (KvPool::F16(&kh), KvPool::F16(&vh), "f16"),
                (KvPool::Bf16(&kb), KvPool::Bf16(&vb), "bf16"),
            ];
            for (k, v, name) in cases {
                let (mut kw, mut vw) = (vec![0f32; k.len()], vec![0f32; v.len()]);
                k.read_f32(0, &mut kw);
                v.read_f32(0, &mut vw);
                let want = reference(&c.q, &kw, &vw, &b, &sh).unwrap();
                for isa in levels() {
                    let got = attention_with(&c.q, k, v, &b, &sh, isa).unwrap();
                    testing::assert_close(&got, &want, 1e-5, &format!("{name} {isa:?} {seqs:?}"));
                }
            }
        }
    }

    #[test]
    fn all_heads_plan_splits_keys_when_sequences_are_few() {
        // One sequence's 3 tokens after 2,000 cached on 2 threads: 4 parts, all heads each.
        let items = plan_all_heads(&[3], &[2003], &[2000], 3, 2);
        let parts: Vec<(usize, usize)> = items.iter().map(|w| (w.k0, w.nk)).collect();
        assert_eq!(parts, [(0, 501), (501, 501), (1002, 501), (1503, 500)]);
        assert!(items.iter().all(|w| (w.head, w.heads) == (0, 3)));
        // A short context stays whole; eight decoding sequences are one item each.
        assert_eq!(plan_all_heads(&[1], &[200], &[199], 3, 2).len(), 1);
        let lens = [1; 8];
        assert_eq!(plan_all_heads(&lens, &[2000; 8], &[1999; 8], 3, 2).len(), 8);
        // Sequences without new tokens get no item.
        assert_eq!(plan_all_heads(&[0, 2], &[5, 700], &[5, 698], 3, 2).len(), 4);
    }

    #[test]
    fn plan_splits_keys_only_when_items_are_few() {
        // One sequence, 3 new tokens after 2,000 cached, 3 KV heads, 2 threads: 2 parts each.
        let items = plan(&[3], &[2003], &[2000], 3, 2);
        assert_eq!(items.len(), 6);
        for h in 0..3 {
            let parts: Vec<&Work> = items.iter().filter(|w| w.head == h).collect();
            assert_eq!((parts[0].k0, parts[0].nk), (0, 1002));
            assert_eq!((parts[1].k0, parts[1].nk), (1002, 1001));
        }
        // Short contexts stay whole; so do eight decoding sequences (24 items on 2 threads).
        assert_eq!(plan(&[3], &[300], &[297], 3, 2).len(), 3);
        let lens = [1; 8];
        assert_eq!(plan(&lens, &[2000; 8], &[1999; 8], 3, 2).len(), 24);
    }

    #[test]
    fn rejects_pools_too_small_for_the_slots() {
        let c = testing::case(&[(2, 5)], 2, 1, 8, 1);
        let sh = Shape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            scale: 1.0,
        };
        let short = &c.k[..8];
        let short = KvPool::F32(short);
        assert!(attention(&c.q, short, short, &c.batch(), &sh).is_err());
        let h: Vec<half::f16> = c.v.iter().map(|&x| half::f16::from_f32(x)).collect();
        let e = attention(&c.q, KvPool::F32(&c.k), KvPool::F16(&h), &c.batch(), &sh);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("different element types"));
    }
}
