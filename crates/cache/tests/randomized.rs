//! A seeded random walk of 100,000 cache operations (admit with prefix sharing, extend, free,
//! drop, eviction under pressure, several adapters, random s), checking after every step that
//! no block is both free and held, ref counts equal holders, every hashed block re-hashes to its
//! key, capacity holds, and every block a request holds carries that request's tokens.
//!
//! A shadow K/V store stands in for the model: each slot records which row was written there
//! (the token prefix up to it, its row key, the salt); the walk writes every computed row, makes
//! every partial hit's copy, and checks that every row a request is told is cached is exactly
//! the row it would have computed.

use alora_cache::{
    AdapterDigest, AdapterKey, BlockHasher, CacheConfig, KvCacheManager, RequestKey, SeqBlocks,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4;
const NUM_BLOCKS: usize = 48;

struct Live {
    seq: SeqBlocks,
    tokens: Vec<u32>,
}

/// What a K/V row is: (a hash of) the tokens up to and including it, how it was computed,
/// whether it is salted (the walk has one salt).
type RowId = (u64, Option<(AdapterDigest, Option<usize>)>, bool);

fn row_id(tokens: &[u32], key: &RequestKey, pos: usize) -> RowId {
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&tokens[..=pos], &mut h);
    (
        std::hash::Hasher::finish(&h),
        key.row_key(pos),
        key.cache_salt.is_some(),
    )
}

/// The model's K/V, as row identities per slot.
struct Shadow(Vec<Option<RowId>>);

impl Shadow {
    fn slot(seq: &SeqBlocks, pos: usize) -> usize {
        seq.blocks()[pos / BS].index() * BS + pos % BS
    }

    fn write(&mut self, seq: &SeqBlocks, tokens: &[u32], from: usize) {
        for p in from..tokens.len() {
            self.0[Self::slot(seq, p)] = Some(row_id(tokens, seq.key(), p));
        }
    }

    fn assert_holds(&self, seq: &SeqBlocks, tokens: &[u32], upto: usize) {
        for p in 0..upto {
            assert_eq!(
                self.0[Self::slot(seq, p)].as_ref(),
                Some(&row_id(tokens, seq.key(), p)),
                "cached row {p} is not the request's own"
            );
        }
    }
}

fn random_key(rng: &mut StdRng, len: usize) -> RequestKey {
    let adapter = match rng.random_range(0..4) {
        0 => AdapterKey::Base,
        1 => AdapterKey::Lora(AdapterDigest([1; 32])),
        k => AdapterKey::ALora {
            digest: AdapterDigest([k as u8; 32]),
            activation_start: rng.random_range(0..len.max(1)),
        },
    };
    let cache_salt = rng.random_bool(0.1).then(|| "tenant".to_string());
    RequestKey {
        adapter,
        cache_salt,
    }
}

/// Prompts are drawn as a prefix of a few shared "conversations" plus a random tail, so hits,
/// sharing and divergence all happen.
fn random_prompt(rng: &mut StdRng, convs: &[Vec<u32>]) -> Vec<u32> {
    let c = &convs[rng.random_range(0..convs.len())];
    let keep = rng.random_range(1..=c.len());
    let mut t = c[..keep].to_vec();
    for _ in 0..rng.random_range(0..6) {
        t.push(rng.random_range(0..3));
    }
    t
}

fn check(m: &mut KvCacheManager, live: &[Live]) {
    let mut holders = vec![0u32; NUM_BLOCKS];
    for l in live {
        for b in l.seq.blocks() {
            holders[b.index()] += 1;
        }
        // Every registered block of a request holds that request's tokens.
        for (i, b) in l.seq.blocks().iter().enumerate() {
            if let Some(t) = m.pool().cached_tokens(*b) {
                if (i + 1) * BS <= l.tokens.len() {
                    assert_eq!(
                        t,
                        &l.tokens[i * BS..(i + 1) * BS],
                        "block {} of a request",
                        b.0
                    );
                }
            }
        }
    }
    m.check_invariants(&holders).unwrap();
    assert!(m.pool().num_used() <= NUM_BLOCKS);
    assert_eq!(m.pool().num_free() + m.pool().num_used(), NUM_BLOCKS);
}

#[test]
fn random_walk_keeps_invariants() {
    let mut rng = StdRng::seed_from_u64(0xA10A);
    let mut m = KvCacheManager::new(
        CacheConfig {
            block_size: BS,
            num_blocks: NUM_BLOCKS,
        },
        BlockHasher::with_seed(3),
    );
    let convs: Vec<Vec<u32>> = (0..4)
        .map(|_| (0..40).map(|_| rng.random_range(0..5)).collect())
        .collect();
    let mut live: Vec<Live> = Vec::new();
    let mut shadow = Shadow(vec![None; NUM_BLOCKS * BS]);
    let (mut admitted, mut refused, mut hits, mut copied) = (0u32, 0u32, 0u64, 0u64);
    for _ in 0..100_000 {
        match rng.random_range(0..10) {
            0..=3 => {
                let tokens = random_prompt(&mut rng, &convs);
                let key = random_key(&mut rng, tokens.len());
                let hit = m.lookup(&tokens, &key);
                assert!(hit.num_computed_tokens < tokens.len());
                // A hit is content: the found blocks hold exactly these tokens.
                for (i, b) in hit.blocks.iter().enumerate() {
                    assert_eq!(
                        m.pool().cached_tokens(*b).unwrap(),
                        &tokens[i * BS..(i + 1) * BS]
                    );
                }
                hits += hit.num_computed_tokens as u64;
                match m.allocate(hit, key, tokens.len()) {
                    Some(mut seq) => {
                        if let Some(c) = seq.take_copy() {
                            assert!(c.rows > 0 && c.rows <= BS);
                            for r in 0..c.rows {
                                shadow.0[c.dst.index() * BS + r] = shadow.0[c.src.index() * BS + r];
                            }
                            copied += c.rows as u64;
                        }
                        let cached = seq.num_cached_tokens();
                        shadow.assert_holds(&seq, &tokens, cached);
                        shadow.write(&seq, &tokens, cached);
                        m.commit(&mut seq, &tokens);
                        live.push(Live { seq, tokens });
                        admitted += 1;
                    }
                    None => refused += 1,
                }
            }
            4..=6 if !live.is_empty() => {
                let i = rng.random_range(0..live.len());
                let l = &mut live[i];
                let n = rng.random_range(1..=5);
                let new_len = l.tokens.len() + n;
                if m.grow(&mut l.seq, new_len) {
                    let from = l.tokens.len();
                    for _ in 0..n {
                        l.tokens.push(rng.random_range(0..3));
                    }
                    shadow.write(&l.seq, &l.tokens, from);
                    m.commit(&mut l.seq, &l.tokens);
                }
            }
            7 | 8 if !live.is_empty() => {
                let i = rng.random_range(0..live.len());
                let l = live.swap_remove(i);
                m.free(l.seq);
            }
            9 if !live.is_empty() => {
                // Cancellation: the handle is dropped, not freed.
                let i = rng.random_range(0..live.len());
                drop(live.swap_remove(i));
            }
            _ => {}
        }
        check(&mut m, &live);
    }
    assert!(
        admitted > 10_000 && refused > 100,
        "walk must exercise both: {admitted} {refused}"
    );
    assert!(
        hits > 0 && copied > 1_000 && m.stats().evictions > 1_000,
        "walk must hit, copy partial blocks and evict: {hits} {copied}"
    );
    live.clear();
    assert_eq!(m.num_used_blocks(), 0);
}
