//! The block pool: a flat array of blocks with ref counts, an optional content key, and an LRU
//! queue of free blocks (after vLLM v1's `BlockPool`).
//!
//! Free blocks stay findable by hash until their memory is handed out again (lazy eviction):
//!
//! ```text
//!   free queue:  head -> [nothing findable ...][oldest findable ... newest findable] <- tail
//!   allocate pops from the head, so a block with nothing findable goes first and, among
//!   findable ones (hashed or donor), the least recently freed.
//! ```
//!
//! Besides full blocks under their hashes, a block whose rows were written is a *donor*: listed
//! under its parent's hash with the tokens it holds so far and the key they were computed under,
//! so that a request whose prompt leaves the hash chain inside that block can copy the rows it
//! shares (the partial last block of a conversation, which an aLoRA call on it extends). Free
//! donors queue with the hashed blocks: they too have something findable.
//!
//! **Invariant:** a block is in the free queue iff its `ref_cnt` is 0.
//! **Invariant:** a hash maps to at most one block, and that block's stored key has that hash.
//! **Invariant:** a block is listed under a parent in `donors` iff its `donor` names that parent.

use std::collections::HashMap;

use crate::hash::{AdapterDigest, BlockHash, ExtraKey, RequestKey};

/// Donors kept under one parent; past this the oldest listed stops being one. Prompts that
/// leave one prefix in many ways (a shared system prompt) would otherwise make lookups slow.
const MAX_DONORS_PER_PARENT: usize = 16;

/// Index of a block in the pool (and in the model's K/V tensors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The full hash input of a registered block, kept so that a hit is verified against the
/// content it stands for and a hash collision can never serve the wrong KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredKey {
    pub hash: BlockHash,
    pub parent: Option<BlockHash>,
    pub tokens: Box<[u32]>,
    pub adapter: Option<(AdapterDigest, Option<usize>)>,
    pub salt: Option<Box<str>>,
}

impl StoredKey {
    pub fn new(
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        extra: &ExtraKey<'_>,
    ) -> Self {
        StoredKey {
            hash,
            parent,
            tokens: tokens.into(),
            adapter: extra.adapter,
            salt: extra.salt.map(Into::into),
        }
    }

    fn matches(&self, parent: Option<BlockHash>, tokens: &[u32], extra: &ExtraKey<'_>) -> bool {
        self.parent == parent
            && &*self.tokens == tokens
            && self.adapter == extra.adapter
            && self.salt.as_deref() == extra.salt
    }
}

/// The rows a block holds, as a copy source for prompts that share some of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Donor {
    /// Hash of the previous block of the sequence that wrote it (`None`: block 0).
    pub parent: Option<BlockHash>,
    /// Absolute position of the block's first row.
    pub start: usize,
    /// Tokens whose K/V the block holds, from its first row.
    pub tokens: Vec<u32>,
    pub key: RequestKey,
}

impl Donor {
    /// How many leading rows of `tokens` (positions from `self.start`), wanted under `key`,
    /// this block holds exactly.
    fn shared_rows(&self, tokens: &[u32], key: &RequestKey) -> usize {
        if self.key.cache_salt != key.cache_salt {
            return 0;
        }
        tokens
            .iter()
            .zip(&self.tokens)
            .enumerate()
            .take_while(|&(r, (a, b))| {
                a == b && self.key.row_key(self.start + r) == key.row_key(self.start + r)
            })
            .count()
    }
}

#[derive(Debug, Default)]
struct Block {
    ref_cnt: u32,
    key: Option<StoredKey>,
    donor: Option<Donor>,
    // Links of the intrusive free list; meaningful only while `in_free`.
    prev: Option<u32>,
    next: Option<u32>,
    in_free: bool,
}

