//! A request in the engine, on the runner and output side: how its tokens are computed
//! (adapter), sampled (sampler) and streamed (output state, client channel, timings). Its
//! tokens and blocks live in the scheduler under the same id.

use std::sync::Arc;
use std::time::Instant;

use alora_cache::RequestKey;
use alora_model::text::prompt::TurnEnd;
use alora_model::{ActiveAdapter, OutputLimits, OutputStream, Sampler};

use super::request::{EventTx, GenRequest, TokenEvent};

pub(crate) struct Seq {
    pub id: u64,
    /// The prompt, until the scheduler takes it (on arrival at the engine).
    pub prompt: Vec<u32>,
    pub num_prompt: usize,
    pub num_generated: usize,
    /// The cache key: the adapter as far as KV is concerned, and the salt.
    pub key: RequestKey,
    /// The adapter's name for metrics and logs; `None` for the base model.
    pub adapter_name: Option<String>,
    pub active: Option<ActiveAdapter>,
    pub sampler: Sampler,
    /// EOS, stop ids and strings, the token limit, incremental detokenization.
    pub output: OutputStream,
    /// A structured output's grammar: masks each step's logits, advanced per token.
    pub constraint: Option<alora_model::grammar::Constraint>,
    /// The prompt's scores so far, while the prompt is being scored (`prompt_logprobs`):
    /// alternatives per token, and one entry per prompt token scored, in order.
    pub prompt_scores: Option<(usize, Vec<TokenEvent>)>,
    pub tx: EventTx,
    pub arrival: Instant,
    /// First admission by the scheduler.
    pub admitted_at: Option<Instant>,
    pub last_token_at: Option<Instant>,
    /// Cached prompt tokens at first admission (reported as `cached_tokens`).
    pub cached_tokens: Option<usize>,
    /// Still counted against the waiting-queue bound (until first admission).
    pub queued: bool,
    /// The reply's turn end, to compute ahead when it finishes (`GenRequest::turn_end`).
    pub turn_end: Option<Arc<TurnEnd>>,
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
        let sampler = Sampler::new(req.sampling, &req.prompt);
        let output = OutputStream::new(
            OutputLimits {
                max_tokens: req
                    .max_tokens
                    .min(max_model_len.saturating_sub(req.prompt.len())),
                stop: req.stop,
                stop_token_ids: req.stop_token_ids,
                ignore_eos: req.ignore_eos,
                min_tokens: req.min_tokens,
                keep_special_tokens: req.keep_special_tokens,
                include_stop_str: req.include_stop_str,
            },
            eos_token_ids,
        );
        Seq {
            id,
            constraint: req.constraint,
            prompt_scores: req.prompt_logprobs.map(|k| (k, Vec::new())),
            num_prompt: req.prompt.len(),
            prompt: req.prompt,
            num_generated: 0,
            key: req.cache_key,
            adapter_name: req.adapter.as_ref().map(|a| a.name.clone()),
            active,
            sampler,
            output,
            tx,
            arrival: Instant::now(),
            admitted_at: None,
            last_token_at: None,
            cached_tokens: None,
            queued: true,
            turn_end: req.turn_end,
        }
    }

    /// The client is gone (disconnect, timeout): stop work and free blocks.
    pub fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    /// Name of the adapter for metrics, "base" for none.
    pub fn adapter_label(&self) -> &str {
        self.adapter_name.as_deref().unwrap_or("base")
    }
}
