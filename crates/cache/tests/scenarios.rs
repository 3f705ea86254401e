//! Scripted scenarios: exact block ids, hit counts and free-queue order, and the keying rule
//! of docs/ALORA.md ("What the prefix cache keys on") as a table. A cached-token count is the
//! whole blocks of the hash chain plus the rows of the next block copied from a donor.

use alora_cache::{
    AdapterDigest, AdapterKey, BlockCopy, BlockHasher, BlockId, CacheConfig, KvCacheManager,
    RequestKey, SeqBlocks,
};

const BS: usize = 4;

fn manager(num_blocks: usize) -> KvCacheManager {
    KvCacheManager::new(
        CacheConfig {
            block_size: BS,
            num_blocks,
        },
        BlockHasher::with_seed(42),
    )
}

/// Admits `tokens` under `key`, pretends the model computed all of them, registers the full
/// blocks. Returns the handle and the cached-token count seen at admission.
fn serve(m: &mut KvCacheManager, tokens: &[u32], key: &RequestKey) -> (SeqBlocks, usize) {
    let hit = m.lookup(tokens, key);
    let cached = hit.num_computed_tokens;
    let mut seq = m
        .allocate(hit, key.clone(), tokens.len())
        .expect("pool too small for scenario");
    m.commit(&mut seq, tokens);
    (seq, cached)
}

fn ids(v: &[u32]) -> Vec<BlockId> {
    v.iter().map(|&i| BlockId(i)).collect()
}

fn digest(x: u8) -> AdapterDigest {
    AdapterDigest([x; 32])
}

fn alora(x: u8, s: usize) -> RequestKey {
    RequestKey {
        adapter: AdapterKey::ALora {
            digest: digest(x),
            activation_start: s,
        },
        cache_salt: None,
    }
}

fn lora(x: u8) -> RequestKey {
    RequestKey {
        adapter: AdapterKey::Lora(digest(x)),
        cache_salt: None,
    }
}

/// 18 tokens of conversation, then a 2-token invocation at s = 18, then 2 more tokens.
fn conversation() -> Vec<u32> {
    (100..118).collect()
}

fn with_invocation(conv: &[u32], inv: &[u32]) -> (Vec<u32>, usize) {
    let s = conv.len();
    let mut t = conv.to_vec();
    t.extend_from_slice(inv);
    t.extend_from_slice(&[7, 8]);
    (t, s)
}

#[test]
fn keying_rule_table() {
    let conv = conversation();
    let (inv_a, s) = with_invocation(&conv, &[1, 2]);
    let (inv_b, _) = with_invocation(&conv, &[3, 4]);
    // The same tokens as inv_a but with s one block later: the request is the same text with a
    // second invocation further on (s is the LAST occurrence), so its KV differs after s.
    let mut shifted = inv_a.clone();
    shifted.truncate(24);
    let base_salt_b = RequestKey {
        adapter: AdapterKey::Base,
        cache_salt: Some("b".into()),
    };
    let base_salt_a = RequestKey {
        adapter: AdapterKey::Base,
        cache_salt: Some("a".into()),
    };

    // (case, first request, second request, cached tokens seen by the second)
    type Request = (Vec<u32>, RequestKey);
    let cases: Vec<(&str, Request, Request, usize)> = vec![
        // s = 18: blocks [0,4) .. [12,16) end before s; [16,20) straddles it, its rows 16 and
        // 17 are base KV.
        (
            "base then aLoRA: every row before s (16 whole + 2 copied)",
            (conv.clone(), RequestKey::base()),
            (inv_a.clone(), alora(1, s)),
            18,
        ),
        (
            "aLoRA then same aLoRA: hits past s too (20 + 1, the last token runs)",
            (inv_a.clone(), alora(1, s)),
            (inv_a.clone(), alora(1, s)),
            21,
        ),
        (
            "aLoRA A then aLoRA B: only the base part",
            (inv_a.clone(), alora(1, s)),
            (inv_b.clone(), alora(2, s)),
            18,
        ),
        (
            "same invocation tokens, other adapter digest",
            (inv_a.clone(), alora(1, s)),
            (inv_a.clone(), alora(2, s)),
            18,
        ),
        (
            "plain LoRA after base: nothing",
            (conv.clone(), RequestKey::base()),
            (inv_a.clone(), lora(1)),
            0,
        ),
        (
            "LoRA then same LoRA: everything but the last token",
            (inv_a.clone(), lora(1)),
            (inv_a.clone(), lora(1)),
            21,
        ),
        (
            "aLoRA then base: the base part serves base requests",
            (inv_a.clone(), alora(1, s)),
            (conv.clone(), RequestKey::base()),
            17,
        ),
        (
            "block straddling s: base takes its rows before s only",
            (inv_a.clone(), alora(1, s)),
            (inv_a.clone(), RequestKey::base()),
            18,
        ),
        (
            "same tokens, different s: no adapted rows",
            (inv_a.clone(), alora(1, s)),
            (shifted.clone(), alora(1, 21)),
            18,
        ),
        (
            "different cache_salt: nothing",
            (conv.clone(), base_salt_a.clone()),
            (conv.clone(), base_salt_b),
            0,
        ),
        (
            "same cache_salt: hits",
            (conv.clone(), base_salt_a.clone()),
            (conv.clone(), base_salt_a),
            17,
        ),
        (
            "salted vs unsalted: nothing",
            (conv.clone(), RequestKey::base()),
            (
                conv.clone(),
                RequestKey {
                    adapter: AdapterKey::Base,
                    cache_salt: Some("a".into()),
                },
            ),
            0,
        ),
    ];
    for (name, (t1, k1), (t2, k2), want) in cases {
        let mut m = manager(64);
        let (first, _) = serve(&mut m, &t1, &k1);
        m.free(first);
        let (second, cached) = serve(&mut m, &t2, &k2);
        assert_eq!(cached, want, "{name}");
        m.free(second);
        m.check_invariants(&[0; 64]).unwrap();
    }
}

