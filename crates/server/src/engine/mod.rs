//! The engine: one thread that owns the model, the KV store and the scheduler (which owns the
//! block manager), and a cheap cloneable [`EngineHandle`] that handlers use to submit requests.
//! Model compute never runs on tokio workers.
//!
//! **Invariant:** only the engine thread touches the model, the `KvStore` and the
//! `KvCacheManager`. Handlers see the model only through [`ModelInfo`] (tokenizer, template,
//! config), which is immutable once loaded.

mod core;
pub mod request;
mod scheduler;
mod seq;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use alora_model::{ChatTemplate, LoadedModel, ModelConfig, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::metrics::Metrics;
pub use request::{EngineError, Event, Finish, GenRequest, TokenEvent, Usage};
use seq::Seq;

/// The default `long_prefill_token_threshold`: a long prefill's chunk runs in slices of
/// layers that short steps interleave with (`EngineConfig::prefill_slice`), so a call that
/// arrives waits for at most one layer of a chunk; 256 rows is ~9-15 ms a layer for SmolLM2
/// on 2 cores (its measured prefill speed over 30 layers), at the prefill speed of bigger
/// chunks (BENCHMARKS.md, "Nineteenth session: sliced prefill").
pub const DEFAULT_LONG_PREFILL_TOKENS: usize = 256;

/// `EngineConfig::prefill_slice` by default, in milliseconds.
pub const DEFAULT_PREFILL_SLICE_MS: u64 = 25;

/// `EngineConfig::close_turn_grace` by default, in milliseconds: longer than a client takes to
/// send its next request after a response (a few ms over loopback, tens from Python).
pub const DEFAULT_CLOSE_TURN_GRACE_MS: u64 = 50;

/// Scheduler and cache limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    /// KV cache budget in bytes; the block count follows from the model's shape.
    pub kv_cache_bytes: usize,
    /// What K/V are kept as (f32, f16, bf16); `None`: the model's dtype (f32 on the CPU,
    /// exact against PEFT). Half precision halves the bytes per block and per step.
    pub kv_cache_dtype: Option<candle_core::DType>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Tokens still to compute past which a sequence is a long prefill; long prefills share
    /// this many tokens per step, after decodes and short prefills (the scheduler's policy).
    pub long_prefill_token_threshold: usize,
    /// Bound on waiting requests; past it, submissions are refused (429).
    pub max_queue_requests: usize,
    /// Bound on prompt tokens of waiting requests.
    pub max_queue_tokens: usize,
    /// How long a finished reply's turn end waits, when nothing else runs, before it is
    /// computed ahead (`HttpConfig::close_turns`): a request arriving within it drops the turn
    /// end instead, so a call sent right after the reply never waits behind that step.
    pub close_turn_grace: std::time::Duration,
    /// Long prefills' chunks run as a step of their own, in slices of layers, with the short
    /// steps (decodes, calls on a cached conversation) between them: a request that arrives
    /// gets its step at the next layer boundary, and while decodes run, the chunk computes
    /// for this long between their steps. `None`: a chunk rides in the step with the short
    /// work (one forward), as in vLLM.
    pub prefill_slice: Option<std::time::Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 4,
            kv_cache_bytes: 1 << 30,
            kv_cache_dtype: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            long_prefill_token_threshold: DEFAULT_LONG_PREFILL_TOKENS,
            max_queue_requests: 256,
            max_queue_tokens: 1 << 20,
            close_turn_grace: std::time::Duration::from_millis(DEFAULT_CLOSE_TURN_GRACE_MS),
            prefill_slice: Some(std::time::Duration::from_millis(DEFAULT_PREFILL_SLICE_MS)),
        }
    }
}

/// What handlers may know of the loaded model.
pub struct ModelInfo {
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub device: candle_core::Device,
    /// Longest sequence (prompt + output) the server accepts: the model's positions, capped by
    /// what the KV cache can hold for one sequence.
    pub max_model_len: usize,
    pub num_blocks: usize,
    /// What the KV cache keeps K/V as.
    pub kv_cache_dtype: candle_core::DType,
    /// The structured-output compiler, built on first use (`ModelInfo::grammars`).
    pub grammars: std::sync::OnceLock<Result<alora_model::grammar::Grammars, String>>,
    /// Every token's bytes (`ModelInfo::token_bytes`), built on first use.
    pub token_bytes: std::sync::OnceLock<Vec<Vec<u8>>>,
}

