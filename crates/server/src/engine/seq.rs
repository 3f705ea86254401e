//! A sequence in the engine: its tokens, progress, blocks and output state.

use std::time::Instant;

use alora_cache::{AdapterKey, RequestKey, SeqBlocks};
use alora_model::{ActiveAdapter, OutputLimits, OutputStream, Sampler};

use super::request::{EventTx, GenRequest};

pub(crate) struct Seq {
    pub id: u64,
    pub req: GenRequest,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub num_prompt: usize,
    /// Tokens whose K/V is in this sequence's blocks.
    pub num_computed: usize,
    pub blocks: Option<SeqBlocks>,
    pub key: RequestKey,
    pub active: Option<ActiveAdapter>,
    pub sampler: Sampler,
    /// EOS, stop ids and strings, the token limit, incremental detokenization.
    pub output: OutputStream,
    pub tx: EventTx,
    pub arrival: Instant,
    pub last_token_at: Option<Instant>,
    /// Cached prompt tokens at first admission (reported as `cached_tokens`).
    pub cached_tokens: Option<usize>,
    /// Still counted against the waiting-queue bound (until first admission).
    pub queued: bool,
}

impl Seq {
    /// `eos_token_ids`: the tokenizer's; `max_model_len`: the context limit (prompt and
    /// output together).
    pub fn new(
        id: u64,
        req: GenRequest,
        tx: EventTx,
        eos_token_ids: &[u32],
        max_model_len: usize,
    ) -> Self {
        // The activation start was found once, when the handler built the prompt.
        let active = req
            .adapter
            .as_ref()
            .zip(req.activation_start)
            .map(|(a, s)| ActiveAdapter {
                adapter: a.clone(),
                activation_start: s,
            });
        let adapter = match &active {
            None => AdapterKey::Base,
            Some(a) if a.adapter.invocation_tokens().is_some() => AdapterKey::ALora {
                digest: a.adapter.digest,
                activation_start: a.activation_start,
            },
            Some(a) => AdapterKey::Lora(a.adapter.digest),
        };
        let key = RequestKey {
            adapter,
            cache_salt: req.cache_salt.clone(),
        };
        let sampler = Sampler::new(req.sampling.clone(), &req.prompt);
        let output = OutputStream::new(
            OutputLimits {
                max_tokens: req
                    .max_tokens
                    .min(max_model_len.saturating_sub(req.prompt.len())),
                stop: req.stop.clone(),
                stop_token_ids: req.stop_token_ids.clone(),
                ignore_eos: req.ignore_eos,
            },
            eos_token_ids,
        );
        Seq {
            id,
            tokens: req.prompt.clone(),
            num_prompt: req.prompt.len(),
            num_computed: 0,
            blocks: None,
            key,
            active,
            sampler,
            output,
            tx,
            arrival: Instant::now(),
            last_token_at: None,
            cached_tokens: None,
            queued: true,
            req,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.num_prompt
    }

    /// The client is gone (disconnect, timeout): stop work and free blocks.
    pub fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    /// Name of the adapter for metrics, "base" for none.
    pub fn adapter_label(&self) -> &str {
        self.req
            .adapter
            .as_ref()
            .map(|a| a.name.as_str())
            .unwrap_or("base")
    }
}