#[test]
fn base_turn_then_alora_exact_blocks() {
    // Scenario: a base turn on 18 tokens leaves blocks 0..=4 (block 4 half full); the aLoRA call
    // on the same conversation finds blocks 0..=3, copies block 4's two rows into a new block
    // and computes from position 18.
    let mut m = manager(16);
    let conv = conversation();
    let (base, cached) = serve(&mut m, &conv, &RequestKey::base());
    assert_eq!(cached, 0);
    assert_eq!(base.blocks(), &ids(&[0, 1, 2, 3, 4])[..]);
    m.free(base);
    // Freed tail first; block 4 was never full, but it donates its rows, so it queues with the
    // hashed blocks, at the tail end.
    assert_eq!(
        m.pool().free_queue(),
        ids(&[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 4, 3, 2, 1, 0])
    );

    let (inv, s) = with_invocation(&conv, &[1, 2]);
    let (mut al, cached) = serve(&mut m, &inv, &alora(9, s));
    assert_eq!(cached, 18);
    // Hits 0..=3, then two fresh blocks from the head of the free queue; the first gets the
    // donor's rows.
    assert_eq!(al.blocks(), &ids(&[0, 1, 2, 3, 5, 6])[..]);
    assert_eq!(
        al.take_copy(),
        Some(BlockCopy {
            src: BlockId(4),
            dst: BlockId(5),
            rows: 2
        })
    );
    assert_eq!(al.take_copy(), None, "a copy is handed out once");
    let st = m.stats();
    assert_eq!(
        (
            st.query_tokens,
            st.hit_tokens,
            st.adapter_hit_tokens_from_base
        ),
        (18 + 22, 18, 18)
    );
    assert_eq!(m.num_used_blocks(), 6);
    m.free(al);
    m.check_invariants(&[0; 16]).unwrap();
}

#[test]
fn lookup_never_covers_the_last_prompt_token() {
    let mut m = manager(8);
    let toks: Vec<u32> = (0..16).collect();
    let (a, _) = serve(&mut m, &toks, &RequestKey::base());
    m.free(a);
    // 16 tokens, all four blocks cached: three whole blocks and three rows of the fourth, the
    // last token must run.
    let hit = m.lookup(&toks, &RequestKey::base());
    assert_eq!((hit.blocks.len(), hit.num_computed_tokens), (3, 15));
    // One more token: all four blocks count.
    let mut longer = toks.clone();
    longer.push(99);
    assert_eq!(
        m.lookup(&longer, &RequestKey::base()).num_computed_tokens,
        16
    );
}

