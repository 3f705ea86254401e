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

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::batch::{Prepared, SeqStep, StepLogits};
use crate::config::{Architecture, ModelConfig};
use crate::error::{read_json, ModelError, Result};
use crate::kv::KvStore;
use crate::lora::{LoraAdapter, Module};
use crate::ops::{self, InPlace};
use crate::rope::Rope;
use crate::weights::{lm_head_is_tied, LinearWeight, Permute, QuantPolicy, WeightSource};

/// The additive causal mask [rows, keys] for queries at positions `first ..first + rows` over
/// keys at positions `0 ..keys`: 0 where the key is visible (position <= the query's),
/// -inf elsewhere. Every attention path that masks (serving and training) builds it here.
pub fn causal_mask(first: usize, rows: usize, keys: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..rows)
        .flat_map(|j| {
            (0..keys).map(move |t| {
                if t <= first + j {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (rows, keys), device)?)
}

/// Which attention kernel a step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// For decode-like steps (every sequence brings fewer than [`FLASH_MAX_QUERY`] tokens) on
    /// the CPU: the paged kernel for f32, candle's varlen flash kernel for f16. Other steps in
    /// f32 on an AVX-512 CPU: alora's flash kernel (`flash.rs`). The matmul path otherwise.
    Auto,
    /// Per-sequence matmul + mask + softmax: any device and dtype.
    Reference,
    /// The CPU paged kernel for every step (f32 on the CPU only; tests).
    Paged,
    /// The CPU flash kernel for every step (f32 on AVX-512 CPUs, head_dim 16/32/64/128; tests).
    Flash,
}

/// Longest per-sequence query chunk that still goes to the CPU flash kernel in `Auto` mode.
pub const FLASH_MAX_QUERY: usize = 32;

/// Whether [`AttentionImpl::Flash`] runs on this CPU for this head size (AVX-512; head_dim
/// 16, 32, 64 or 128).
pub fn flash_available(head_dim: usize) -> bool {
    alora_kernels::flash::available(head_dim)
}

/// A projection with its base weight; LoRA factors come from the step's adapters.
#[derive(Debug)]
pub struct Proj {
    pub weight: LinearWeight,
    layer: usize,
    module: Module,
}

impl Proj {
    /// `x W^T`, plus each adapter's delta on the rows it adapts.
    fn forward(&self, x: &Tensor, groups: &[(Arc<LoraAdapter>, Tensor)]) -> Result<Tensor> {
        self.add_lora(self.weight.forward(x)?, x, groups)
    }

    /// [`forward`](Self::forward) for several projections of the same input (their base
    /// products in one gemm call: `LinearWeight::forward_many`).
    fn forward_many<const N: usize>(
        projs: [&Proj; N],
        x: &Tensor,
        groups: &[(Arc<LoraAdapter>, Tensor)],
    ) -> Result<[Tensor; N]> {
        let ws = projs.map(|p| &p.weight);
        let ys = LinearWeight::forward_many(&ws, x)?;
        let mut out = Vec::with_capacity(N);
        for (p, y) in projs.iter().zip(ys) {
            out.push(p.add_lora(y, x, groups)?);
        }
        Ok(out.try_into().expect("one output per projection"))
    }

    /// `y` plus each adapter's delta `x A^T B^T * scaling` on the rows it adapts.
    fn add_lora(
        &self,
        mut y: Tensor,
        x: &Tensor,
        groups: &[(Arc<LoraAdapter>, Tensor)],
    ) -> Result<Tensor> {
        for (adapter, rows) in groups {
            let Some(p) = adapter.pair(self.layer, self.module) else {
                continue;
            };
            // PEFT computes the delta in f32 and adds it to the base output.
            let xs = x.index_select(rows, 0)?.to_dtype(DType::F32)?;
            let delta = xs.matmul(&p.a_t)?.matmul(&p.b_t)?.affine(p.scaling, 0.0)?;
            y = if y.dtype() == DType::F32 {
                y.index_add(rows, &delta, 0)?
            } else {
                let sum = (y.index_select(rows, 0)?.to_dtype(DType::F32)? + delta)?;
                let sum = sum.to_dtype(y.dtype())?;
                let old = y.index_select(rows, 0)?;
                y.index_add(rows, &(sum - old)?, 0)?
            };
        }
        Ok(y)
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

#[derive(Debug)]
struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

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
        &self.proj[Module::ALL
            .iter()
            .position(|x| *x == m)
            .expect("every module is listed")]
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

/// The step context every layer reads.
struct StepCtx<'a> {
    prep: &'a Prepared,
    /// The step's geometry as the attention kernels read it, checked once per step.
    attn: alora_kernels::AttnBatch<'a>,
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
        let proj = |layer: usize, module: Module, permute: Permute| -> Result<Proj> {
            let (inp, out) = module.dims(&cfg);
            let parent = match module {
                Module::Q | Module::K | Module::V | Module::O => "self_attn",
                _ => "mlp",
            };
            let name = format!("model.layers.{layer}.{parent}.{}.weight", module.name());
            Ok(Proj {
                weight: src.linear(&name, out, inp, dtype, device, permute)?,
                layer,
                module,
            })
        };
        let (qp, kp) = if gguf {
            (
                Permute::Heads(cfg.num_heads),
                Permute::Heads(cfg.num_kv_heads),
            )
        } else {
            (Permute::None, Permute::None)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let _span = tracing::debug_span!("load_layer", l).entered();
            layers.push(Layer {
                input_layernorm: dense(&format!("model.layers.{l}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: dense(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                self_attn: Attention {
                    q_proj: proj(l, Module::Q, qp)?,
                    k_proj: proj(l, Module::K, kp)?,
                    v_proj: proj(l, Module::V, Permute::None)?,
                    o_proj: proj(l, Module::O, Permute::None)?,
                },
                mlp: Mlp {
                    gate_proj: proj(l, Module::Gate, Permute::None)?,
                    up_proj: proj(l, Module::Up, Permute::None)?,
                    down_proj: proj(l, Module::Down, Permute::None)?,
                },
            });
        }
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

    /// One step over a ragged batch: writes the new tokens' K/V into their slots and returns
    /// logits (f32) for each sequence's last token, or all its new tokens when asked.
    pub fn forward(&self, seqs: &[SeqStep<'_>], kv: &KvStore) -> Result<StepLogits> {
        // The step runs on a rayon worker (the caller waits once), so the kernels' parallel
        // loops (block matmuls, paged attention: ~240 per decode step) fork from a worker
        // instead of each one parking the calling thread and waking it again: a SmolLM2 decode
        // step went from 15.9 to 14.8 ms on 2 cores (BENCHMARKS.md).
        rayon::scope(|_| self.forward_on_worker(seqs, kv))
    }

    fn forward_on_worker(&self, seqs: &[SeqStep<'_>], kv: &KvStore) -> Result<StepLogits> {
        if seqs.is_empty() {
            return Err(ModelError::Batch("empty batch".into()));
        }
        if kv.dtype() != self.dtype {
            return Err(ModelError::Batch(format!(
                "KV store is {:?}, model is {:?}",
                kv.dtype(),
                self.dtype
            )));
        }
        let prep = Prepared::new(seqs, kv, self.rope.max_positions(), &self.device)?;
        let (cos, sin) = self.rope.gather(&prep.positions)?;
        let kv_shape = (prep.num_tokens, self.cfg.num_kv_heads, self.cfg.head_dim);
        let write_idx = prep
            .write_slots
            .reshape((prep.num_tokens, 1, 1))?
            .broadcast_as(kv_shape)?
            .contiguous()?;
        let attn = alora_kernels::AttnBatch::new(
            &prep.seqlens_q,
            &prep.seqlens_k,
            &prep.start_pos,
            &prep.gather_slots_host,
        )?;
        let ctx = StepCtx {
            prep: &prep,
            attn,
            cos,
            sin,
            write_idx,
            kv,
        };

        let mut x = self.embed_tokens.index_select(&prep.ids, 0)?;
        if self.cfg.architecture == Architecture::Granite {
            x = x.affine(self.cfg.embedding_multiplier, 0.0)?;
        }
        // Each residual add is fused with the RMS norm after it (the next layer's input norm;
        // the last layer's add stands alone: the final norm runs on the logit rows only).
        let mut h = match self.layers.first() {
            Some(first) => self.rms_norm(&x, &first.input_layernorm)?,
            None => x.clone(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let _span = tracing::trace_span!("layer", l).entered();
            (x, h) = self.layer_forward(l, layer, &x, &h, &ctx)?;
        }
        let x = x.index_select(&prep.logit_rows, 0)?;
        let x = self.rms_norm(&x, &self.norm)?;
        let mut logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        if self.cfg.logits_scaling != 1.0 {
            logits = logits.affine(1.0 / self.cfg.logits_scaling, 0.0)?;
        }
        Ok(StepLogits {
            logits,
            rows: prep.rows.clone(),
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

    fn attention_forward(
        &self,
        l: usize,
        a: &Attention,
        h: &Tensor,
        ctx: &StepCtx<'_>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let n = ctx.prep.num_tokens;
        let groups = &ctx.prep.lora_groups;
        let [q, k, v] = Proj::forward_many([&a.q_proj, &a.k_proj, &a.v_proj], h, groups)?;
        let q = q.reshape((n, c.num_heads, c.head_dim))?;
        let k = k.reshape((n, c.num_kv_heads, c.head_dim))?;
        let v = v.reshape((n, c.num_kv_heads, c.head_dim))?;
        let q = Rope::apply(&q, &ctx.cos, &ctx.sin)?;
        let k = Rope::apply(&k, &ctx.cos, &ctx.sin)?;
        ctx.kv.write(l, &ctx.write_idx, &k, &v)?;
        let decode_like = self.attention == AttentionImpl::Auto
            && self.device.is_cpu()
            && ctx.prep.seqlens_q.iter().all(|&n| n < FLASH_MAX_QUERY);
        let shape = alora_kernels::Shape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: c.attention_scale as f32,
        };
        if self.attention == AttentionImpl::Paged || (decode_like && self.dtype == DType::F32) {
            let (kp, vp) = ctx.kv.pools(l);
            let out = ops::attention_in_place(InPlace::Paged, &q, kp, vp, &ctx.attn, &shape)?
                .to_dtype(self.dtype)?
                .reshape((n, c.num_heads * c.head_dim))?;
            return a.o_proj.forward(&out, groups);
        }
        let flash_runs =
            self.device.is_cpu() && self.dtype == DType::F32 && flash_available(c.head_dim);
        if self.attention == AttentionImpl::Flash && !flash_runs {
            return Err(ModelError::Batch(format!(
                "flash attention needs f32 on an AVX-512 CPU and head_dim 16, 32, 64 or 128 \
                 (head_dim {})",
                c.head_dim
            )));
        }
        if flash_runs && matches!(self.attention, AttentionImpl::Auto | AttentionImpl::Flash) {
            let (kp, vp) = ctx.kv.pools(l);
            let out = ops::attention_in_place(InPlace::Flash, &q, kp, vp, &ctx.attn, &shape)?
                .reshape((n, c.num_heads * c.head_dim))?;
            return a.o_proj.forward(&out, groups);
        }
        let (kc, vc) = ctx.kv.gather(l, &ctx.prep.gather_slots)?;
        let use_flash = decode_like && self.dtype == DType::F16;
        let out = if use_flash {
            let p = ctx.prep;
            let sq: Vec<u32> = p.seqlens_q.iter().map(|&x| x as u32).collect();
            let sk: Vec<u32> = p.seqlens_k.iter().map(|&x| x as u32).collect();
            candle_nn::attention::flash_attn_varlen_cpu(
                &q,
                &kc,
                &vc,
                None,
                &Tensor::new(sq.as_slice(), &self.device)?,
                &Tensor::new(sk.as_slice(), &self.device)?,
                p.seqlens_q.iter().copied().max().unwrap_or(0),
                p.seqlens_k.iter().copied().max().unwrap_or(0),
                c.attention_scale as f32,
                true,
                None,
                None,
            )?
        } else {
            self.reference_attention(&q, &kc, &vc, ctx.prep)?
        };
        let out = out.reshape((n, c.num_heads * c.head_dim))?;
        a.o_proj.forward(&out, groups)
    }

    /// Causal attention per sequence with plain ops; q [N, Hq, D], k/v [T, Hk, D].
    ///
    /// Queries go in blocks of `attention_block` rows: a block only computes scores against the
    /// keys it can see (causal), which halves the work of a long prefill and keeps the score
    /// matrix at [Hk, g * block, keys] instead of [Hk, g * N, keys].
    fn reference_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        p: &Prepared,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (hk, d) = (c.num_kv_heads, c.head_dim);
        let g = c.num_heads / hk;
        let (mut qo, mut ko) = (0, 0);
        let mut outs = Vec::with_capacity(p.seqlens_q.len());
        for (i, (&nq, &nk)) in p.seqlens_q.iter().zip(&p.seqlens_k).enumerate() {
            let start = p.start_pos[i];
            // [nq, Hq, D] -> [Hk, g, nq, D]: query head h reads KV head h / g (HF repeat_kv).
            let qi = q
                .narrow(0, qo, nq)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)?;
            let qi = qi.reshape((hk, g, nq, d))?;
            let ki = k
                .narrow(0, ko, nk)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)?;
            let vi = v
                .narrow(0, ko, nk)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)?;
            let mut blocks = Vec::with_capacity(nq.div_ceil(self.attention_block));
            let mut j0 = 0;
            while j0 < nq {
                let nb = (nq - j0).min(self.attention_block);
                // Query j (position start + j) sees keys 0 ..= start + j.
                let visible = start + j0 + nb;
                let qb = qi
                    .narrow(2, j0, nb)?
                    .contiguous()?
                    .reshape((hk, g * nb, d))?;
                let kb = ki.narrow(1, 0, visible)?.contiguous()?;
                let vb = vi.narrow(1, 0, visible)?.contiguous()?;
                let mut scores =
                    (qb.matmul(&kb.t()?)? * c.attention_scale)?.reshape((hk, g, nb, visible))?;
                if nb > 1 {
                    let mask = causal_mask(start + j0, nb, visible, &self.device)?;
                    scores = scores.broadcast_add(&mask)?;
                }
                let probs =
                    candle_nn::ops::softmax_last_dim(&scores.reshape((hk, g * nb, visible))?)?;
                blocks.push(probs.matmul(&vb)?.reshape((hk, g, nb, d))?);
                j0 += nb;
            }
            let o = Tensor::cat(&blocks, 2)?; // [Hk, g, nq, D]
            let o = o
                .reshape((c.num_heads, nq, d))?
                .transpose(0, 1)?
                .to_dtype(self.dtype)?;
            outs.push(o);
            qo += nq;
            ko += nk;
        }
        Ok(Tensor::cat(&outs, 0)?.contiguous()?)
    }
}

/// Reads `config.json` of an HF model directory without loading weights.
pub fn read_hf_config(dir: &Path) -> Result<ModelConfig> {
    let v: serde_json::Value = read_json(&dir.join("config.json"))?;
    ModelConfig::from_hf_json(&v.to_string())
}
