//! The aLoRA-aware decoder (Llama and Granite 3.x) over a ragged batch with paged KV.
//!
//! One step runs every token of every sequence through embeddings, norms, projections and MLP
//! at once ([N, hidden] rows); attention runs per sequence over its cached and new KV; the LoRA
//! delta touches only the rows at or past each sequence's activation start, grouped by adapter.
//!
//! ```text
//!   rows:  | seq 0: 5 prefill tokens (base) | seq 1: 1 decode token (aLoRA, adapted) | seq 2: ...
//!   q/k/v = x W^T for all rows;  += LoRA delta on rows of seq 1 (and any row p >= s)
//!   RoPE by absolute position -> write K/V to slots -> gather each sequence's slots -> attention
//! ```
//!
//! **Invariant:** rows before a sequence's activation start never see an adapter, so their K/V
//! is bit-for-bit what the base model writes for the same batch (tested).
//!
//! Here: the model and its step; `layer.rs`: a layer's weights (`Layer::load`) and the
//! projections with their LoRA delta; `attention.rs`: which attention path a step takes (the
//! one place that chooses a kernel) and the reference (matmul) path.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::batch::{Prepared, SeqStep, StepLogits};
use crate::config::{Architecture, ModelConfig};
use crate::error::{read_json, ModelError, Result};
use crate::kv::KvStore;
use crate::lora::Module;
use crate::rope::Rope;
use crate::weights::{lm_head_is_tied, LinearWeight, Permute, QuantPolicy, WeightSource};

mod attention;
mod layer;

pub use attention::{causal_mask, flash_available, AttentionImpl, FLASH_MAX_QUERY};
use layer::{Layer, Proj};

/// A causal LM whose KV lives in a [`KvStore`] outside it.
#[derive(Debug)]
pub struct CausalLm {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: LinearWeight,
    rope: Rope,
    device: Device,
    dtype: DType,
    attention: AttentionImpl,
    /// Query rows per block in the matmul attention path.
    attention_block: usize,
}

/// One layer's weights as dense f32 tensors (see [`CausalLm::dense_weights`]).
#[derive(Debug, Clone)]
pub struct DenseLayer {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    /// Projection weights [out, in], indexed in [`Module::ALL`] order.
    pub proj: Vec<Tensor>,
}

impl DenseLayer {
    pub fn weight(&self, m: Module) -> &Tensor {
        &self.proj[m.index()]
    }
}

/// The model's weights as dense f32 tensors: what a differentiable forward (training) needs,
/// since quantized matmuls cut the gradient.
#[derive(Debug, Clone)]
pub struct DenseWeights {
    pub embed_tokens: Tensor,
    pub layers: Vec<DenseLayer>,
    pub norm: Tensor,
    /// [vocab, hidden]; the embedding matrix when tied.
    pub lm_head: Tensor,
}

/// A step between its layers ([`CausalLm::begin`]): the batch as the layers read it, the
/// residual stream and its norm, and the next layer to run. Its K/V writes so far are in the
/// store; the sequences' blocks must stay theirs until it is finished or dropped.
pub struct StepInProgress {
    prep: Prepared,
    attn_path: attention::AttnPath,
    cos: Tensor,
    sin: Tensor,
    write_idx: Tensor,
    x: Tensor,
    h: Tensor,
    next_layer: usize,
}

impl std::fmt::Debug for StepInProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepInProgress")
            .field("tokens", &self.prep.num_tokens)
            .field("layers_done", &self.next_layer)
            .finish_non_exhaustive()
    }
}

impl StepInProgress {
    /// Layers run so far.
    pub fn layers_done(&self) -> usize {
        self.next_layer
    }
}

/// The step context every layer reads.
struct StepCtx<'a> {
    prep: &'a Prepared,
    /// The step's geometry as the attention kernels read it, checked once per step.
    attn: alora_kernels::AttnBatch<'a>,
    /// The attention path of every layer in this step, chosen once.
    attn_path: attention::AttnPath,
    cos: Tensor,
    sin: Tensor,
    /// Write slots expanded to [N, kv_heads, head_dim].
    write_idx: Tensor,
    kv: &'a KvStore,
}

