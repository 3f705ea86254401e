//! alora's CPU compute kernels: every SIMD routine and every `unsafe` block of the project's
//! compute lives here. The crate knows no tensors and no model types: kernels take plain
//! slices and small shape structs, and each has a portable scalar reference in its tests.
//!
//! - [`isa`]: the one instruction-set type, detected once ([`Isa::get`]).
//! - [`gemm`]: `y = x W^T` for many rows (prefill) on AVX-512, W dense f32 or GGML blocks.
//! - [`qmatmul`]: GGML block matrices (Q4_0 / Q4_1 / Q8_0) times a few f32 rows (decode).
//! - [`attention`]: a step's batch geometry ([`AttnBatch`]), the scalar reference, the paged
//!   kernel for decode-like steps and the flash kernel for prefill chunks, both reading K/V
//!   in place through each sequence's slots.
//! - [`kv`]: the KV cache's element types (f32, f16, bf16) as the kernels read them.
//! - [`lora`]: a LoRA delta on the few rows a decode step or an aLoRA tail adapts.
//! - [`rowops`]: RMS norm (optionally fused with the residual add), RoPE, `silu(gate) * up`.
//! - [`simd`]: what the kernels share (dot, exp, transposes' buffers, a pointer for disjoint
//!   parallel writes).
//!
//! Every public function is safe: shapes and slot ranges are checked before any raw access,
//! and a SIMD path runs only after [`Isa::get`] found its features. Code comments quote the
//! figures BENCHMARKS.md has.

// Off x86-64 the SIMD paths compile out, leaving their helpers and imports unused.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_variables)
)]

pub mod attention;
pub mod error;
pub mod flash;
pub mod gemm;
pub mod isa;
pub mod kv;
pub mod lora;
pub mod paged;
pub mod qmatmul;
pub mod rowops;
pub mod simd;

pub use attention::{AttnBatch, Shape};
pub use error::KernelError;
pub use isa::Isa;
pub use kv::KvPool;
pub use qmatmul::{BlockFormat, BlockMatrix};
