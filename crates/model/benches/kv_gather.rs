//! What attention's KV gather costs: one layer's K and V for a sequence's context of
//! 128 / 512 / 2048 positions, gathered from scattered blocks of a SmolLM2-shaped pool
//! (3 KV heads x 64, f32, block size 16). A decode step pays this once per layer.

use alora_model::{KvStore, ModelConfig};
use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
  "intermediate_size":1536,"num_hidden_layers":1,"num_attention_heads":9,"num_key_value_heads":3}"#;

fn bench(c: &mut Criterion) {
    let cfg = ModelConfig::from_hf_json(SMOL).unwrap();
    let bs = 16;
    let num_blocks = 1024;
    let kv = KvStore::new(&cfg, num_blocks, bs, DType::F32, &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("kv_gather_one_layer");
    for n in [128usize, 512, 2048] {
        // Every other block, so the context is not contiguous in the pool.
        let slots: Vec<u32> = (0..n)
            .map(|p| ((p / bs) * 2 * bs + p % bs) as u32)
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| kv.read_slots(0, &slots).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
