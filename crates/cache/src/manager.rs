//! What the scheduler calls: find a request's cached prefix, allocate blocks for what it still
//! has to compute, register blocks as they fill, free them.
//!
//! Life of a request's blocks:
//!
//! ```text
//!   lookup(prompt)        -> PrefixHit { blocks: [b7, b2], num_computed_tokens: 32 }
//!   allocate(hit, key, n) -> SeqBlocks [b7, b2, b9, b4]   (hits touched, 2 new blocks)
//!   ... model writes KV for tokens 32..n into b9, b4 ...
//!   commit(seq, tokens)   -> b9 (now full) registered under its hash; b4 not full yet
//!   grow(seq, n + 1)      -> another block when decode crosses a block boundary
//!   free(seq) / drop(seq) -> refs dropped tail first: b4, b9, b2, b7
//! ```
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
    pub blocks: Vec<BlockId>,
    /// Tokens whose KV the hit blocks hold (whole blocks).
    pub num_computed_tokens: usize,
    /// Of those, tokens in blocks keyed as base-model KV.
    pub num_base_tokens: usize,
    hashes: Vec<BlockHash>,
    num_query_tokens: usize,
}

impl PrefixHit {
    /// Keeps the whole blocks of the hit within the first `max_tokens` tokens (0: a miss).
    pub fn truncate(&mut self, max_tokens: usize) {
        let bs = match self.blocks.len() {
            0 => return,
            n => self.num_computed_tokens / n,
        };
        let keep = (max_tokens / bs).min(self.blocks.len());
        self.blocks.truncate(keep);
        self.hashes.truncate(keep);
        self.num_computed_tokens = keep * bs;
        self.num_base_tokens = self.num_base_tokens.min(self.num_computed_tokens);
    }
}

/// The blocks one sequence holds, in position order. Dropping it returns them to the pool.
#[derive(Debug)]
pub struct SeqBlocks {
    key: RequestKey,
    blocks: Vec<BlockId>,
    /// Hashes of the first `hashes.len()` blocks, which are full and registered (or were hits).
    hashes: Vec<BlockHash>,
    num_cached_tokens: usize,
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

    /// The longest cached prefix of `tokens` under `key`, in whole blocks, never the whole
    /// prompt: the last prompt token must still run to produce logits.
    pub fn lookup(&mut self, tokens: &[u32], key: &RequestKey) -> PrefixHit {
        self.drain_released();
        let bs = self.pool.block_size();
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut hit = PrefixHit {
            blocks: Vec::new(),
            num_computed_tokens: 0,
            num_base_tokens: 0,
            hashes: Vec::new(),
            num_query_tokens: tokens.len(),
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
        hit.num_computed_tokens = hit.blocks.len() * bs;
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
        let need = num_tokens.div_ceil(bs).saturating_sub(hit.blocks.len());
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
        let mut blocks = hit.blocks;
        blocks.extend(new);
        Some(SeqBlocks {
            key,
            blocks,
            hashes: hit.hashes,
            num_cached_tokens: hit.num_computed_tokens,
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
    /// position 0) fills, so later requests can find it.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) {
        let bs = self.pool.block_size();
        let full = (tokens.len() / bs).min(seq.blocks.len());
        for i in seq.hashes.len()..full {
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let parent = seq.hashes.last().copied();
            let extra = seq.key.extra_key(i, bs);
            let h = self.hasher.hash_block(parent, chunk, &extra);
            self.pool
                .register(seq.blocks[i], StoredKey::new(h, parent, chunk, &extra));
            seq.hashes.push(h);
        }
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
