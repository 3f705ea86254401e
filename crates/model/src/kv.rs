//! KV storage: per-layer K and V pools addressed by the cache crate's block ids.
//!
//! ```text
//!   pool (one per layer, K and V alike): [num_blocks * block_size, kv_heads, head_dim]
//!   slot of position p in a sequence with block table T:  T[p / bs] * bs + p % bs
//! ```
//!
//! New K/V rows are scattered into their slots in place (`Tensor::scatter_set`); attention
//! reads a sequence's context by gathering its slots (`index_select`), one copy of the live
//! context per layer per step. BENCHMARKS.md records what that gather costs.
//!
//! **Invariant:** only the engine thread that owns the model touches a `KvStore`; the block
//! manager (cache crate) decides which slots a sequence may write.

use alora_cache::BlockId;
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;

#[derive(Debug)]
pub struct KvStore {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
}

impl KvStore {
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim);
        let mut k = Vec::with_capacity(cfg.num_layers);
        let mut v = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(KvStore {
            k,
            v,
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn dtype(&self) -> DType {
        self.k[0].dtype()
    }

    /// The slot of absolute position `pos` in a sequence with `table`.
    pub fn slot(&self, table: &[BlockId], pos: usize) -> Option<u32> {
        let b = table.get(pos / self.block_size)?;
        if b.index() >= self.num_blocks {
            return None;
        }
        Some((b.index() * self.block_size + pos % self.block_size) as u32)
    }

    /// Writes rows `k`, `v` ([N, kv_heads, head_dim]) of layer `layer` into `slots`
    /// (expanded to [N, kv_heads, head_dim] u32 by the caller, once per step).
    /// Rows in another dtype than the store's are rounded to it (round to nearest even).
    pub(crate) fn write(&self, layer: usize, slots: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let dt = self.dtype();
        self.k[layer].scatter_set(slots, &k.to_dtype(dt)?.contiguous()?, 0)?;
        self.v[layer].scatter_set(slots, &v.to_dtype(dt)?.contiguous()?, 0)?;
        Ok(())
    }

    /// Copies the K/V rows at slots `src` to slots `dst`, in every layer (a partial prefix
    /// hit's rows into the block that continues them). Each layer reads all of `src` before it
    /// writes any of `dst`.
    pub fn copy_slots(&self, src: &[u32], dst: &[u32]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(crate::error::ModelError::Batch(format!(
                "copy of {} slots into {}",
                src.len(),
                dst.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        let dev = self.k[0].device();
        let src = Tensor::new(src, dev)?;
        let dst = self.expand_slots(&Tensor::new(dst, dev)?)?;
        for l in 0..self.k.len() {
            let (k, v) = self.gather(l, &src)?;
            self.k[l].scatter_set(&dst, &k, 0)?;
            self.v[l].scatter_set(&dst, &v, 0)?;
        }
        Ok(())
    }

    /// Slots ([N] u32) expanded to the K/V row shape [N, kv_heads, head_dim], as
    /// `scatter_set` takes them (once per step for its writes).
    pub(crate) fn expand_slots(&self, slots: &Tensor) -> Result<Tensor> {
        let (_, heads, dim) = self.k[0].dims3()?;
        let n = slots.dim(0)?;
        Ok(slots
            .reshape((n, 1, 1))?
            .broadcast_as((n, heads, dim))?
            .contiguous()?)
    }

    /// K and V of `slots` ([T] u32): [T, kv_heads, head_dim] each.
    pub(crate) fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k[layer].index_select(slots, 0)?,
            self.v[layer].index_select(slots, 0)?,
        ))
    }

    /// One layer's K and V pools, [slots, kv_heads, head_dim] each.
    pub(crate) fn pools(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Raw K/V rows of one layer at the given slots; for tests that compare cache contents.
    pub fn read_slots(&self, layer: usize, slots: &[u32]) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::new(slots, self.k[layer].device())?;
        self.gather(layer, &idx)
    }
}
