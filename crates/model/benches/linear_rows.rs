//! A projection over a few rows, at SmolLM2's gate/up shape (1536 x 576):
//! - dense f32 as `x W^T` (x as the left operand) and `(W x^T)^T` (the weight as the left
//!   operand): `LinearWeight::forward` takes the second form for 2-32 rows on the CPU;
//! - Q4_1 blocks (the default GGUF's format) through `qmatmul` with f32 activations, and the
//!   same blocks dequantized then multiplied densely: where the first stops paying is where
//!   `LinearWeight` switches to the second (BENCHMARKS.md);
//! - `linear_rows_stream`: 1 and 6 rows through 40 such block matrices in turn, out of cache.
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p alora-model --bench linear_rows

use alora_model::qmatmul::{BlockFormat, BlockMatrix};
use alora_model::LinearWeight;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn bench(c: &mut Criterion) {
    let d = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (1536, 576), &d).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
    let blocks =
        BlockMatrix::new(BlockFormat::Q4_1, 1536, 576, q.data().unwrap().into_owned()).unwrap();
    let lin_blocks = LinearWeight::Blocks(std::sync::Arc::new(blocks.clone()));
    let lin_dense = LinearWeight::Dense(w.clone());
    let mut g = c.benchmark_group("linear_rows");
    for rows in [1usize, 7, 8, 32, 64, 128, 512, 2048] {
        let x = Tensor::randn(0f32, 1.0, (rows, 576), &d).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        g.bench_with_input(BenchmarkId::new("x_wt", rows), &rows, |b, _| {
            b.iter(|| x.matmul(&w.t().unwrap()).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("w_xt_t", rows), &rows, |b, _| {
            b.iter(|| {
                w.matmul(&x.t().unwrap())
                    .unwrap()
                    .t()
                    .unwrap()
                    .contiguous()
                    .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("q4_1_blocks", rows), &rows, |b, &m| {
            b.iter(|| blocks.matmul(&xs, m))
        });
        g.bench_with_input(BenchmarkId::new("linear_blocks", rows), &rows, |b, _| {
            b.iter(|| lin_blocks.forward(&x).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("linear_dense", rows), &rows, |b, _| {
            b.iter(|| lin_dense.forward(&x).unwrap())
        });
        g.bench_with_input(
            BenchmarkId::new("q4_1_dequant_gemm", rows),
            &rows,
            |b, _| {
                b.iter(|| {
                    let wd = Tensor::from_vec(blocks.dequantize(), (1536, 576), &d).unwrap();
                    x.matmul(&wd.t().unwrap()).unwrap()
                })
            },
        );
    }
    g.finish();

    // The same shape out of cache, as a model step meets it: 40 such matrices (27 MB of
    // blocks, beyond L2 and most of what L3 keeps between steps) one after another, on a rayon
    // worker as `CausalLm::forward` runs them.
    let mut g = c.benchmark_group("linear_rows_stream");
    g.sample_size(10);
    let mats: Vec<BlockMatrix> = (0..40).map(|_| blocks.clone()).collect();
    for rows in [1usize, 6] {
        let x = Tensor::randn(0f32, 1.0, (rows, 576), &d).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        g.bench_with_input(BenchmarkId::new("q4_1_40mats", rows), &rows, |b, &m| {
            b.iter(|| {
                rayon::scope(|_| {
                    for bm in &mats {
                        std::hint::black_box(bm.matmul(&xs, m));
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
