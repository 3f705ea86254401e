//! What the attention kernels take: one step's batch geometry over a layer's K/V pools, and
//! the scalar reference both kernels are tested against.
//!
//! The pools are one layer's keys and values, `[slots, kv_heads, head_dim]` f32 each; a
//! sequence's context is the list of its slots in position order. A step carries, per
//! sequence, `seqlens_q` new tokens at positions `start_pos .. start_pos + seqlens_q` (their
//! queries, in order, in `q` `[tokens, heads, head_dim]`) and `seqlens_k` visible keys (its
//! whole context including the new tokens, whose K/V are already written). Attention is
//! causal, bottom-right aligned: the query at position p sees keys 0 ..= p.

use crate::error::{ensure, Result};

/// Geometry of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The softmax scale (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// One step's sequences as the kernels read them, checked once at construction so the
/// kernels' raw reads stay inside the slices.
#[derive(Debug, Clone, Copy)]
pub struct AttnBatch<'a> {
    seqlens_q: &'a [usize],
    seqlens_k: &'a [usize],
    start_pos: &'a [usize],
    slots: &'a [u32],
    num_tokens: usize,
    /// One past the largest slot (0 for no slots).
    slot_end: usize,
}

impl<'a> AttnBatch<'a> {
    /// Per sequence: new tokens, visible keys, position of its first new token; and all
    /// sequences' key slots concatenated in position order. Errors unless the lengths agree,
    /// the slots sum to the keys, and each sequence's new tokens end at its last key
    /// (`start_pos + seqlens_q == seqlens_k`).
    pub fn new(
        seqlens_q: &'a [usize],
        seqlens_k: &'a [usize],
        start_pos: &'a [usize],
        slots: &'a [u32],
    ) -> Result<Self> {
        ensure(
            seqlens_q.len() == seqlens_k.len() && seqlens_q.len() == start_pos.len(),
            || {
                format!(
                    "attention batch: {} / {} / {} entries in seqlens_q / seqlens_k / start_pos",
                    seqlens_q.len(),
                    seqlens_k.len(),
                    start_pos.len()
                )
            },
        )?;
        for (i, ((&nq, &nk), &s)) in seqlens_q.iter().zip(seqlens_k).zip(start_pos).enumerate() {
            ensure(s + nq == nk, || {
                format!(
                    "attention batch: sequence {i} has start {s} + {nq} new tokens but {nk} keys"
                )
            })?;
        }
        let keys: usize = seqlens_k.iter().sum();
        ensure(keys == slots.len(), || {
            format!("attention batch: {keys} keys but {} slots", slots.len())
        })?;
        let slot_end = slots.iter().map(|&s| s as usize + 1).max().unwrap_or(0);
        Ok(AttnBatch {
            seqlens_q,
            seqlens_k,
            start_pos,
            slots,
            num_tokens: seqlens_q.iter().sum(),
            slot_end,
        })
    }

    pub fn seqlens_q(&self) -> &'a [usize] {
        self.seqlens_q
    }
    pub fn seqlens_k(&self) -> &'a [usize] {
        self.seqlens_k
    }
    pub fn start_pos(&self) -> &'a [usize] {
        self.start_pos
    }
    pub fn slots(&self) -> &'a [u32] {
        self.slots
    }
    /// New tokens over all sequences.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Errors unless `q` and the pools fit this batch and `sh` (the kernels then index them
    /// without further checks).
    pub(crate) fn check(&self, q: &[f32], k: &[f32], v: &[f32], sh: &Shape) -> Result<()> {
        self.check_lens(q.len(), k.len(), v.len(), sh)
    }

    /// [`check`](Self::check) by element counts (pools of any element type).
    pub(crate) fn check_lens(&self, q: usize, k: usize, v: usize, sh: &Shape) -> Result<()> {
        let (nh, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
        ensure(d > 0 && kvh > 0 && nh % kvh == 0, || {
            format!("attention shape: {nh} heads over {kvh} KV heads of {d}")
        })?;
        ensure(q == self.num_tokens * nh * d, || {
            format!(
                "attention: q holds {q} floats, expected {} tokens x {nh} x {d}",
                self.num_tokens
            )
        })?;
        let row = kvh * d;
        ensure(k.is_multiple_of(row) && k == v, || {
            format!("attention: pools of {k} and {v} elements for rows of {row}")
        })?;
        ensure(self.slot_end <= k / row, || {
            format!(
                "attention: slot {} past the pools' {} slots",
                self.slot_end - 1,
                k / row
            )
        })
    }
}

