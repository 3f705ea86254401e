//! The kernels alone on SmolLM2's shapes (hidden 576, MLP 1536, 9 heads over 3 KV heads of
//! 64), on slices as the model calls them:
//! - `qmatmul`: Q4_1 blocks (the default GGUF's format) x 1..16 rows, the decode path;
//! - `gemm`: dense f32 and Q4_1 blocks x 128..2048 rows, the prefill path (AVX-512 or AVX2);
//! - `paged` / `flash`: one layer's attention for a decode step and a 7-token aLoRA tail
//!   after 2,048 cached tokens, and a 512-token prefill chunk;
//! - `rowops`: RMS norm with the residual add, RoPE, `silu * up` over 512 rows.
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p alora-kernels --bench kernels

use alora_kernels::gemm::{self, WeightRows};
use alora_kernels::KvPool;
use alora_kernels::{flash, paged, rowops, AttnBatch, BlockFormat, BlockMatrix, Shape};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    // A small LCG: benchmarks need values, not statistics.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn projections(c: &mut Criterion) {
    let (n, k) = (1536, 576);
    let w = randn(n * k, 1);
    let blocks = BlockMatrix::quantize(BlockFormat::Q4_1, n, k, &w).unwrap();
    let mut g = c.benchmark_group("qmatmul_q4_1_1536x576");
    for rows in [1usize, 7, 8, 16] {
        let x = randn(rows * k, 2);
        g.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, &m| {
            b.iter(|| blocks.matmul(&x, m))
        });
    }
    g.finish();
    if !gemm::available() {
        eprintln!("gemm: no AVX2 on this CPU, skipped");
        return;
    }
    let mut g = c.benchmark_group("gemm_1536x576");
    for rows in [128usize, 512, 2048] {
        let x = randn(rows * k, 3);
        g.bench_with_input(BenchmarkId::new("dense", rows), &rows, |b, &m| {
            b.iter(|| gemm::matmul_t(&x, m, k, WeightRows::Dense(&w), n))
        });
        g.bench_with_input(BenchmarkId::new("q4_1", rows), &rows, |b, &m| {
            b.iter(|| gemm::matmul_t(&x, m, k, WeightRows::Blocks(&blocks), n))
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let sh = Shape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        scale: 0.125,
    };
    let row = sh.num_kv_heads * sh.head_dim;
    let pool_slots = 4096;
    let (kp, vp) = (randn(pool_slots * row, 4), randn(pool_slots * row, 5));
    let mut g = c.benchmark_group("attention_one_layer");
    // (name, new tokens, cached keys before them)
    for (name, nq, cached) in [
        ("decode_2048", 1usize, 2047usize),
        ("decode_128", 1, 127),
        ("tail7_2048", 7, 2048),
        ("prefill_512", 512, 0),
    ] {
        let nk = nq + cached;
        // Every other block of 16, so the context is not contiguous in the pool.
        let slots: Vec<u32> = (0..nk)
            .map(|p| ((p / 16) * 32 + p % 16) as u32 % pool_slots as u32)
            .collect();
        let (sq, sk, sp) = ([nq], [nk], [cached]);
        let batch = AttnBatch::new(&sq, &sk, &sp, &slots).unwrap();
        let q = randn(nq * sh.num_heads * sh.head_dim, 6);
        g.bench_function(BenchmarkId::new("paged", name), |b| {
            b.iter(|| {
                paged::attention(&q, KvPool::F32(&kp), KvPool::F32(&vp), &batch, &sh).unwrap()
            })
        });
        if flash::available(sh.head_dim) {
            g.bench_function(BenchmarkId::new("flash", name), |b| {
                b.iter(|| {
                    flash::attention(&q, KvPool::F32(&kp), KvPool::F32(&vp), &batch, &sh).unwrap()
                })
            });
        }
    }
    g.finish();
}

/// A whole step's attention: 30 layers, each with its own pools (190 MB in all, beyond any
/// cache), as a decode step or an aLoRA tail after 2,048 cached tokens reads them in the model
/// (`attention_one_layer` reuses one layer's 6 MB, which stays in L2/L3).
fn attention_step(c: &mut Criterion) {
    let sh = Shape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        scale: 0.125,
    };
    let (layers, cached) = (30, 2048);
    let row = sh.num_kv_heads * sh.head_dim;
    let slots_per_layer = cached + 8;
    let pools: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
        .map(|l| {
            let n = slots_per_layer * row;
            (randn(n, 20 + 2 * l as u64), randn(n, 21 + 2 * l as u64))
        })
        .collect();
    let mut g = c.benchmark_group("attention_30_layers_ctx2048");
    g.sample_size(20);
    for nq in [1usize, 3, 7] {
        let nk = cached + nq;
        let slots: Vec<u32> = (0..nk as u32).collect();
        let (sq, sk, sp) = ([nq], [nk], [cached]);
        let batch = AttnBatch::new(&sq, &sk, &sp, &slots).unwrap();
        let q = randn(nq * sh.num_heads * sh.head_dim, 6);
        g.bench_with_input(BenchmarkId::new("paged", nq), &nq, |b, _| {
            b.iter(|| {
                for (kp, vp) in &pools {
                    paged::attention(&q, KvPool::F32(kp), KvPool::F32(vp), &batch, &sh).unwrap();
                }
            })
        });
    }
    g.finish();
}

fn rows(c: &mut Criterion) {
    let (rows, h, heads, d) = (512, 576, 9, 64);
    let x = randn(rows * h, 7);
    let br = randn(rows * h, 8);
    let w = randn(h, 9);
    let xq = randn(rows * heads * d, 10);
    let cs = randn(rows * d / 2, 11);
    let gate = randn(rows * 1536, 12);
    let up = randn(rows * 1536, 13);
    let mut g = c.benchmark_group("rowops_512_rows");
    g.bench_function("add_rms_norm", |b| {
        b.iter(|| rowops::add_rms_norm(&x, &br, 1.0, &w, 1e-5).unwrap())
    });
    g.bench_function("rope", |b| {
        b.iter(|| rowops::rope(&xq, &cs, &cs, heads, d).unwrap())
    });
    g.bench_function("silu_mul", |b| {
        b.iter(|| rowops::silu_mul(&gate, &up).unwrap())
    });
    g.finish();
}

criterion_group!(benches, projections, attention, attention_step, rows);
criterion_main!(benches);
