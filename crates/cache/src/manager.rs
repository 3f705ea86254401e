//! What the scheduler calls: find a request's cached prefix, allocate blocks for what it still
//! has to compute, register blocks as they fill, free them.
//!
//! Life of a request's blocks:
//!
//! ```text
//!   lookup(prompt)        -> PrefixHit { blocks: [b7, b2], partial: (b5, 3 rows),
//!                                        num_computed_tokens: 32 + 3 }
//!   allocate(hit, key, n) -> SeqBlocks [b7, b2, b9, b4]   (hits touched, 2 new blocks)
//!   take_copy()           -> BlockCopy { src: b5, dst: b9, rows: 3 }
//!   ... model copies rows 0..3 of b5 into b9, then writes KV for tokens 35..n into b9, b4 ...
//!   commit(seq, tokens)   -> b9 (now full) registered under its hash; b4 not full yet
//!   grow(seq, n + 1)      -> another block when decode crosses a block boundary
//!   free(seq) / drop(seq) -> refs dropped tail first: b4, b9, b2, b7
//! ```
//!
//! The partial hit: the hash chain covers whole blocks, so a prompt that leaves it inside a
//! block (an aLoRA call on a conversation whose last block was part-filled) would recompute
//! that block's shared rows. Instead the block that holds them donates: the new request's first
//! new block gets a copy of those rows ([`BlockCopy`]) before its step writes the rest. A donor
//! can be free, and even handed out again by this same step's allocations: that is safe because
//! K/V only changes in a forward, and the runner makes every copy of a step before its forward.
//!
//! **Invariant:** only the manager mutates the pool; a [`SeqBlocks`] dropped without
//! [`KvCacheManager::free`] returns its blocks through a channel the manager drains on its next
//! call, so a request that is cancelled or errors out cannot leak blocks.

use std::sync::mpsc::{channel, Receiver, Sender};

use crate::config::CacheConfig;
use crate::hash::{AdapterKey, BlockHash, BlockHasher, RequestKey};
use crate::pool::{BlockId, BlockPool, StoredKey};

/// Counters for metrics. Token counts, not block counts, as vLLM reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Prompt tokens of admitted requests (vLLM's `prefix_cache_queries`).
    pub query_tokens: u64,
    /// Of those, tokens served from cached blocks (vLLM's `prefix_cache_hits`).
    pub hit_tokens: u64,
    /// Hit tokens of adapter requests that came from base-model blocks: aLoRA's reuse.
    pub adapter_hit_tokens_from_base: u64,
    /// Cached blocks whose memory was handed out again.
    pub evictions: u64,
}

/// The cached prefix of a prompt, found by [`KvCacheManager::lookup`]. It holds no references
/// until passed to [`KvCacheManager::allocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixHit {
    /// Whole blocks of the hash chain.
    pub blocks: Vec<BlockId>,
    /// Rows of the next block that another block holds: they are copied, not recomputed.
    pub partial: Option<PartialHit>,
    /// Tokens whose KV the hit holds: the whole blocks, then the partial rows.
    pub num_computed_tokens: usize,
    /// Of those, tokens held as base-model KV.
    pub num_base_tokens: usize,
    hashes: Vec<BlockHash>,
    num_query_tokens: usize,
    block_size: usize,
}

/// The leading `rows` rows of block `donor` are the rows a prompt wants right after its whole
/// block hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialHit {
    pub donor: BlockId,
    pub rows: usize,
    /// Of those, rows of base-model KV.
    pub base_rows: usize,
}

impl PrefixHit {
    /// Keeps what of the hit lies within the first `max_tokens` tokens (0: a miss): whole
    /// blocks, and the partial rows only if all of them fit.
    pub fn truncate(&mut self, max_tokens: usize) {
        let bs = self.block_size;
        let keep = (max_tokens / bs).min(self.blocks.len());
        let whole_base = self.num_base_tokens - self.partial.map_or(0, |p| p.base_rows);
        if keep < self.blocks.len() || max_tokens < self.num_computed_tokens {
            self.partial = None;
        }
        self.blocks.truncate(keep);
        self.hashes.truncate(keep);
        let partial = self.partial.map_or((0, 0), |p| (p.rows, p.base_rows));
        self.num_computed_tokens = keep * bs + partial.0;
        self.num_base_tokens = whole_base.min(keep * bs) + partial.1;
    }
}

/// Rows `0..rows` of block `src` are to be copied into block `dst` (all layers, K and V)
/// before the step that first writes `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
    pub rows: usize,
}