impl CausalLm {
    /// Loads an HF model directory (`config.json` + safetensors).
    pub fn load_hf(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(crate::error::io_err(&dir.join("config.json")))?;
        let cfg = ModelConfig::from_hf_json(&text)?;
        let src = WeightSource::safetensors(dir)?;
        Self::from_source(cfg, &src, dtype, device, false)
    }

    /// Loads a GGUF file; returns the metadata too (tokenizer, chat template).
    pub fn load_gguf(
        path: &Path,
        policy: QuantPolicy,
        device: &Device,
    ) -> Result<(Self, candle_core::quantized::gguf_file::Content)> {
        let src = WeightSource::gguf(path, policy)?;
        let cfg = ModelConfig::from_gguf(src.gguf_content().expect("gguf source"))?;
        let model = Self::from_source(cfg, &src, DType::F32, device, true)?;
        let WeightSource::Gguf { content, .. } = src else {
            unreachable!()
        };
        Ok((model, content))
    }

    fn from_source(
        cfg: ModelConfig,
        src: &WeightSource,
        dtype: DType,
        device: &Device,
        gguf: bool,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let dense =
            |name: &str, shape: &[usize]| src.dense(name, shape, dtype, device, Permute::None);
        let layers = (0..cfg.num_layers)
            .map(|l| Layer::load(src, &cfg, l, dtype, device, gguf))
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = dense("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if lm_head_is_tied(&cfg, src) {
            match src.linear(
                "model.embed_tokens.weight",
                cfg.vocab_size,
                h,
                dtype,
                device,
                Permute::None,
            )? {
                // Share the embedding's memory when both are dense.
                LinearWeight::Dense(_) => LinearWeight::Dense(embed_tokens.clone()),
                q => q,
            }
        } else {
            src.linear(
                "lm_head.weight",
                cfg.vocab_size,
                h,
                dtype,
                device,
                Permute::None,
            )?
        };
        let norm = dense("model.norm.weight", &[h])?;
        let rope = Rope::new(&cfg, dtype, device)?;
        Ok(CausalLm {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            dtype,
            attention: AttentionImpl::Auto,
            attention_block: 128,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn set_attention(&mut self, a: AttentionImpl) {
        self.attention = a;
    }

    /// Query rows per block in the matmul attention path (default 128, the best of 32-512 measured
    /// on SmolLM2 at 2048 tokens; tests use small ones).
    pub fn set_attention_block(&mut self, rows: usize) {
        self.attention_block = rows.max(1);
    }

    /// The RoPE tables (cos/sin per position).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Every weight as a dense f32 tensor: shared with the model where it already is one,
    /// dequantized (a copy) where it is quantized.
    pub fn dense_weights(&self) -> Result<DenseWeights> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let p = [
                    &l.self_attn.q_proj,
                    &l.self_attn.k_proj,
                    &l.self_attn.v_proj,
                    &l.self_attn.o_proj,
                    &l.mlp.gate_proj,
                    &l.mlp.up_proj,
                    &l.mlp.down_proj,
                ];
                debug_assert!(p.iter().zip(Module::ALL).all(|(p, m)| p.module == m));
                Ok(DenseLayer {
                    input_layernorm: f32(&l.input_layernorm)?,
                    post_attention_layernorm: f32(&l.post_attention_layernorm)?,
                    proj: p
                        .iter()
                        .map(|p| Ok(p.weight.dense()?.to_dtype(DType::F32)?))
                        .collect::<Result<_>>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(DenseWeights {
            embed_tokens: f32(&self.embed_tokens)?,
            layers,
            norm: f32(&self.norm)?,
            lm_head: self.lm_head.dense()?.to_dtype(DType::F32)?,
        })
    }

    /// Positions the model can address (the RoPE table's length).
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// A KV store sized for this model.
    pub fn new_kv_store(&self, num_blocks: usize, block_size: usize) -> Result<KvStore> {
        KvStore::new(&self.cfg, num_blocks, block_size, self.dtype, &self.device)
    }

    /// A KV store whose K/V are kept as `dtype` (f32, f16 or bf16) whatever the model
    /// computes in: written rounded to it, read back widened (`--kv-cache-dtype`).
    pub fn new_kv_store_as(
        &self,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
    ) -> Result<KvStore> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Config(format!(
                "KV cache dtype {dtype:?}: f32, f16 or bf16"
            )));
        }
        KvStore::new(&self.cfg, num_blocks, block_size, dtype, &self.device)
    }

    /// One step over a ragged batch: writes the new tokens' K/V into their slots and returns
    /// logits (f32) for each sequence's last token, or all its new tokens when asked.
    pub fn forward(&self, seqs: &[SeqStep<'_>], kv: &KvStore) -> Result<StepLogits> {
        // The step runs on a rayon worker (the caller waits once), so the kernels' parallel
        // loops (block matmuls, paged attention: ~240 per decode step) fork from a worker
        // instead of each one parking the calling thread and waking it again: a SmolLM2 decode
        // step went from 15.9 to 14.8 ms on 2 cores (BENCHMARKS.md).
        rayon::scope(|_| {
            let mut step = self.begin_on_worker(seqs, kv)?;
            self.advance_on_worker(&mut step, kv, &mut |_| false)?;
            self.finish_on_worker(step)
        })
    }

    /// Starts a step that runs in slices: embeds the batch and prepares what every layer
    /// reads. [`CausalLm::advance`] runs its layers, [`CausalLm::finish`] gives the logits;
    /// together they compute exactly what [`CausalLm::forward`] does (the same ops in the same
    /// order), and other steps, on other sequences, may run between the slices. Every call
    /// for one step takes the same `kv`.
    pub fn begin(&self, seqs: &[SeqStep<'_>], kv: &KvStore) -> Result<StepInProgress> {
        rayon::scope(|_| self.begin_on_worker(seqs, kv))
    }

    /// Runs layers of `step` until all have run (true) or `yield_at(layers_done)`, asked
    /// before each layer, says to stop there (false). The caller sees to progress: a
    /// `yield_at` that always says stop runs nothing.
    pub fn advance(
        &self,
        step: &mut StepInProgress,
        kv: &KvStore,
        yield_at: &mut (dyn FnMut(usize) -> bool + Send),
    ) -> Result<bool> {
        rayon::scope(|_| self.advance_on_worker(step, kv, yield_at))
    }

    /// The logits of a step whose layers have all run.
    pub fn finish(&self, step: StepInProgress) -> Result<StepLogits> {
        rayon::scope(|_| self.finish_on_worker(step))
    }

    fn begin_on_worker(&self, seqs: &[SeqStep<'_>], kv: &KvStore) -> Result<StepInProgress> {
        if seqs.is_empty() {
            return Err(ModelError::Batch("empty batch".into()));
        }
        if !matches!(kv.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Batch(format!(
                "KV store is {:?}: f32, f16 or bf16",
                kv.dtype()
            )));
        }
        let prep = Prepared::new(seqs, kv, self.rope.max_positions(), &self.device)?;
        let (cos, sin) = self.rope.gather(&prep.positions)?;
        let write_idx = kv.expand_slots(&prep.write_slots)?;
        let attn_path = attention::AttnPath::choose(
            self.attention,
            &self.device,
            self.dtype,
            kv.dtype(),
            self.cfg.head_dim,
            &prep.seqlens_q,
        )?;
        let mut x = self.embed_tokens.index_select(&prep.ids, 0)?;
        if self.cfg.architecture == Architecture::Granite {
            x = x.affine(self.cfg.embedding_multiplier, 0.0)?;
        }
        // Each residual add is fused with the RMS norm after it (the next layer's input norm;
        // the last layer's add stands alone: the final norm runs on the logit rows only).
        let h = match self.layers.first() {
            Some(first) => self.rms_norm(&x, &first.input_layernorm)?,
            None => x.clone(),
        };
        Ok(StepInProgress {
            prep,
            attn_path,
            cos,
            sin,
            write_idx,
            x,
            h,
            next_layer: 0,
        })
    }

    fn advance_on_worker(
        &self,
        step: &mut StepInProgress,
        kv: &KvStore,
        yield_at: &mut (dyn FnMut(usize) -> bool + Send),
    ) -> Result<bool> {
        let StepInProgress {
            prep,
            attn_path,
            cos,
            sin,
            write_idx,
            x,
            h,
            next_layer,
        } = step;
        // The kernels' view of the batch borrows `prep`, so each slice makes it (and checks
        // it: once for a whole forward, as before slicing).
        let ctx = StepCtx {
            prep,
            attn: alora_kernels::AttnBatch::new(
                &prep.seqlens_q,
                &prep.seqlens_k,
                &prep.start_pos,
                &prep.gather_slots_host,
            )?,
            attn_path: *attn_path,
            cos: cos.clone(),
            sin: sin.clone(),
            write_idx: write_idx.clone(),
            kv,
        };
        while let Some(layer) = self.layers.get(*next_layer) {
            if yield_at(*next_layer) {
                return Ok(false);
            }
            let l = *next_layer;
            let _span = tracing::trace_span!("layer", l).entered();
            (*x, *h) = self.layer_forward(l, layer, x, h, &ctx)?;
            *next_layer += 1;
        }
        Ok(true)
    }

    fn finish_on_worker(&self, step: StepInProgress) -> Result<StepLogits> {
        if step.next_layer < self.layers.len() {
            return Err(ModelError::Batch(format!(
                "step finished after {} of {} layers",
                step.next_layer,
                self.layers.len()
            )));
        }
        let x = step.x.index_select(&step.prep.logit_rows, 0)?;
        let x = self.rms_norm(&x, &self.norm)?;
        let mut logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        if self.cfg.logits_scaling != 1.0 {
            logits = logits.affine(1.0 / self.cfg.logits_scaling, 0.0)?;
        }
        Ok(StepLogits {
            logits,
            rows: step.prep.rows,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm(x, w, self.cfg.rms_norm_eps)
    }

    /// `x + branch * residual_multiplier` and its RMS norm with `w`.
    fn add_rms_norm(&self, x: &Tensor, branch: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &self.cfg;
        crate::ops::add_rms_norm(x, branch, c.residual_multiplier, w, c.rms_norm_eps)
    }

    /// Layer `l` on the residual stream `x` and its input-normed `h`; returns the new stream
    /// and, except after the last layer, its norm for the next layer (else the stream again).
    fn layer_forward(
        &self,
        l: usize,
        layer: &Layer,
        x: &Tensor,
        h: &Tensor,
        ctx: &StepCtx<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let groups = &ctx.prep.lora_groups;
        let a = self.attention_forward(l, &layer.self_attn, h, ctx)?;
        let (x, h) = self.add_rms_norm(x, &a, &layer.post_attention_layernorm)?;
        let m = &layer.mlp;
        let [gate, up] = Proj::forward_many([&m.gate_proj, &m.up_proj], &h, groups)?;
        let mlp = m
            .down_proj
            .forward(&crate::ops::silu_mul(&gate, &up)?, groups)?;
        match self.layers.get(l + 1) {
            Some(next) => self.add_rms_norm(&x, &mlp, &next.input_layernorm),
            None => {
                let x = self.cfg.residual(&x, mlp)?;
                Ok((x.clone(), x))
            }
        }
    }
}

/// Reads `config.json` of an HF model directory without loading weights.
pub fn read_hf_config(dir: &Path) -> Result<ModelConfig> {
    let v: serde_json::Value = read_json(&dir.join("config.json"))?;
    ModelConfig::from_hf_json(&v.to_string())
}