#[test]
fn eviction_is_lazy_and_lru() {
    let mut m = manager(4);
    let a: Vec<u32> = (0..8).collect();
    let b: Vec<u32> = (50..58).collect();
    let (sa, _) = serve(&mut m, &a, &RequestKey::base());
    m.free(sa); // queue: 2, 3, 1, 0  (a's blocks 0,1 hashed, freed tail first)
    assert_eq!(m.pool().free_queue(), ids(&[2, 3, 1, 0]));
    // a is still findable while free.
    let mut a9 = a.clone();
    a9.push(9);
    assert_eq!(m.lookup(&a9, &RequestKey::base()).blocks, ids(&[0, 1]));
    let (sb, _) = serve(&mut m, &b, &RequestKey::base());
    assert_eq!(sb.blocks(), &ids(&[2, 3])[..]);
    assert_eq!(m.stats().evictions, 0);
    m.free(sb); // queue: 1, 0, 3, 2
    assert_eq!(m.pool().free_queue(), ids(&[1, 0, 3, 2]));
    // A 12-token request needs 3 blocks: evicts a's tail (1), then a's head (0), then b's tail (3).
    let c: Vec<u32> = (200..212).collect();
    let (sc, cached) = serve(&mut m, &c, &RequestKey::base());
    assert_eq!(cached, 0);
    assert_eq!(sc.blocks(), &ids(&[1, 0, 3])[..]);
    assert_eq!(m.stats().evictions, 3);
    assert_eq!(m.lookup(&a9, &RequestKey::base()).num_computed_tokens, 0);
    // b's head block survived.
    let mut b9 = b.clone();
    b9.push(9);
    assert_eq!(m.lookup(&b9, &RequestKey::base()).blocks, ids(&[2]));
    drop(sc);
    m.check_invariants(&[0; 4]).unwrap();
}

#[test]
fn allocation_failure_changes_nothing() {
    let mut m = manager(3);
    let a: Vec<u32> = (0..8).collect();
    let (sa, _) = serve(&mut m, &a, &RequestKey::base());
    m.free(sa);
    let before = m.pool().free_queue();
    let mut long = a.clone();
    long.extend(0..9); // 17 tokens, 5 blocks: 2 hits + 3 new > 3 blocks in the pool
    let hit = m.lookup(&long, &RequestKey::base());
    assert_eq!(hit.num_computed_tokens, 8);
    assert!(m.allocate(hit, RequestKey::base(), long.len()).is_none());
    assert_eq!(m.pool().free_queue(), before);
    assert_eq!(
        m.stats().query_tokens,
        8,
        "a failed admission is not a query"
    );
}

#[test]
fn dropped_handle_returns_blocks_and_shared_blocks_are_counted() {
    let mut m = manager(8);
    let a: Vec<u32> = (0..9).collect();
    let (s1, _) = serve(&mut m, &a, &RequestKey::base());
    let (s2, cached) = serve(&mut m, &a, &RequestKey::base());
    assert_eq!(cached, 8);
    assert_eq!(m.pool().ref_cnt(BlockId(0)), 2);
    assert_eq!(m.num_used_blocks(), 4);
    drop(s1);
    drop(s2);
    assert_eq!(m.num_used_blocks(), 0);
    m.check_invariants(&[0; 8]).unwrap();
}

#[test]
fn decode_growth_registers_blocks_as_they_fill() {
    let mut m = manager(8);
    let mut toks: Vec<u32> = (0..6).collect();
    let (mut seq, _) = serve(&mut m, &toks, &RequestKey::base());
    assert_eq!(seq.blocks().len(), 2);
    for t in 6..10u32 {
        toks.push(t);
        assert!(m.grow(&mut seq, toks.len()));
        m.commit(&mut seq, &toks);
    }
    assert_eq!(seq.blocks().len(), 3);
    m.free(seq);
    toks.push(77);
    // Two whole blocks and the third's two rows.
    let hit = m.lookup(&toks, &RequestKey::base());
    assert_eq!((hit.blocks.len(), hit.num_computed_tokens), (2, 10));
}

#[test]
fn reset_prefix_cache_forgets_free_blocks_only() {
    let mut m = manager(8);
    let a: Vec<u32> = (0..9).collect();
    let (held, _) = serve(&mut m, &a, &RequestKey::base());
    let b: Vec<u32> = (50..59).collect();
    let (freed, _) = serve(&mut m, &b, &RequestKey::base());
    m.free(freed);
    // Two hashed blocks and the donated last one.
    assert_eq!(m.reset_prefix_cache(), 3);
    assert_eq!(m.lookup(&b, &RequestKey::base()).num_computed_tokens, 0);
    assert_eq!(
        m.lookup(&a, &RequestKey::base()).num_computed_tokens,
        8,
        "held blocks stay cached"
    );
    m.free(held);
    m.check_invariants(&[0; 8]).unwrap();
}

#[test]
fn a_truncated_hit_recomputes_into_new_blocks_and_keeps_the_cached_copies() {
    let mut m = manager(8);
    let toks: Vec<u32> = (0..9).collect();
    let (a, _) = serve(&mut m, &toks, &RequestKey::base());
    let mut hit = m.lookup(&toks, &RequestKey::base());
    assert_eq!(hit.blocks, ids(&[0, 1]));
    hit.truncate(5); // whole blocks within 5 tokens: one
    assert_eq!(
        (hit.blocks.clone(), hit.num_computed_tokens),
        (ids(&[0]), 4)
    );
    hit.truncate(0);
    assert_eq!(
        (
            hit.blocks.len(),
            hit.num_computed_tokens,
            hit.num_base_tokens
        ),
        (0, 0, 0)
    );
    // A miss by choice: fresh blocks, and committing them leaves the first copies canonical.
    let mut b = m.allocate(hit, RequestKey::base(), toks.len()).unwrap();
    assert!(b.blocks().iter().all(|id| !a.blocks().contains(id)));
    m.commit(&mut b, &toks);
    m.free(b);
    assert_eq!(m.lookup(&toks, &RequestKey::base()).blocks, ids(&[0, 1]));
    m.free(a);
}