/// The blocks one sequence holds, in position order. Dropping it returns them to the pool.
#[derive(Debug)]
pub struct SeqBlocks {
    key: RequestKey,
    blocks: Vec<BlockId>,
    /// Hashes of the first `hashes.len()` blocks, which are full and registered (or were hits).
    hashes: Vec<BlockHash>,
    num_cached_tokens: usize,
    /// Tokens already listed as donated rows (from position 0).
    num_donated: usize,
    /// The partial hit's copy, until the runner takes it.
    copy: Option<BlockCopy>,
    release: Sender<Vec<BlockId>>,
}

impl SeqBlocks {
    /// Block table: block `i` holds positions `[i * block_size, (i + 1) * block_size)`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn key(&self) -> &RequestKey {
        &self.key
    }

    /// Prompt tokens that were served from the cache at admission.
    pub fn num_cached_tokens(&self) -> usize {
        self.num_cached_tokens
    }

    /// The copy a partial hit needs, once: the runner must make it before the sequence's first
    /// step runs (before any forward that writes K/V).
    pub fn take_copy(&mut self) -> Option<BlockCopy> {
        self.copy.take()
    }

    fn take_reversed(&mut self) -> Vec<BlockId> {
        let mut b = std::mem::take(&mut self.blocks);
        b.reverse();
        b
    }
}

impl Drop for SeqBlocks {
    fn drop(&mut self) {
        if !self.blocks.is_empty() {
            // The manager may be gone (shutdown); then nothing is left to leak into.
            let blocks = self.take_reversed();
            let _ = self.release.send(blocks);
        }
    }
}

/// Owner of the block pool and the hash chain. Single-threaded; the engine owns it.
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    hasher: BlockHasher,
    stats: CacheStats,
    release_tx: Sender<Vec<BlockId>>,
    release_rx: Receiver<Vec<BlockId>>,
}

