//! Prefill (128 / 512 / 2048 tokens, batch 1) and decode (batch 1 and 8 at a 128-token
//! context), the 7-token step of an aLoRA call after a cached 256 / 2048-token context, and
//! steps of 1 / 3 / 6 rows after a cached 2,048-token context (a decode step against a call), on
//! the default model, SmolLM2-135M-Instruct (GGUF, fetched by
//! scripts/fetch-model.sh). Throughput is in tokens.
//!
//! `ALORA_BENCH_WEIGHTS` picks how the GGUF weights are held (blocks, the default; dense, keep, q8_0, q4k, ...);
//! `ALORA_BENCH_ATTENTION=reference|paged|flash` forces an attention path and
//! `ALORA_BENCH_ATTENTION_BLOCK` sets its query block rows; `RAYON_NUM_THREADS` the
//! thread count. BENCHMARKS.md has the commands and results.

use std::path::PathBuf;

use alora_cache::BlockId;
use alora_model::{AttentionImpl, CausalLm, KvStore, QuantPolicy, SeqStep};
use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BS: usize = 16;

fn load() -> CausalLm {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} missing: run scripts/fetch-model.sh",
        path.display()
    );
    let policy: QuantPolicy = std::env::var("ALORA_BENCH_WEIGHTS")
        .unwrap_or_else(|_| "blocks".into())
        .parse()
        .unwrap();
    let mut m = CausalLm::load_gguf(&path, policy, &Device::Cpu).unwrap().0;
    match std::env::var("ALORA_BENCH_ATTENTION").as_deref() {
        Ok("reference") => m.set_attention(AttentionImpl::Reference),
        Ok("paged") => m.set_attention(AttentionImpl::Paged),
        Ok("flash") => m.set_attention(AttentionImpl::Flash),
        Ok(other) => panic!("ALORA_BENCH_ATTENTION: {other}? (reference, paged or flash)"),
        Err(_) => {}
    }
    if let Ok(rows) = std::env::var("ALORA_BENCH_ATTENTION_BLOCK") {
        m.set_attention_block(
            rows.parse()
                .expect("ALORA_BENCH_ATTENTION_BLOCK is a row count"),
        );
    }
    m
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt) % 49_000 + 100)
        .collect()
}

fn table(seq: usize, blocks_per_seq: usize) -> Vec<BlockId> {
    (0..blocks_per_seq)
        .map(|b| BlockId((seq * blocks_per_seq + b) as u32))
        .collect()
}

fn bench(c: &mut Criterion) {
    let model = load();
    let mut g = c.benchmark_group("smollm2_prefill");
    g.sample_size(10);
    for n in [128usize, 512, 2048] {
        let kv: KvStore = model.new_kv_store(n.div_ceil(BS), BS).unwrap();
        let t = tokens(n, 1);
        let tab = table(0, n.div_ceil(BS));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let step = SeqStep {
                    tokens: &t,
                    start_pos: 0,
                    adapter: None,
                    block_table: &tab,
                    all_logits: false,
                };
                model.forward(&[step], &kv).unwrap()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("smollm2_decode_ctx128");
    g.sample_size(20);
    let ctx: usize = 128;
    for batch in [1usize, 8] {
        let per = (ctx + 1).div_ceil(BS);
        let kv = model.new_kv_store(per * batch, BS).unwrap();
        let prompts: Vec<Vec<u32>> = (0..batch).map(|i| tokens(ctx, i as u32 + 7)).collect();
        let tables: Vec<Vec<BlockId>> = (0..batch).map(|i| table(i, per)).collect();
        let prefill: Vec<SeqStep> = (0..batch)
            .map(|i| SeqStep {
                tokens: &prompts[i],
                start_pos: 0,
                adapter: None,
                block_table: &tables[i],
                all_logits: false,
            })
            .collect();
        model.forward(&prefill, &kv).unwrap();
        let next = [42u32];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, _| {
            b.iter(|| {
                // Each iteration decodes one token per sequence at position 128 (rewriting the
                // same slot), the cost of one engine step.
                let steps: Vec<SeqStep> = (0..batch)
                    .map(|i| SeqStep {
                        tokens: &next,
                        start_pos: ctx,
                        adapter: None,
                        block_table: &tables[i],
                        all_logits: false,
                    })
                    .collect();
                model.forward(&steps, &kv).unwrap()
            })
        });
    }
    g.finish();

    // An aLoRA call on a cached conversation: the KV of `ctx` tokens is in place and one
    // forward computes the 7 tokens after it (the last block's tail, `<|im_end|>\n` and the
    // invocation), the step that sets an intrinsic call's TTFT.
    let mut g = c.benchmark_group("smollm2_tail7_after_ctx");
    g.sample_size(20);
    for ctx in [256usize, 2048] {
        let per = (ctx + 7).div_ceil(BS);
        let kv = model.new_kv_store(per, BS).unwrap();
        let tab = table(0, per);
        let prompt = tokens(ctx, 3);
        model
            .forward(
                &[SeqStep {
                    tokens: &prompt,
                    start_pos: 0,
                    adapter: None,
                    block_table: &tab,
                    all_logits: false,
                }],
                &kv,
            )
            .unwrap();
        let tail = tokens(7, 5);
        g.bench_with_input(BenchmarkId::from_parameter(ctx), &ctx, |b, _| {
            b.iter(|| {
                let step = SeqStep {
                    tokens: &tail,
                    start_pos: ctx,
                    adapter: None,
                    block_table: &tab,
                    all_logits: false,
                };
                model.forward(&[step], &kv).unwrap()
            })
        });
    }
    g.finish();

    // What issue #17 compares at ~1,900 tokens: the call's step (6 rows: the base turn's last
    // token, `<|im_end|>\n`, the 3 invocation tokens; 3 with the turn closed ahead) against a
    // decode step (1 row) over the same cached context.
    let mut g = c.benchmark_group("smollm2_rows_after_ctx2048");
    g.sample_size(20);
    let ctx: usize = 2048;
    let per = (ctx + 6).div_ceil(BS);
    let kv = model.new_kv_store(per, BS).unwrap();
    let tab = table(0, per);
    let prompt = tokens(ctx, 3);
    fn step<'a>(tokens: &'a [u32], start_pos: usize, block_table: &'a [BlockId]) -> SeqStep<'a> {
        SeqStep {
            tokens,
            start_pos,
            adapter: None,
            block_table,
            all_logits: false,
        }
    }
    model.forward(&[step(&prompt, 0, &tab)], &kv).unwrap();
    for rows in [1usize, 3, 6] {
        let tail = tokens(rows, 5);
        g.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, _| {
            b.iter(|| model.forward(&[step(&tail, ctx, &tab)], &kv).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
