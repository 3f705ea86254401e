//! One forward step over a ragged batch: what each sequence brings, and the index tensors the
//! model derives from it once per step.

use std::ops::Range;
use std::sync::Arc;

use alora_cache::BlockId;
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::kv::KvStore;
use crate::lora::LoraAdapter;

/// An adapter applied to one sequence from `activation_start` on.
#[derive(Debug, Clone)]
pub struct ActiveAdapter {
    pub adapter: Arc<LoraAdapter>,
    /// First adapted absolute position: aLoRA's s, 0 for a plain LoRA.
    pub activation_start: usize,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SeqStep<'a> {
    /// Tokens to compute this step (a prefill chunk, or one decode token).
    pub tokens: &'a [u32],
    /// Absolute position of `tokens[0]`: the number of tokens whose KV is already in the cache.
    pub start_pos: usize,
    /// `None`: the base model (also an aLoRA whose invocation was not found).
    pub adapter: Option<ActiveAdapter>,
    /// Blocks covering positions `0 .. start_pos + tokens.len()`.
    pub block_table: &'a [BlockId],
    /// Return logits for every new token rather than only the last.
    pub all_logits: bool,
}

/// Logits of a step: rows of one tensor, a range per sequence.
#[derive(Debug)]
pub struct StepLogits {
    /// [rows, vocab], f32.
    pub logits: Tensor,
    pub rows: Vec<Range<usize>>,
}

impl StepLogits {
    /// The last row of sequence `i`: [vocab].
    pub fn last(&self, i: usize) -> Result<Tensor> {
        let r = &self.rows[i];
        Ok(self.logits.get(r.end - 1)?)
    }

    /// All rows of sequence `i`: [n, vocab].
    pub fn seq(&self, i: usize) -> Result<Tensor> {
        let r = &self.rows[i];
        Ok(self.logits.narrow(0, r.start, r.len())?)
    }
}

/// Index tensors for a step, built once and shared by every layer.
/// The rows of a step that one adapter adapts, as candle's ops and the CPU kernel read them.
pub(crate) struct LoraRows {
    pub adapter: Arc<LoraAdapter>,
    pub rows: Tensor,
    pub host: Vec<u32>,
}

pub(crate) struct Prepared {
    pub ids: Tensor,
    pub positions: Tensor,
    /// [N] u32 slots to write; expanded to the K/V shape on first use.
    pub write_slots: Tensor,
    pub gather_slots: Tensor,
    /// The same slots on the host (the CPU paged attention walks them).
    pub gather_slots_host: Vec<u32>,
    pub seqlens_q: Vec<usize>,
    pub seqlens_k: Vec<usize>,
    pub start_pos: Vec<usize>,
    /// Per distinct adapter: the global rows it adapts.
    pub lora_groups: Vec<LoraRows>,
    pub logit_rows: Tensor,
    pub rows: Vec<Range<usize>>,
    pub num_tokens: usize,
}

impl Prepared {
    pub fn new(
        seqs: &[SeqStep<'_>],
        kv: &KvStore,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut write_slots = Vec::new();
        let mut gather_slots = Vec::new();
        let (mut seqlens_q, mut seqlens_k, mut start_pos) = (vec![], vec![], vec![]);
        let mut groups: Vec<(Arc<LoraAdapter>, Vec<u32>)> = Vec::new();
        let mut logit_rows = Vec::new();
        let mut rows = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::Batch(format!("sequence {i} has no tokens")));
            }
            let end = s.start_pos + s.tokens.len();
            if end > max_positions {
                return Err(ModelError::Batch(format!(
                    "sequence {i} reaches position {end}, past the model's {max_positions}"
                )));
            }
            let base_row = ids.len();
            let slot = |p: usize| {
                kv.slot(s.block_table, p).ok_or_else(|| {
                    ModelError::Batch(format!(
                        "sequence {i}: block table does not cover position {p}"
                    ))
                })
            };
            for (j, &t) in s.tokens.iter().enumerate() {
                let p = s.start_pos + j;
                ids.push(t);
                positions.push(p as u32);
                write_slots.push(slot(p)?);
            }
            for p in 0..end {
                gather_slots.push(slot(p)?);
            }
            if let Some(a) = &s.adapter {
                let adapted: Vec<u32> = (0..s.tokens.len())
                    .filter(|j| s.start_pos + j >= a.activation_start)
                    .map(|j| (base_row + j) as u32)
                    .collect();
                if !adapted.is_empty() {
                    match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &a.adapter)) {
                        Some((_, v)) => v.extend(adapted),
                        None => groups.push((a.adapter.clone(), adapted)),
                    }
                }
            }
            let out_start = logit_rows.len();
            if s.all_logits {
                logit_rows.extend((base_row..ids.len()).map(|r| r as u32));
            } else {
                logit_rows.push((ids.len() - 1) as u32);
            }
            rows.push(out_start..logit_rows.len());
            seqlens_q.push(s.tokens.len());
            seqlens_k.push(end);
            start_pos.push(s.start_pos);
        }
        let n = ids.len();
        let lora_groups = groups
            .into_iter()
            .map(|(adapter, host)| {
                Ok(LoraRows {
                    adapter,
                    rows: Tensor::new(host.as_slice(), device)?,
                    host,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prepared {
            ids: Tensor::new(ids.as_slice(), device)?,
            positions: Tensor::new(positions.as_slice(), device)?,
            write_slots: Tensor::new(write_slots.as_slice(), device)?,
            gather_slots: Tensor::new(gather_slots.as_slice(), device)?,
            gather_slots_host: gather_slots,
            seqlens_q,
            seqlens_k,
            start_pos,
            lora_groups,
            logit_rows: Tensor::new(logit_rows.as_slice(), device)?,
            rows,
            num_tokens: n,
        })
    }
}