#[test]
fn a_partial_hit_truncates_whole_and_is_dropped_when_it_does_not_fit() {
    let mut m = manager(8);
    let toks: Vec<u32> = (0..10).collect();
    let (a, _) = serve(&mut m, &toks, &RequestKey::base());
    let mut longer = toks.clone();
    longer.extend([50, 51]);
    let mut hit = m.lookup(&longer, &RequestKey::base());
    assert_eq!((hit.blocks.len(), hit.num_computed_tokens), (2, 10));
    assert_eq!(
        hit.partial.map(|p| (p.donor, p.rows)),
        Some((BlockId(2), 2))
    );
    hit.truncate(10);
    assert_eq!(hit.num_computed_tokens, 10, "all of it fits");
    hit.truncate(9);
    assert_eq!(
        (hit.partial, hit.num_computed_tokens, hit.num_base_tokens),
        (None, 8, 8)
    );
    m.free(a);
}

#[test]
fn a_donor_shares_only_rows_with_the_same_tokens_and_key() {
    // Base conversation of 6 tokens; block 1 holds rows 4, 5.
    let mut m = manager(8);
    let conv: Vec<u32> = (0..6).collect();
    let (a, _) = serve(&mut m, &conv, &RequestKey::base());
    // Same first row, then a different token: one row.
    let hit = m.lookup(&[0, 1, 2, 3, 4, 9, 9], &RequestKey::base());
    assert_eq!(hit.num_computed_tokens, 5);
    // An aLoRA starting at 5: row 4 is base KV and shared, row 5 is adapted.
    let hit = m.lookup(&[0, 1, 2, 3, 4, 5, 9], &alora(1, 5));
    assert_eq!((hit.num_computed_tokens, hit.num_base_tokens), (5, 5));
    // Another salt shares nothing, a LoRA shares nothing.
    let salted = RequestKey {
        adapter: AdapterKey::Base,
        cache_salt: Some("t".into()),
    };
    assert_eq!(
        m.lookup(&[0, 1, 2, 3, 4, 5, 9], &salted)
            .num_computed_tokens,
        0
    );
    assert_eq!(
        m.lookup(&[0, 1, 2, 3, 4, 5, 9], &lora(1))
            .num_computed_tokens,
        0
    );
    m.free(a);
    m.check_invariants(&[0; 8]).unwrap();
}

#[test]
fn a_donor_is_forgotten_when_its_block_is_handed_out_or_many_newer_ones_come() {
    let mut m = manager(40);
    let conv: Vec<u32> = (0..6).collect();
    let (a, _) = serve(&mut m, &conv, &RequestKey::base());
    m.free(a);
    let mut probe = conv.clone();
    probe.push(9);
    assert_eq!(m.lookup(&probe, &RequestKey::base()).num_computed_tokens, 6);
    // Seventeen other continuations of the same first block (in blocks 2, 3, ...): the donor
    // list under that parent keeps sixteen. Ours drops out at the sixteenth, its block goes to
    // the head of the free queue and the seventeenth takes it; that one pushes out the first
    // continuation's block 2, which heads the queue now.
    for t in 0..17u32 {
        let (s, _) = serve(&mut m, &[0, 1, 2, 3, 100 + t, 7], &RequestKey::base());
        m.free(s);
    }
    assert_eq!(m.lookup(&probe, &RequestKey::base()).num_computed_tokens, 4);
    assert_eq!(m.pool().free_queue()[0], BlockId(2));
    m.check_invariants(&[0; 40]).unwrap();
    // Handed out again: the newest donor's block stops donating when it is reused.
    let newest: Vec<u32> = vec![0, 1, 2, 3, 116, 7, 9];
    assert_eq!(
        m.lookup(&newest, &RequestKey::base()).num_computed_tokens,
        6
    );
    let (held, _) = serve(
        &mut m,
        &(200..360).collect::<Vec<u32>>(),
        &RequestKey::base(),
    );
    assert_eq!(
        m.lookup(&newest, &RequestKey::base()).num_computed_tokens,
        0
    );
    m.free(held);
    m.check_invariants(&[0; 40]).unwrap();
}
