//! A dense projection over a few rows, two ways: `x W^T` (x as the left operand) and
//! `(W x^T)^T` (the weight as the left operand), at SmolLM2's gate/up shape (1536 x 576, f32).
//! `LinearWeight::forward` takes the second form for 2-32 rows on the CPU because of this
//! comparison (BENCHMARKS.md).
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p alora-model --bench linear_rows

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn bench(c: &mut Criterion) {
    let d = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (1536, 576), &d).unwrap();
    let mut g = c.benchmark_group("linear_rows");
    for rows in [1usize, 7, 32, 128] {
        let x = Tensor::randn(0f32, 1.0, (rows, 576), &d).unwrap();
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
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