impl KvCacheManager {
    pub fn new(config: CacheConfig, hasher: BlockHasher) -> Self {
        let (release_tx, release_rx) = channel();
        KvCacheManager {
            pool: BlockPool::new(config.num_blocks, config.block_size),
            hasher,
            stats: CacheStats::default(),
            release_tx,
            release_rx,
        }
    }

    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            evictions: self.pool.num_evictions(),
            ..self.stats
        }
    }

    /// Fraction of blocks held by requests (free cached blocks count as free).
    pub fn usage(&mut self) -> f64 {
        self.drain_released();
        let n = self.pool.num_blocks();
        if n == 0 {
            0.0
        } else {
            self.pool.num_used() as f64 / n as f64
        }
    }

    pub fn num_used_blocks(&mut self) -> usize {
        self.drain_released();
        self.pool.num_used()
    }

    /// The longest cached prefix of `tokens` under `key`: whole blocks along the hash chain,
    /// then the rows of the next block some block holds. Never the whole prompt: the last
    /// prompt token must still run to produce logits.
    pub fn lookup(&mut self, tokens: &[u32], key: &RequestKey) -> PrefixHit {
        self.drain_released();
        let bs = self.pool.block_size();
        let limit = tokens.len().saturating_sub(1);
        let max_blocks = limit / bs;
        let mut hit = PrefixHit {
            blocks: Vec::new(),
            partial: None,
            num_computed_tokens: 0,
            num_base_tokens: 0,
            hashes: Vec::new(),
            num_query_tokens: tokens.len(),
            block_size: bs,
        };
        let mut parent = None;
        for (i, chunk) in tokens.chunks_exact(bs).take(max_blocks).enumerate() {
            let extra = key.extra_key(i, bs);
            let h = self.hasher.hash_block(parent, chunk, &extra);
            let Some(id) = self.pool.get_cached(h, parent, chunk, &extra) else {
                break;
            };
            hit.blocks.push(id);
            hit.hashes.push(h);
            if extra.is_base() {
                hit.num_base_tokens += bs;
            }
            parent = Some(h);
        }
        let start = hit.blocks.len() * bs;
        hit.num_computed_tokens = start;
        let rest = &tokens[start..limit.min(start + bs)];
        if rest.is_empty() {
            return hit;
        }
        if let Some((donor, rows)) = self.pool.best_donor(parent, start, rest, key) {
            let base_rows = (start..start + rows)
                .filter(|&p| key.row_key(p).is_none())
                .count();
            hit.partial = Some(PartialHit {
                donor,
                rows,
                base_rows,
            });
            hit.num_computed_tokens += rows;
            hit.num_base_tokens += base_rows;
        }
        hit
    }

    /// Takes the hit's blocks and enough new ones to hold `num_tokens` positions in all, or
    /// returns `None` and changes nothing when the pool cannot (the caller waits or preempts).
    pub fn allocate(
        &mut self,
        hit: PrefixHit,
        key: RequestKey,
        num_tokens: usize,
    ) -> Option<SeqBlocks> {
        self.drain_released();
        let bs = self.pool.block_size();
        // A partial hit's rows go into a new block, which the sequence must have.
        let need = num_tokens
            .div_ceil(bs)
            .saturating_sub(hit.blocks.len())
            .max(usize::from(hit.partial.is_some()));
        // Hits sitting in the free queue stop being free once touched.
        let hits_free = hit.blocks.iter().filter(|b| self.pool.is_free(**b)).count();
        if need + hits_free > self.pool.num_free() {
            return None;
        }
        self.pool.touch(&hit.blocks);
        let new = self.pool.allocate(need).expect("capacity checked above");
        self.stats.query_tokens += hit.num_query_tokens as u64;
        self.stats.hit_tokens += hit.num_computed_tokens as u64;
        if key.adapter != AdapterKey::Base {
            self.stats.adapter_hit_tokens_from_base += hit.num_base_tokens as u64;
        }
        let copy = hit.partial.map(|p| BlockCopy {
            src: p.donor,
            dst: new[0],
            rows: p.rows,
        });
        let num_donated = hit.blocks.len() * bs;
        let mut blocks = hit.blocks;
        blocks.extend(new);
        Some(SeqBlocks {
            key,
            blocks,
            hashes: hit.hashes,
            num_cached_tokens: hit.num_computed_tokens,
            num_donated,
            copy,
            release: self.release_tx.clone(),
        })
    }

    /// Grows `seq` to hold `num_tokens` positions. False (and no change) when the pool cannot.
    pub fn grow(&mut self, seq: &mut SeqBlocks, num_tokens: usize) -> bool {
        self.drain_released();
        let need = num_tokens
            .div_ceil(self.pool.block_size())
            .saturating_sub(seq.blocks.len());
        match self.pool.allocate(need) {
            Some(new) => {
                seq.blocks.extend(new);
                true
            }
            None => false,
        }
    }

    /// Registers every block of `seq` that `tokens` (the tokens whose KV is now computed, from
    /// position 0) fills, so later requests can find it, and lists the rows of each block it
    /// wrote into (the last one part-filled, maybe) as donated.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) {
        let bs = self.pool.block_size();
        let len = tokens.len().min(seq.blocks.len() * bs);
        let full = len / bs;
        for i in seq.hashes.len()..full {
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let parent = seq.hashes.last().copied();
            let extra = seq.key.extra_key(i, bs);
            let h = self.hasher.hash_block(parent, chunk, &extra);
            self.pool
                .register(seq.blocks[i], StoredKey::new(h, parent, chunk, &extra));
            seq.hashes.push(h);
        }
        if len <= seq.num_donated {
            return;
        }
        for i in seq.num_donated / bs..len.div_ceil(bs) {
            let start = i * bs;
            let parent = i.checked_sub(1).map(|p| seq.hashes[p]);
            let rows = &tokens[start..len.min(start + bs)];
            self.pool
                .set_donor(seq.blocks[i], parent, start, rows, &seq.key);
        }
        seq.num_donated = len;
    }

    /// Returns `seq`'s blocks now, tail first.
    pub fn free(&mut self, mut seq: SeqBlocks) {
        let blocks = seq.take_reversed();
        self.pool.free(blocks);
        self.drain_released();
    }

    /// Empties the prefix cache of blocks no request holds (vLLM's `reset_prefix_cache`).
    pub fn reset_prefix_cache(&mut self) -> usize {
        self.drain_released();
        self.pool.evict_free_cached()
    }

    /// Checks the pool's invariants plus that every hashed block's stored key re-hashes to its
    /// hash; for tests.
    pub fn check_invariants(&mut self, holders: &[u32]) -> Result<(), String> {
        self.drain_released();
        self.pool.check_invariants(holders)?;
        for i in 0..self.pool.num_blocks() {
            if let Some(k) = self.pool.stored_key(BlockId(i as u32)) {
                let extra = crate::hash::ExtraKey {
                    adapter: k.adapter,
                    salt: k.salt.as_deref(),
                };
                if self.hasher.hash_block(k.parent, &k.tokens, &extra) != k.hash {
                    return Err(format!("block {i}: stored key does not hash to its hash"));
                }
            }
        }
        Ok(())
    }

    fn drain_released(&mut self) {
        while let Ok(blocks) = self.release_rx.try_recv() {
            self.pool.free(blocks);
        }
    }
}