impl ModelInfo {
    /// Token `id`'s own bytes (a special token's text; a byte-level piece of a character may
    /// be no valid UTF-8 alone), as logprobs' `bytes` report them.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let all = self.token_bytes.get_or_init(|| {
            let mut t = alora_model::grammar::token_bytes(&self.tokenizer, self.config.vocab_size);
            alora_model::grammar::unmark_special(&mut t);
            t
        });
        all.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The model's grammar compiler (its token trie is built once, on the first structured
    /// request).
    pub fn grammars(&self) -> Result<&alora_model::grammar::Grammars, String> {
        self.grammars
            .get_or_init(|| {
                alora_model::grammar::Grammars::new(&self.tokenizer, self.config.vocab_size)
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    Loading,
    Ready,
    Failed(String),
    /// The engine thread is gone (it panicked): nothing will be served.
    Stopped(String),
}

/// State shared between the engine thread and handlers.
pub struct Shared {
    pub metrics: Metrics,
    pub info: OnceLock<Arc<ModelInfo>>,
    pub state: Mutex<LoadState>,
    waiting_requests: AtomicUsize,
    waiting_tokens: AtomicUsize,
    /// Requests handed to the engine, ever: a sliced step yields when it moves.
    submitted: AtomicU64,
    config: EngineConfig,
}

impl Shared {
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn load_state(&self) -> LoadState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(crate) enum Msg {
    Submit(Box<Seq>),
    ResetPrefixCache(tokio::sync::oneshot::Sender<usize>),
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is at its bound; retry later.
    QueueFull { requests: usize, tokens: usize },
    /// The model is not loaded (yet, or it failed).
    NotReady,
    /// The engine thread is gone.
    Stopped,
}

/// A handle to the engine; clone freely.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
}

impl EngineHandle {
    /// Starts the engine thread; `load` runs on it and produces the model.
    pub fn spawn<F>(config: EngineConfig, load: F) -> Self
    where
        F: FnOnce() -> alora_model::Result<LoadedModel> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            metrics: Metrics::new(),
            info: OnceLock::new(),
            state: Mutex::new(LoadState::Loading),
            waiting_requests: AtomicUsize::new(0),
            waiting_tokens: AtomicUsize::new(0),
            submitted: AtomicU64::new(0),
            config: config.clone(),
        });
        let (tx, rx) = channel();
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("alora-engine".into())
            .spawn(move || {
                let state = sh.clone();
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    core::run(config, load, sh, rx)
                }));
                let why = match ran {
                    Ok(()) => "the engine thread exited".to_string(),
                    Err(p) => match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
                        (Some(m), _) => format!("the engine thread panicked: {m}"),
                        (_, Some(m)) => format!("the engine thread panicked: {m}"),
                        _ => "the engine thread panicked".to_string(),
                    },
                };
                tracing::error!("{why}");
                let mut st = state.state.lock().unwrap_or_else(|e| e.into_inner());
                if !matches!(*st, LoadState::Failed(_)) {
                    *st = LoadState::Stopped(why);
                }
            })
            .expect("spawning the engine thread");
        EngineHandle {
            tx,
            shared,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn info(&self) -> Option<&Arc<ModelInfo>> {
        self.shared.info.get()
    }

    /// Queues a request; events arrive on the returned receiver. Dropping the receiver cancels
    /// the request and frees its blocks on the engine's next step.
    pub fn submit(&self, req: GenRequest) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let info = match (self.shared.load_state(), self.info()) {
            (LoadState::Ready, Some(info)) => info.clone(),
            (LoadState::Stopped(_), _) => return Err(SubmitError::Stopped),
            _ => return Err(SubmitError::NotReady),
        };
        let cfg = &self.shared.config;
        let tokens = req.prompt.len();
        let reqs = self.shared.waiting_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let toks = self
            .shared
            .waiting_tokens
            .fetch_add(tokens, Ordering::SeqCst)
            + tokens;
        if reqs > cfg.max_queue_requests || toks > cfg.max_queue_tokens {
            self.unqueue(tokens);
            self.shared.metrics.rejected_requests.inc();
            return Err(SubmitError::QueueFull {
                requests: cfg.max_queue_requests,
                tokens: cfg.max_queue_tokens,
            });
        }
        let (etx, erx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self
            .tx
            .send(Msg::Submit(Box::new(Seq::new(
                id,
                req,
                etx,
                &info.tokenizer.eos_token_ids,
                info.max_model_len,
            ))))
            .is_err()
        {
            self.unqueue(tokens);
            return Err(SubmitError::Stopped);
        }
        self.shared.submitted.fetch_add(1, Ordering::SeqCst);
        Ok(erx)
    }

    fn unqueue(&self, tokens: usize) {
        self.shared.waiting_requests.fetch_sub(1, Ordering::SeqCst);
        self.shared
            .waiting_tokens
            .fetch_sub(tokens, Ordering::SeqCst);
    }

    /// Empties the prefix cache of blocks no request holds; returns how many were dropped.
    pub async fn reset_prefix_cache(&self) -> Result<usize, SubmitError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::ResetPrefixCache(tx))
            .map_err(|_| SubmitError::Stopped)?;
        rx.await.map_err(|_| SubmitError::Stopped)
    }
}
