//! Where weights come from: HF safetensors (single or sharded, `safetensors.rs`) or a GGUF file
//! (`gguf.rs`: names, the Q/K row permutation), behind one lookup by HF tensor name, and the
//! dense-or-quantized linear weight the projections use, with the one rule that routes its
//! computation ([`LinearWeight::route`]).

use std::cell::RefCell;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module as _, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::qmatmul::{BlockFormat, BlockMatrix};
use alora_kernels::gemm::{self, WeightRows};

mod gguf;
mod safetensors;

/// How to hold GGUF weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantPolicy {
    /// Q4_0 / Q4_1 / Q8_0 tensors stay in their blocks and run through alora's kernel with f32
    /// activations ([`crate::qmatmul`]): the dequantized model's arithmetic up to summation
    /// order, a quarter to a sixth of the memory traffic per decoded token. Other formats are
    /// dequantized. On a GPU the same as `Dequantize`. The default.
    Blocks,
    /// Dequantize to the model dtype (f32 on CPU): exact against transformers' GGUF loading.
    Dequantize,
    /// Keep the file's quantization, through candle's `QMatMul` (activations quantized to Q8).
    Keep,
    /// Dequantize then quantize to this format: Q4_0 and Q8_0 through alora's kernel, others
    /// through candle's `QMatMul`.
    Requantize(GgmlDType),
}

impl std::str::FromStr for QuantPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "blocks" | "auto" => QuantPolicy::Blocks,
            "dequantize" | "f32" | "dense" => QuantPolicy::Dequantize,
            "keep" => QuantPolicy::Keep,
            "q8_0" => QuantPolicy::Requantize(GgmlDType::Q8_0),
            "q4_0" => QuantPolicy::Requantize(GgmlDType::Q4_0),
            "q4k" | "q4_k" => QuantPolicy::Requantize(GgmlDType::Q4K),
            "q6k" | "q6_k" => QuantPolicy::Requantize(GgmlDType::Q6K),
            _ => {
                return Err(format!(
                    "unknown weight format `{s}` (blocks, dense, keep, q8_0, q4_0, q4k, q6k)"
                ))
            }
        })
    }
}

/// The GGML block formats alora's kernels compute with directly.
fn block_format(t: GgmlDType) -> Option<BlockFormat> {
    match t {
        GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
        GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
        GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
        _ => None,
    }
}

/// Up to this many rows, dense projections run as `(W x^T)^T` on the CPU.
const SMALL_ROWS: usize = 32;

/// Up to this many rows, block-quantized projections run through [`BlockMatrix::matmul`];
/// more rows (prefill) go to the gemm (crossover measured by `benches/linear_rows.rs`,
/// BENCHMARKS.md).
pub const BLOCK_KERNEL_MAX_ROWS: usize = 16;

/// A projection's base weight, [out, in].
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    /// GGML blocks computed by alora's CPU kernels.
    Blocks(Arc<BlockMatrix>),
    /// candle's quantized matmul.
    Quant(QMatMul),
}

/// How one projection computes `x W^T` for a given input: the one routing rule, used by
/// [`LinearWeight::forward`] and [`LinearWeight::forward_many`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Dense, 2..=32 rows on the CPU: `(W x^T)^T` through candle (the weight as the left
    /// operand beats `x W^T` in candle's gemm: 1.5x at 7 rows, 1.07x at 32, equal at 1, 0.77x
    /// at 128; `benches/linear_rows.rs`, SmolLM2's 1536 x 576). Decode batches and aLoRA calls.
    DenseWeightLeft,
    /// Dense through candle's `x W^T`.
    DenseMatmul,
    /// Many rows on an AVX-512 CPU (dense f32 or blocks): `alora_kernels::gemm`.
    Gemm,
    /// Blocks, up to [`BLOCK_KERNEL_MAX_ROWS`] rows: [`BlockMatrix::matmul`].
    BlockRows,
    /// Blocks, more rows, no gemm on this CPU: dequantized, then candle's matmul.
    BlockDequantized,
    /// candle's `QMatMul`.
    Quant,
}

