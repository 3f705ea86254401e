//! Block manager costs: lookup of a cached 4,096-token prefix (256 blocks of 16), and
//! allocate/commit/free churn. Divide by 256 for ns per block.

use alora_cache::{BlockHasher, CacheConfig, KvCacheManager, RequestKey};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const BS: usize = 16;
const TOKENS: usize = 4096;

fn manager() -> KvCacheManager {
    KvCacheManager::new(
        CacheConfig {
            block_size: BS,
            num_blocks: 1024,
        },
        BlockHasher::with_seed(1),
    )
}

fn prompt() -> Vec<u32> {
    (0..TOKENS as u32 + 1)
        .map(|i| i.wrapping_mul(2_654_435_761) % 49_152)
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_pool");
    g.throughput(Throughput::Elements((TOKENS / BS) as u64));
    let tokens = prompt();
    let key = RequestKey::base();

    let mut m = manager();
    let hit = m.lookup(&tokens, &key);
    let mut seq = m.allocate(hit, key.clone(), tokens.len()).unwrap();
    m.commit(&mut seq, &tokens);
    m.free(seq);
    g.bench_function("lookup_4096_tokens_hit", |b| {
        b.iter(|| {
            let hit = m.lookup(&tokens, &key);
            assert_eq!(hit.num_computed_tokens, TOKENS);
            hit
        })
    });

    g.bench_function("allocate_commit_free_4096_tokens", |b| {
        let mut m = manager();
        let mut salt = 0u64;
        b.iter_batched(
            || {
                // A fresh salt per iteration: every admission misses and evicts, the worst case.
                salt += 1;
                RequestKey {
                    cache_salt: Some(salt.to_string()),
                    ..RequestKey::base()
                }
            },
            |key| {
                let hit = m.lookup(&tokens, &key);
                let mut seq = m.allocate(hit, key, tokens.len()).unwrap();
                m.commit(&mut seq, &tokens);
                m.free(seq);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