/// Plain causal attention, accumulated in f64: for every new token and head, softmax of the
/// scaled scores over the keys it sees, times V. The reference of the paged and flash kernels.
pub fn reference<'a>(
    q: &[f32],
    k: &'a [f32],
    v: &'a [f32],
    b: &AttnBatch<'_>,
    sh: &Shape,
) -> Result<Vec<f32>> {
    b.check(q, k, v, sh)?;
    let (nh, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
    let group = nh / kvh;
    let mut out = vec![0f32; q.len()];
    let (mut t0, mut k0) = (0, 0);
    for i in 0..b.seqlens_q.len() {
        let (nq, nk, start) = (b.seqlens_q[i], b.seqlens_k[i], b.start_pos[i]);
        let keys = &b.slots[k0..k0 + nk];
        for j in 0..nq {
            let visible = &keys[..start + j + 1];
            for h in 0..nh {
                let kh = h / group;
                let qrow = &q[((t0 + j) * nh + h) * d..][..d];
                let at = |pool: &'a [f32], s: u32| -> &'a [f32] {
                    &pool[(s as usize * kvh + kh) * d..][..d]
                };
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&s| {
                        let kr = at(k, s);
                        qrow.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * sh.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                let o = &mut out[((t0 + j) * nh + h) * d..][..d];
                for (c, oc) in o.iter_mut().enumerate() {
                    let acc: f64 = visible
                        .iter()
                        .zip(&p)
                        .map(|(&s, pt)| pt * at(v, s)[c] as f64)
                        .sum();
                    *oc = (acc / sum) as f32;
                }
            }
        }
        t0 += nq;
        k0 += nk;
    }
    Ok(out)
}

/// Random inputs for the kernels' tests: pools with scattered slots, sequences with chunked
/// and decode-like steps.
#[cfg(test)]
pub(crate) mod testing {
    use rand::{Rng, SeedableRng};

    /// Owned inputs of one call.
    pub(crate) struct Case {
        pub seqlens_q: Vec<usize>,
        pub seqlens_k: Vec<usize>,
        pub start_pos: Vec<usize>,
        pub slots: Vec<u32>,
        pub q: Vec<f32>,
        pub k: Vec<f32>,
        pub v: Vec<f32>,
    }

    /// Sequences given as (new tokens, cached keys before them); slots are a shuffled subset
    /// of a pool twice the size needed.
    pub(crate) fn case(
        seqs: &[(usize, usize)],
        heads: usize,
        kv_heads: usize,
        d: usize,
        seed: u64,
    ) -> Case {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let total: usize = seqs.iter().map(|&(nq, c)| nq + c).sum();
        let pool_slots = total * 2 + 3;
        let mut free: Vec<u32> = (0..pool_slots as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.random_range(0..=i));
        }
        let mut c = Case {
            seqlens_q: seqs.iter().map(|s| s.0).collect(),
            seqlens_k: seqs.iter().map(|s| s.0 + s.1).collect(),
            start_pos: seqs.iter().map(|s| s.1).collect(),
            slots: free[..total].to_vec(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
        };
        let tokens: usize = c.seqlens_q.iter().sum();
        let mut randn =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
        c.q = randn(tokens * heads * d);
        c.k = randn(pool_slots * kv_heads * d);
        c.v = randn(pool_slots * kv_heads * d);
        c
    }

    impl Case {
        pub(crate) fn batch(&self) -> super::AttnBatch<'_> {
            super::AttnBatch::new(
                &self.seqlens_q,
                &self.seqlens_k,
                &self.start_pos,
                &self.slots,
            )
            .unwrap()
        }
    }

    pub(crate) fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what} [{i}]: {g} vs {w}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_rejects_inconsistent_geometry() {
        let slots = [0u32, 1, 2];
        assert!(AttnBatch::new(&[1], &[3], &[2], &slots).is_ok());
        assert!(
            AttnBatch::new(&[1], &[3], &[1], &slots).is_err(),
            "start + new != keys"
        );
        assert!(
            AttnBatch::new(&[1, 1], &[3], &[2], &slots).is_err(),
            "lengths"
        );
        assert!(
            AttnBatch::new(&[1], &[2], &[1], &slots).is_err(),
            "slots != keys"
        );
        let b = AttnBatch::new(&[1], &[3], &[2], &[0, 1, 9]).unwrap();
        let sh = Shape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
        };
        let pools = vec![0f32; 5 * 4];
        assert!(
            b.check(&[0.0; 8], &pools, &pools, &sh).is_err(),
            "slot 9 past 5 slots"
        );
        let pools = vec![0f32; 10 * 4];
        assert!(b.check(&[0.0; 8], &pools, &pools, &sh).is_ok());
        assert!(b.check(&[0.0; 7], &pools, &pools, &sh).is_err(), "q size");
    }

    /// One key: the output is that key's value row whatever the scores.
    #[test]
    fn reference_with_one_key_returns_its_value() {
        let c = testing::case(&[(1, 0)], 2, 1, 8, 3);
        let sh = Shape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            scale: 0.7,
        };
        let out = reference(&c.q, &c.k, &c.v, &c.batch(), &sh).unwrap();
        let s = c.slots[0] as usize;
        for h in 0..2 {
            testing::assert_close(&out[h * 8..][..8], &c.v[s * 8..][..8], 1e-6, "head");
        }
    }
}