impl LinearWeight {
    /// Which computation [`forward`](Self::forward) runs for `x` [N, in].
    pub fn route(&self, x: &Tensor) -> Result<Route> {
        let cpu = x.device().is_cpu();
        let rows = match x.rank() {
            2 => x.dim(0)?,
            _ => 0,
        };
        Ok(match self {
            LinearWeight::Dense(_) if cpu && (2..=SMALL_ROWS).contains(&rows) => {
                Route::DenseWeightLeft
            }
            LinearWeight::Dense(w)
                if cpu
                    && rows > SMALL_ROWS
                    && x.dtype() == DType::F32
                    && w.dtype() == DType::F32
                    && w.device().is_cpu()
                    && w.is_contiguous()
                    && gemm::available() =>
            {
                Route::Gemm
            }
            LinearWeight::Dense(_) => Route::DenseMatmul,
            LinearWeight::Blocks(_) if rows <= BLOCK_KERNEL_MAX_ROWS => Route::BlockRows,
            LinearWeight::Blocks(_) if cpu && gemm::available() => Route::Gemm,
            LinearWeight::Blocks(_) => Route::BlockDequantized,
            LinearWeight::Quant(_) => Route::Quant,
        })
    }

    /// `x W^T` for x [N, in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let route = self.route(x)?;
        Ok(match (self, route) {
            (LinearWeight::Dense(w), Route::DenseWeightLeft) => {
                w.matmul(&x.t()?)?.t()?.contiguous()?
            }
            (LinearWeight::Dense(w), Route::DenseMatmul) => x.matmul(&w.t()?)?,
            (LinearWeight::Quant(q), _) => {
                let dt = x.dtype();
                q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dt)?
            }
            (LinearWeight::Dense(_) | LinearWeight::Blocks(_), Route::Gemm) => {
                let mut ys = LinearWeight::gemm(&[self], x)?;
                ys.pop().expect("one product")
            }
            (LinearWeight::Blocks(b), _) => {
                let (m, k) = x.dims2()?;
                let (n, _) = b.dims();
                let dt = x.dtype();
                let x = x.to_dtype(DType::F32)?.contiguous()?;
                let y = if route == Route::BlockRows {
                    let y = crate::ops::with_f32(&x, |xs| b.matmul(xs, m))?;
                    Tensor::from_vec(y, (m, n), x.device())?
                } else {
                    let w = Tensor::from_vec(b.dequantize(), (n, k), x.device())?;
                    x.matmul(&w.t()?)?
                };
                y.to_dtype(dt)?
            }
            (LinearWeight::Dense(_), r) => unreachable!("a dense weight never routes to {r:?}"),
        })
    }

    /// `x W_j^T` for each weight, x [N, in]: one gemm call that packs x once when every
    /// weight routes to the gemm for this input (Q/K/V and gate/up in a prefill), else one
    /// [`forward`](Self::forward) each.
    pub fn forward_many(ws: &[&LinearWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        let k = x.dims().last().copied().unwrap_or(0);
        let mut shared = ws.len() >= 2 && x.dtype() == DType::F32;
        for w in ws {
            // (A weight whose input width is not k goes to `forward`, which reports it.)
            shared = shared && w.route(x)? == Route::Gemm && w.in_features() == k;
        }
        if !shared {
            return ws.iter().map(|w| w.forward(x)).collect();
        }
        LinearWeight::gemm(ws, x)
    }

    /// The gemm for weights that all route to it (f32 results in x's dtype).
    fn gemm(ws: &[&LinearWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        let (m, k) = x.dims2()?;
        let dt = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        // Read guards on the dense weights' storage, held while the gemm reads them.
        let guards: Vec<_> = ws
            .iter()
            .map(|w| match w {
                LinearWeight::Dense(t) => Some(t.storage_and_layout()),
                _ => None,
            })
            .collect();
        let mut rows = Vec::with_capacity(ws.len());
        for (w, g) in ws.iter().zip(&guards) {
            rows.push(match (w, g) {
                (LinearWeight::Blocks(b), _) => (WeightRows::Blocks(b), b.dims().0),
                (LinearWeight::Dense(t), Some((storage, layout))) => (
                    WeightRows::Dense(crate::ops::f32_contents(storage, layout)?),
                    t.dim(0)?,
                ),
                _ => unreachable!("only dense and block weights route to the gemm"),
            });
        }
        let ys = crate::ops::with_f32(&x, |xs| gemm::matmul_t_shared(xs, m, k, &rows))?;
        ys.into_iter()
            .zip(&rows)
            .map(|(y, &(_, n))| Ok(Tensor::from_vec(y, (m, n), x.device())?.to_dtype(dt)?))
            .collect()
    }

    /// The input width (columns of W).
    pub fn in_features(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.dims().get(1).copied().unwrap_or(0),
            LinearWeight::Blocks(b) => b.dims().1,
            LinearWeight::Quant(QMatMul::QTensor(q)) => {
                q.shape().dims().get(1).copied().unwrap_or(0)
            }
            LinearWeight::Quant(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.dims().get(1).copied().unwrap_or(0)
            }
        }
    }

    /// The dense weight (dequantized if needed), for training.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Blocks(b) => {
                Tensor::from_vec(b.dequantize(), b.dims(), &candle_core::Device::Cpu)?
            }
            LinearWeight::Quant(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            LinearWeight::Quant(QMatMul::Tensor(t))
            | LinearWeight::Quant(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
        })
    }
}

