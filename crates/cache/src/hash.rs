//! Block keys and the prefix hash chain.
//!
//! A full block of `block_size` tokens is keyed by
//!
//! ```text
//! hash_i = XXH3-128_seed( hash_{i-1} | tokens of block i | extra key of block i )
//! ```
//!
//! with `hash_{-1}` a fixed root. The seed is random per process ([`BlockHasher::random`]), so
//! hash values cannot be predicted from outside; tests fix it ([`BlockHasher::with_seed`]).
//!
//! The extra key is what makes a block's KV different from the base model's for the same tokens
//! (see docs/ALORA.md, "What the prefix cache keys on"). It is computed in exactly one place,
//! [`RequestKey::extra_key`]:
//!
//! ```text
//!   aLoRA, invocation starts at s = 37, block_size 16:
//!   block 0 [0,16)   block 1 [16,32)   block 2 [32,48)       block 3 [48,64)
//!   base KV          base KV           contains s: adapted   after s: adapted
//!   extra: none      extra: none       extra: (digest, 37)   extra: (digest, 37)
//! ```
//!
//! Blocks 0 and 1 hash exactly as a base request's blocks, so either can hit the other's.

use xxhash_rust::xxh3::Xxh3;

/// Content digest of an adapter (SHA-256 of its config and weights). Never its name: reloading
/// different weights under one name must not hit the old blocks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterDigest(pub [u8; 32]);

impl std::fmt::Debug for AdapterDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdapterDigest(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// How a request's tokens are computed, as far as the cache is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKey {
    /// The base model; also an aLoRA request whose invocation was not found (PEFT then runs the
    /// base model for every token).
    Base,
    /// A plain LoRA adapts every token.
    Lora(AdapterDigest),
    /// An aLoRA adapts tokens at absolute positions `>= activation_start`.
    ALora {
        digest: AdapterDigest,
        activation_start: usize,
    },
}

/// Everything besides the token ids that decides a request's KV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    pub adapter: AdapterKey,
    /// Tenant isolation: requests with different salts never share blocks.
    pub cache_salt: Option<String>,
}

impl RequestKey {
    /// A base-model request without salt.
    pub fn base() -> Self {
        RequestKey {
            adapter: AdapterKey::Base,
            cache_salt: None,
        }
    }

    /// The extra key of block `block_index` (tokens `[block_index * bs, (block_index + 1) * bs)`).
    ///
    /// The salt goes into the first block only: every later hash chains through it.
    pub fn extra_key(&self, block_index: usize, block_size: usize) -> ExtraKey<'_> {
        // A block is keyed by its last row: a block that ends at or before s holds only
        // base-model KV, and one that reaches s holds adapted rows.
        let adapter = self.row_key((block_index + 1) * block_size - 1);
        let salt = if block_index == 0 {
            self.cache_salt.as_deref()
        } else {
            None
        };
        ExtraKey { adapter, salt }
    }

    /// How the K/V row at absolute position `pos` is computed: `None` for the base model, else
    /// the adapter digest and, for aLoRA, its activation start. Two requests whose prefixes
    /// agree up to `pos` hold the same row there iff their row keys (and salts) agree.
    pub fn row_key(&self, pos: usize) -> Option<(AdapterDigest, Option<usize>)> {
        match self.adapter {
            AdapterKey::Base => None,
            AdapterKey::Lora(d) => Some((d, None)),
            AdapterKey::ALora {
                activation_start, ..
            } if pos < activation_start => None,
            AdapterKey::ALora {
                digest,
                activation_start,
            } => Some((digest, Some(activation_start))),
        }
    }
}

/// The per-block part of a hash input besides parent and tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtraKey<'a> {
    /// Adapter digest and, for aLoRA, the activation start s.
    pub adapter: Option<(AdapterDigest, Option<usize>)>,
    pub salt: Option<&'a str>,
}

impl ExtraKey<'_> {
    /// True when the block holds base-model KV (no adapter in its key).
    pub fn is_base(&self) -> bool {
        self.adapter.is_none()
    }

    fn write_to(&self, h: &mut Xxh3) {
        match self.adapter {
            None => h.update(&[0]),
            Some((d, None)) => {
                h.update(&[1]);
                h.update(&d.0);
            }
            Some((d, Some(s))) => {
                h.update(&[2]);
                h.update(&d.0);
                h.update(&(s as u64).to_le_bytes());
            }
        }
        match self.salt {
            None => h.update(&[0]),
            Some(s) => {
                h.update(&[1]);
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
        }
    }
}

/// A 128-bit block hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

/// Computes the hash chain with one seed.
#[derive(Debug, Clone, Copy)]
pub struct BlockHasher {
    seed: u64,
}

