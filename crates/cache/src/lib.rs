//! KV-cache block management for alora: a pool of fixed-size blocks, indexed by a chain of
//! prefix hashes, shared between base-model requests and aLoRA requests on the same conversation.
//!
//! This crate is plain Rust: it knows nothing of tensors, HTTP or async. It decides *which*
//! block holds which tokens; the model crate owns the tensors those blocks name.
//!
//! Modules: [`hash`] (block keys and the hash chain), [`pool`] (blocks, ref counts, the LRU free
//! queue), [`manager`] (what the scheduler calls: lookup, allocate, commit, free), [`config`]
//! (capacity from a byte budget).

pub mod config;
pub mod hash;
pub mod manager;
pub mod pool;

pub use config::CacheConfig;
pub use hash::{AdapterDigest, AdapterKey, BlockHash, BlockHasher, ExtraKey, RequestKey};
pub use manager::{BlockCopy, CacheStats, KvCacheManager, PartialHit, PrefixHit, SeqBlocks};
pub use pool::{BlockId, BlockPool};