pub(crate) enum WeightSource {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Gguf {
        content: gguf_file::Content,
        file: RefCell<File>,
        policy: QuantPolicy,
    },
}

/// Which heads count to use when undoing llama.cpp's Q/K row permutation.
#[derive(Clone, Copy)]
pub(crate) enum Permute {
    None,
    Heads(usize),
}

impl WeightSource {
    /// Opens an HF model directory's safetensors (sharded through the index when present).
    pub fn safetensors(dir: &Path) -> Result<Self> {
        Ok(WeightSource::Safetensors(safetensors::open(dir)?))
    }

    /// Opens a GGUF file; `policy` says how its projections are held.
    pub fn gguf(path: &Path, policy: QuantPolicy) -> Result<Self> {
        let (content, file) = gguf::open(path)?;
        Ok(WeightSource::Gguf {
            content,
            file: RefCell::new(file),
            policy,
        })
    }

    /// The GGUF metadata, when the source is a GGUF file.
    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match self {
            WeightSource::Gguf { content, .. } => Some(content),
            WeightSource::Safetensors(_) => None,
        }
    }

    pub fn contains(&self, hf: &str) -> bool {
        match self {
            WeightSource::Safetensors(st) => st.get(hf).is_ok(),
            WeightSource::Gguf { content, .. } => {
                gguf::gguf_name(hf).is_some_and(|n| content.tensor_infos.contains_key(&n))
            }
        }
    }

    fn qtensor(&self, hf: &str, device: &Device) -> Result<QTensor> {
        let WeightSource::Gguf { content, file, .. } = self else {
            unreachable!("gguf only")
        };
        gguf::tensor(content, &mut file.borrow_mut(), hf, device)
    }

    /// A dense tensor of `shape` in `dtype`.
    pub fn dense(
        &self,
        hf: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        permute: Permute,
    ) -> Result<Tensor> {
        let t = match self {
            WeightSource::Safetensors(st) => {
                st.load(hf, device).map_err(|e| ModelError::Weight {
                    key: hf.into(),
                    msg: e.to_string(),
                })?
            }
            WeightSource::Gguf { .. } => {
                let t = self.qtensor(hf, device)?.dequantize(device)?;
                match permute {
                    Permute::None => t,
                    Permute::Heads(h) => gguf::unpermute_dense(&t, h)?,
                }
            }
        };
        if t.dims() != shape {
            return Err(ModelError::Weight {
                key: hf.into(),
                msg: format!("shape {:?}, expected {shape:?}", t.dims()),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }

    /// A projection weight [out, in]: dense from safetensors, per policy from GGUF.
    pub fn linear(
        &self,
        hf: &str,
        out: usize,
        inp: usize,
        dtype: DType,
        device: &Device,
        permute: Permute,
    ) -> Result<LinearWeight> {
        let policy = match self {
            WeightSource::Safetensors(_) => QuantPolicy::Dequantize,
            // The block kernel is CPU code; other devices get dense weights.
            WeightSource::Gguf { .. } if !device.is_cpu() => QuantPolicy::Dequantize,
            WeightSource::Gguf { policy, .. } => *policy,
        };
        let dense = |dtype: DType| self.dense(hf, &[out, inp], dtype, device, permute);
        match policy {
            QuantPolicy::Dequantize => Ok(LinearWeight::Dense(dense(dtype)?)),
            QuantPolicy::Blocks => {
                let qt = self.qtensor(hf, device)?;
                match block_format(qt.dtype()) {
                    Some(f) => {
                        let qt = gguf::unpermute_blocks(hf, qt, out, inp, permute)?;
                        let data = qt.data()?.into_owned();
                        Ok(LinearWeight::Blocks(Arc::new(BlockMatrix::new(
                            f, out, inp, data,
                        )?)))
                    }
                    None => Ok(LinearWeight::Dense(dense(dtype)?)),
                }
            }
            QuantPolicy::Requantize(q) => {
                let t = dense(DType::F32)?;
                if !inp.is_multiple_of(q.block_size()) {
                    return Ok(LinearWeight::Dense(t.to_dtype(dtype)?));
                }
                let qt = QTensor::quantize(&t, q)?;
                Ok(match block_format(q) {
                    Some(f) => LinearWeight::Blocks(Arc::new(BlockMatrix::new(
                        f,
                        out,
                        inp,
                        qt.data()?.into_owned(),
                    )?)),
                    None => LinearWeight::Quant(QMatMul::from_qtensor(qt)?),
                })
            }
            QuantPolicy::Keep => {
                let qt = self.qtensor(hf, device)?;
                let qt = gguf::unpermute_blocks(hf, qt, out, inp, permute)?;
                Ok(LinearWeight::Quant(QMatMul::from_qtensor(qt)?))
            }
        }
    }
}

/// Checks the config against the weights' presence for tied embeddings (some HF configs say
/// untied yet ship no `lm_head`).
pub(crate) fn lm_head_is_tied(cfg: &ModelConfig, src: &WeightSource) -> bool {
    cfg.tie_word_embeddings || !src.contains("lm_head.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several weights of one input (dense and blocks mixed, as Q/K/V or gate/up) give what
    /// each gives alone, for row counts below and above the gemm's thresholds.
    #[test]
    fn forward_many_matches_each_forward() {
        let dev = candle_core::Device::Cpu;
        let (k, n_blocks) = (64, 40);
        let dense_a = LinearWeight::Dense(Tensor::randn(0f32, 1.0, (48, k), &dev).unwrap());
        let dense_b = LinearWeight::Dense(Tensor::randn(0f32, 1.0, (16, k), &dev).unwrap());
        let w = Tensor::randn(0f32, 1.0, (n_blocks, k), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let blocks = LinearWeight::Blocks(Arc::new(
            BlockMatrix::new(
                BlockFormat::Q4_1,
                n_blocks,
                k,
                q.data().unwrap().into_owned(),
            )
            .unwrap(),
        ));
        let ws = [&dense_a, &blocks, &dense_b];
        for m in [3, 20, 45] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let got = LinearWeight::forward_many(&ws, &x).unwrap();
            assert_eq!(got.len(), 3);
            for (w, g) in ws.iter().zip(&got) {
                let want = w.forward(&x).unwrap();
                assert_eq!(g.dims(), want.dims());
                let d = crate::testing::max_abs_diff(g, &want);
                assert!(d < 1e-4, "{m} rows: max |diff| {d}");
            }
        }
    }

    /// Block weights give the dense product of their dequantized values on both paths: the
    /// kernel (up to `BLOCK_KERNEL_MAX_ROWS` rows) and dequantize + gemm (more rows).
    #[test]
    fn block_weights_match_their_dense_values() {
        let dev = candle_core::Device::Cpu;
        let w = (Tensor::randn(0f32, 1.0, (40, 64), &dev).unwrap() + 0.2).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let blocks = LinearWeight::Blocks(Arc::new(
            BlockMatrix::new(BlockFormat::Q4_1, 40, 64, q.data().unwrap().into_owned()).unwrap(),
        ));
        let dense = LinearWeight::Dense(q.dequantize(&dev).unwrap());
        for rows in [1, 3, BLOCK_KERNEL_MAX_ROWS, BLOCK_KERNEL_MAX_ROWS + 1, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
            let a = blocks.forward(&x).unwrap();
            let b = dense.forward(&x).unwrap();
            assert_eq!(a.dims(), &[rows, 40]);
            let diff: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-4, "{rows} rows: max |diff| {diff}");
        }
        assert_eq!(
            blocks.dense().unwrap().to_vec2::<f32>().unwrap(),
            q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap()
        );
    }

    /// The kernels' block decoding is exactly candle's `QTensor::dequantize` (the claim the
    /// kernels crate cannot test without candle), and their reference quantizer writes the
    /// same blocks as candle's.
    #[test]
    fn block_matrix_matches_candle_quantization() {
        let dev = candle_core::Device::Cpu;
        let w = (Tensor::randn(0f32, 1.0, (5, 96), &dev).unwrap() + 0.3).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        for g in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, g).unwrap();
            let f = block_format(g).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let bm = BlockMatrix::new(f, 5, 96, bytes.clone()).unwrap();
            let want: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(bm.dequantize(), want, "{g:?}: decode");
            let ours = BlockMatrix::quantize(f, 5, 96, &wv).unwrap();
            assert_eq!(ours.dequantize(), want, "{g:?}: quantize");
        }
    }

    /// The routing rule: few rows to the weight-left form or the block kernel, many rows to
    /// the gemm where this CPU has it, and forward_many shares x only when every weight
    /// routes to the gemm.
    #[test]
    fn routes_follow_the_row_thresholds() {
        let dev = candle_core::Device::Cpu;
        let dense = LinearWeight::Dense(Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap());
        let q = QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let blocks = LinearWeight::Blocks(Arc::new(
            BlockMatrix::new(BlockFormat::Q8_0, 8, 64, q.data().unwrap().into_owned()).unwrap(),
        ));
        let x = |rows: usize| Tensor::zeros((rows, 64), DType::F32, &dev).unwrap();
        let many = if gemm::available() {
            Route::Gemm
        } else {
            Route::DenseMatmul
        };
        assert_eq!(dense.route(&x(1)).unwrap(), Route::DenseMatmul);
        assert_eq!(dense.route(&x(SMALL_ROWS)).unwrap(), Route::DenseWeightLeft);
        assert_eq!(dense.route(&x(SMALL_ROWS + 1)).unwrap(), many);
        assert_eq!(
            blocks.route(&x(BLOCK_KERNEL_MAX_ROWS)).unwrap(),
            Route::BlockRows
        );
        let many = if gemm::available() {
            Route::Gemm
        } else {
            Route::BlockDequantized
        };
        assert_eq!(blocks.route(&x(BLOCK_KERNEL_MAX_ROWS + 1)).unwrap(), many);
    }
}