impl BlockHasher {
    /// A hasher with a fixed seed (tests, reproducible runs).
    pub fn with_seed(seed: u64) -> Self {
        BlockHasher { seed }
    }

    /// A hasher with a random per-process seed.
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        // An OS without a random source is not one we can serve from; fall back to the clock so
        // start-up never fails on it.
        if getrandom::fill(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9_7f4a_7c15);
            b = t.to_le_bytes();
        }
        BlockHasher {
            seed: u64::from_le_bytes(b),
        }
    }

    /// `hash(parent, tokens, extra)`; `parent` is `None` for the first block.
    pub fn hash_block(
        &self,
        parent: Option<BlockHash>,
        tokens: &[u32],
        extra: &ExtraKey<'_>,
    ) -> BlockHash {
        let mut h = Xxh3::with_seed(self.seed);
        match parent {
            None => h.update(&[0]),
            Some(p) => {
                h.update(&[1]);
                h.update(&p.0.to_le_bytes());
            }
        }
        h.update(&(tokens.len() as u64).to_le_bytes());
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        extra.write_to(&mut h);
        BlockHash(h.digest128())
    }

    /// Hashes of every full block of `tokens` under `key`.
    pub fn hash_blocks(
        &self,
        tokens: &[u32],
        key: &RequestKey,
        block_size: usize,
    ) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / block_size);
        let mut parent = None;
        for (i, chunk) in tokens.chunks_exact(block_size).enumerate() {
            let h = self.hash_block(parent, chunk, &key.extra_key(i, block_size));
            out.push(h);
            parent = Some(h);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(x: u8) -> AdapterDigest {
        AdapterDigest([x; 32])
    }

    /// The keying rule of docs/ALORA.md, one row per case: which blocks carry the adapter key.
    #[test]
    fn extra_key_table() {
        let bs = 4;
        let alora = |s| RequestKey {
            adapter: AdapterKey::ALora {
                digest: d(1),
                activation_start: s,
            },
            cache_salt: None,
        };
        // (key, block index, expected adapter part)
        type AdapterPart = Option<(AdapterDigest, Option<usize>)>;
        let cases: Vec<(RequestKey, usize, AdapterPart)> = vec![
            (RequestKey::base(), 0, None),
            (RequestKey::base(), 5, None),
            (
                RequestKey {
                    adapter: AdapterKey::Lora(d(2)),
                    cache_salt: None,
                },
                0,
                Some((d(2), None)),
            ),
            (
                RequestKey {
                    adapter: AdapterKey::Lora(d(2)),
                    cache_salt: None,
                },
                3,
                Some((d(2), None)),
            ),
            // s = 8: blocks [0,4) and [4,8) end at or before s.
            (alora(8), 0, None),
            (alora(8), 1, None),
            (alora(8), 2, Some((d(1), Some(8)))),
            (alora(8), 3, Some((d(1), Some(8)))),
            // s = 6 straddles block 1 [4,8).
            (alora(6), 0, None),
            (alora(6), 1, Some((d(1), Some(6)))),
            // s = 0 adapts everything.
            (alora(0), 0, Some((d(1), Some(0)))),
        ];
        for (key, idx, want) in cases {
            assert_eq!(key.extra_key(idx, bs).adapter, want, "{key:?} block {idx}");
        }
    }

    #[test]
    fn salt_only_in_first_block_but_changes_whole_chain() {
        let h = BlockHasher::with_seed(7);
        let toks: Vec<u32> = (0..12).collect();
        let plain = h.hash_blocks(&toks, &RequestKey::base(), 4);
        let salted = h.hash_blocks(
            &toks,
            &RequestKey {
                adapter: AdapterKey::Base,
                cache_salt: Some("tenant-a".into()),
            },
            4,
        );
        assert_eq!(RequestKey::base().extra_key(1, 4).salt, None);
        for (a, b) in plain.iter().zip(&salted) {
            assert_ne!(a, b);
        }
    }

    #[test]
    fn seed_changes_hashes_and_chain_depends_on_parent() {
        let toks: Vec<u32> = (0..8).collect();
        let a = BlockHasher::with_seed(1).hash_blocks(&toks, &RequestKey::base(), 4);
        let b = BlockHasher::with_seed(2).hash_blocks(&toks, &RequestKey::base(), 4);
        assert_ne!(a, b);
        // Same second-block tokens after a different first block: different hash.
        let toks2: Vec<u32> = vec![9, 9, 9, 9, 4, 5, 6, 7];
        let c = BlockHasher::with_seed(1).hash_blocks(&toks2, &RequestKey::base(), 4);
        assert_ne!(a[1], c[1]);
    }
}