/// Blocks, their ref counts and the free queue. Single owner; no interior locking.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    block_size: usize,
    cached: HashMap<BlockHash, BlockId>,
    /// Donor blocks by parent hash, oldest listed first.
    donors: HashMap<Option<BlockHash>, Vec<BlockId>>,
    head: Option<u32>,
    tail: Option<u32>,
    num_free: usize,
    evictions: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks, queued in id order.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(num_blocks <= u32::MAX as usize, "too many blocks");
        let mut pool = BlockPool {
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            block_size,
            cached: HashMap::new(),
            donors: HashMap::new(),
            head: None,
            tail: None,
            num_free: 0,
            evictions: 0,
        };
        for i in 0..num_blocks as u32 {
            pool.push_back(i);
        }
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free
    }

    /// Cached blocks whose memory was handed out again.
    pub fn num_evictions(&self) -> u64 {
        self.evictions
    }

    pub fn ref_cnt(&self, id: BlockId) -> u32 {
        self.blocks[id.index()].ref_cnt
    }

    pub fn block_hash(&self, id: BlockId) -> Option<BlockHash> {
        self.blocks[id.index()].key.as_ref().map(|k| k.hash)
    }

    /// The tokens a registered block holds; `None` for an unhashed block.
    pub fn cached_tokens(&self, id: BlockId) -> Option<&[u32]> {
        self.blocks[id.index()].key.as_ref().map(|k| &*k.tokens)
    }

    /// Whether `id` has ref count 0 (and so sits in the free queue).
    pub fn is_free(&self, id: BlockId) -> bool {
        self.blocks[id.index()].in_free
    }

    /// The block registered under `hash`, if its stored content equals the given one.
    pub fn get_cached(
        &self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        extra: &ExtraKey<'_>,
    ) -> Option<BlockId> {
        let id = *self.cached.get(&hash)?;
        let key = self.blocks[id.index()].key.as_ref()?;
        key.matches(parent, tokens, extra).then_some(id)
    }

    /// Takes a reference on each block, pulling free ones out of the free queue (a cache hit).
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            if self.blocks[id.index()].in_free {
                self.unlink(id.0);
            }
            self.blocks[id.index()].ref_cnt += 1;
        }
    }

    /// `n` blocks from the head of the free queue, each with ref count 1, or `None` (and no
    /// change) when fewer than `n` are free. A popped block loses its hash: that is eviction.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.head.expect("free count and free queue disagree");
            self.unlink(i);
            let b = &mut self.blocks[i as usize];
            let donor = b.donor.take();
            if let Some(key) = b.key.take() {
                self.cached.remove(&key.hash);
                self.evictions += 1;
            }
            b.ref_cnt = 1;
            if let Some(d) = donor {
                self.unlist_donor(BlockId(i), d.parent);
            }
            out.push(BlockId(i));
        }
        Some(out)
    }

    /// Drops one reference from each block, in the order given. Callers pass a request's blocks
    /// tail first, so that its shared head blocks are queued last and evicted last.
    ///
    /// # Panics
    /// On a ref-count underflow: that is a double free, a bug in the caller.
    pub fn free(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let b = &mut self.blocks[id.index()];
            assert!(b.ref_cnt > 0, "double free of block {}", id.0);
            b.ref_cnt -= 1;
            if b.ref_cnt == 0 {
                if b.key.is_some() || b.donor.is_some() {
                    self.push_back(id.0);
                } else {
                    self.push_front(id.0);
                }
            }
        }
    }

    /// Makes a held, full block findable under its key. Returns false (and leaves the block
    /// unhashed) when another block already holds that key: the first copy stays canonical.
    pub(crate) fn register(&mut self, id: BlockId, key: StoredKey) -> bool {
        let b = &self.blocks[id.index()];
        assert!(b.ref_cnt > 0, "registering free block {}", id.0);
        if b.key.is_some() || self.cached.contains_key(&key.hash) {
            return false;
        }
        self.cached.insert(key.hash, id);
        self.blocks[id.index()].key = Some(key);
        true
    }

    /// Lists held block `id` as a donor of `tokens` (from position `start`, computed under
    /// `key`, after the block hashed `parent`), replacing what it listed before.
    pub(crate) fn set_donor(
        &mut self,
        id: BlockId,
        parent: Option<BlockHash>,
        start: usize,
        tokens: &[u32],
        key: &RequestKey,
    ) {
        let b = &mut self.blocks[id.index()];
        assert!(b.ref_cnt > 0, "donating free block {}", id.0);
        debug_assert!(!tokens.is_empty() && tokens.len() <= self.block_size);
        if let Some(d) = &mut b.donor {
            if d.parent == parent && d.start == start && &d.key == key {
                d.tokens.clear();
                d.tokens.extend_from_slice(tokens);
                return;
            }
        }
        if let Some(old) = b.donor.take() {
            self.unlist_donor(id, old.parent);
        }
        self.blocks[id.index()].donor = Some(Donor {
            parent,
            start,
            tokens: tokens.to_vec(),
            key: key.clone(),
        });
        let list = self.donors.entry(parent).or_default();
        list.push(id);
        if list.len() > MAX_DONORS_PER_PARENT {
            let oldest = list.remove(0);
            self.blocks[oldest.index()].donor = None;
            // A free block with nothing findable left goes where unhashed free blocks go.
            let b = &self.blocks[oldest.index()];
            if b.in_free && b.key.is_none() {
                self.unlink(oldest.0);
                self.push_front(oldest.0);
            }
        }
    }

    /// The donor under `parent` sharing the most leading rows with `tokens` (positions from
    /// `start`, wanted under `key`), and how many rows; `None` when none shares a row.
    pub(crate) fn best_donor(
        &self,
        parent: Option<BlockHash>,
        start: usize,
        tokens: &[u32],
        key: &RequestKey,
    ) -> Option<(BlockId, usize)> {
        self.donors
            .get(&parent)?
            .iter()
            .filter_map(|&id| {
                let d = self.blocks[id.index()].donor.as_ref()?;
                (d.start == start).then(|| (id, d.shared_rows(tokens, key)))
            })
            .filter(|&(_, rows)| rows > 0)
            // The most rows; among equals the newest listed.
            .max_by_key(|&(_, rows)| rows)
    }

    fn unlist_donor(&mut self, id: BlockId, parent: Option<BlockHash>) {
        if let Some(list) = self.donors.get_mut(&parent) {
            list.retain(|&b| b != id);
            if list.is_empty() {
                self.donors.remove(&parent);
            }
        }
    }

    /// Forgets the hash and donated rows of every free block (held blocks keep theirs): the
    /// prefix cache is emptied of everything no request is using. Returns how many blocks had
    /// something forgotten.
    pub fn evict_free_cached(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.blocks.len() {
            let b = &mut self.blocks[i];
            if !b.in_free {
                continue;
            }
            let donor = b.donor.take();
            let key = b.key.take();
            if let Some(k) = &key {
                self.cached.remove(&k.hash);
            }
            if let Some(d) = &donor {
                self.unlist_donor(BlockId(i as u32), d.parent);
            }
            n += usize::from(key.is_some() || donor.is_some());
        }
        n
    }

    /// The free queue from head (next to be evicted) to tail.
    pub fn free_queue(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut cur = self.head;
        while let Some(i) = cur {
            out.push(BlockId(i));
            cur = self.blocks[i as usize].next;
        }
        out
    }

    /// Checks every structural invariant; for tests. `holders[b]` is how many live owners the
    /// caller knows block `b` to have.
    pub fn check_invariants(&self, holders: &[u32]) -> Result<(), String> {
        let queue = self.free_queue();
        if queue.len() != self.num_free {
            return Err(format!(
                "queue walk {} != num_free {}",
                queue.len(),
                self.num_free
            ));
        }
        let mut seen = vec![false; self.blocks.len()];
        for id in &queue {
            if std::mem::replace(&mut seen[id.index()], true) {
                return Err(format!("block {} twice in free queue", id.0));
            }
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.in_free != seen[i] {
                return Err(format!(
                    "block {i}: in_free flag {} but queued {}",
                    b.in_free, seen[i]
                ));
            }
            if b.in_free != (b.ref_cnt == 0) {
                return Err(format!(
                    "block {i}: free {} with ref_cnt {}",
                    b.in_free, b.ref_cnt
                ));
            }
            if b.ref_cnt != holders[i] {
                return Err(format!(
                    "block {i}: ref_cnt {} but {} holders",
                    b.ref_cnt, holders[i]
                ));
            }
            if let Some(k) = &b.key {
                if self.cached.get(&k.hash) != Some(&BlockId(i as u32)) {
                    return Err(format!("block {i}: hashed but not in the map"));
                }
                if k.tokens.len() != self.block_size {
                    return Err(format!("block {i}: key of {} tokens", k.tokens.len()));
                }
            }
        }
        for (h, id) in &self.cached {
            match &self.blocks[id.index()].key {
                Some(k) if k.hash == *h => {}
                _ => return Err(format!("map entry for block {} is stale", id.0)),
            }
        }
        let mut listed = 0;
        for (parent, ids) in &self.donors {
            if ids.is_empty() || ids.len() > MAX_DONORS_PER_PARENT {
                return Err(format!("{} donors under one parent", ids.len()));
            }
            for id in ids {
                match &self.blocks[id.index()].donor {
                    Some(d) if d.parent == *parent => {}
                    _ => return Err(format!("donor entry for block {} is stale", id.0)),
                }
            }
            listed += ids.len();
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if let Some(d) = &b.donor {
                if d.tokens.is_empty() || d.tokens.len() > self.block_size {
                    return Err(format!("block {i}: donor of {} tokens", d.tokens.len()));
                }
                if d.start % self.block_size != 0 {
                    return Err(format!("block {i}: donor starts at {}", d.start));
                }
            }
        }
        if listed != self.blocks.iter().filter(|b| b.donor.is_some()).count() {
            return Err("a donor block is not listed".into());
        }
        if self.num_free + self.num_used() != self.blocks.len() {
            return Err("free + used != total".into());
        }
        Ok(())
    }

    /// The stored key of a block; for tests and the chain check.
    pub(crate) fn stored_key(&self, id: BlockId) -> Option<&StoredKey> {
        self.blocks[id.index()].key.as_ref()
    }

    fn push_back(&mut self, i: u32) {
        let b = &mut self.blocks[i as usize];
        debug_assert!(!b.in_free);
        b.in_free = true;
        b.prev = self.tail;
        b.next = None;
        match self.tail {
            Some(t) => self.blocks[t as usize].next = Some(i),
            None => self.head = Some(i),
        }
        self.tail = Some(i);
        self.num_free += 1;
    }

    fn push_front(&mut self, i: u32) {
        let b = &mut self.blocks[i as usize];
        debug_assert!(!b.in_free);
        b.in_free = true;
        b.next = self.head;
        b.prev = None;
        match self.head {
            Some(h) => self.blocks[h as usize].prev = Some(i),
            None => self.tail = Some(i),
        }
        self.head = Some(i);
        self.num_free += 1;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let b = &mut self.blocks[i as usize];
            debug_assert!(b.in_free);
            b.in_free = false;
            (b.prev.take(), b.next.take())
        };
        match prev {
            Some(p) => self.blocks[p as usize].next = next,
            None => self.head = next,
        }
        match next {
            Some(n) => self.blocks[n as usize].prev = prev,
            None => self.tail = prev,
        }
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<BlockId> {
        v.iter().map(|&i| BlockId(i)).collect()
    }

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut p = BlockPool::new(3, 4);
        assert_eq!(p.allocate(4), None);
        assert_eq!(p.num_free(), 3);
        assert_eq!(p.allocate(2), Some(ids(&[0, 1])));
        assert_eq!(p.free_queue(), ids(&[2]));
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut p = BlockPool::new(2, 4);
        let b = p.allocate(1).unwrap();
        p.free(b.clone());
        p.free(b);
    }

    #[test]
    fn unhashed_free_blocks_go_first() {
        let mut p = BlockPool::new(4, 2);
        let b = p.allocate(4).unwrap();
        let extra = ExtraKey {
            adapter: None,
            salt: None,
        };
        assert!(p.register(b[1], StoredKey::new(BlockHash(11), None, &[1, 2], &extra)));
        // Freed tail first: 3 (unhashed) -> head, 1 (hashed) -> tail, 0 (unhashed) -> head.
        p.free([b[3], b[1], b[0]]);
        assert_eq!(p.free_queue(), ids(&[0, 3, 1]));
        // Re-allocating evicts the hashed block only when it reaches it.
        assert_eq!(p.allocate(2), Some(ids(&[0, 3])));
        assert_eq!(p.num_evictions(), 0);
        assert_eq!(p.allocate(1), Some(ids(&[1])));
        assert_eq!(p.num_evictions(), 1);
    }
}
