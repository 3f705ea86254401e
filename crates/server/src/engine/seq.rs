//! A sequence in the engine: its tokens, progress, blocks and output state.

use std::time::Instant;

use alora_cache::{AdapterKey, RequestKey, SeqBlocks};
use alora_model::{ActiveAdapter, IncrementalDecoder, Sampler, StopStrings};

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
    pub decoder: IncrementalDecoder,
    pub stops: StopStrings,
    pub tx: EventTx,
    pub arrival: Instant,
    pub last_token_at: Option<Instant>,
    /// Cached prompt tokens at first admission (reported as `cached_tokens`).
    pub cached_tokens: Option<usize>,
    /// Still counted against the waiting-queue bound (until first admission).
    pub queued: bool,
    /// Output ended on a stop string (nothing held back is released then).
    pub hit_stop_string: bool,
}

impl Seq {
    pub fn new(id: u64, req: GenRequest, tx: EventTx) -> Self {
        let active = req.adapter.as_ref().and_then(|a| {
            a.activation_start(&req.prompt).map(|s| ActiveAdapter {
                adapter: a.clone(),
                activation_start: s,
            })
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
        let stops = StopStrings::new(req.stop.clone());
        Seq {
            id,
            tokens: req.prompt.clone(),
            num_prompt: req.prompt.len(),
            num_computed: 0,
            blocks: None,
            key,
            active,
            sampler,
            decoder: IncrementalDecoder::new(true),
            stops,
            tx,
            arrival: Instant::now(),
            last_token_at: None,
            cached_tokens: None,
            queued: true,
            hit_stop_string: false,
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
