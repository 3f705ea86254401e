//! Cache sizing: how many blocks a byte budget buys for a given model shape.

/// Static cache configuration, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

impl CacheConfig {
    /// Default tokens per block (vLLM's default too).
    pub const DEFAULT_BLOCK_SIZE: usize = 16;

    /// Bytes one block occupies across all layers, for K and V together.
    pub fn bytes_per_block(
        block_size: usize,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype_bytes: usize,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes
    }

    /// The largest pool that fits in `budget_bytes`.
    pub fn from_budget(
        budget_bytes: usize,
        block_size: usize,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype_bytes: usize,
    ) -> Self {
        let per_block =
            Self::bytes_per_block(block_size, num_layers, num_kv_heads, head_dim, dtype_bytes);
        CacheConfig {
            block_size,
            num_blocks: budget_bytes / per_block.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_for_smollm2_shape() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64, f32 -> 16 tokens * 30 * 2 * 3 * 64 * 4 bytes.
        let per = CacheConfig::bytes_per_block(16, 30, 3, 64, 4);
        assert_eq!(per, 737_280);
        let cfg = CacheConfig::from_budget(per * 10 + per / 2, 16, 30, 3, 64, 4);
        assert_eq!(cfg.num_blocks, 10);
    }
}
