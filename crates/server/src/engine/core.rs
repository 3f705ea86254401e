//! The engine loop: receive, drop cancelled, schedule, run one forward, sample, stream.
//!
//! Scheduling is iteration-level and FCFS (vLLM v1's shape): each step first gives every
//! running sequence its next tokens (one decode token, or the next prefill chunk) within the
//! token budget, preempting the most recently admitted sequences by recompute when blocks run
//! out; then admits waiting sequences, each after a prefix-cache lookup, while blocks, the
//! budget and `max_num_seqs` allow.
//!
//! ```text
//!   running: [A decode 1][B prefill chunk 300][C decode 1]  + admitted: [D prefill 200 (48 cached)]
//!   one forward over 502 rows -> sample A, C, D (D's prompt done), B continues next step
//! ```

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alora_cache::{BlockHasher, CacheConfig, CacheStats, KvCacheManager};
use alora_model::{CausalLm, KvStore, LoadedModel, SeqStep, Tokenizer};

use super::request::{EngineError, Event, Finish, TokenEvent, Usage};
use super::seq::Seq;
use super::{EngineConfig, LoadState, ModelInfo, Msg, Shared};

struct Engine {
    model: CausalLm,
    tokenizer: Tokenizer,
    kv: KvStore,
    cache: KvCacheManager,
    waiting: VecDeque<Box<Seq>>,
    // Boxed like `waiting` so moving a sequence between the two moves a pointer.
    #[allow(clippy::vec_box)]
    running: Vec<Box<Seq>>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    max_model_len: usize,
    last_stats: CacheStats,
}

pub(super) fn run<F>(cfg: EngineConfig, load: F, shared: Arc<Shared>, rx: Receiver<Msg>)
where
    F: FnOnce() -> alora_model::Result<LoadedModel>,
{
    let mut engine = match Engine::new(cfg, load, shared.clone()) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("model load failed: {e}");
            *shared.state.lock().expect("state lock") = LoadState::Failed(e.to_string());
            // Keep draining so submitters see a closed engine rather than a hang.
            while let Ok(msg) = rx.recv() {
                if let Msg::Submit(seq) = msg {
                    let _ = seq.tx.send(Event::Error(EngineError::NotLoaded));
                }
            }
            return;
        }
    };
    *shared.state.lock().expect("state lock") = LoadState::Ready;
    tracing::info!(
        blocks = engine.kv.num_blocks(),
        max_model_len = engine.max_model_len,
        "engine ready"
    );
    engine.run(rx);
}

impl Engine {
    fn new<F>(cfg: EngineConfig, load: F, shared: Arc<Shared>) -> alora_model::Result<Self>
    where
        F: FnOnce() -> alora_model::Result<LoadedModel>,
    {
        let LoadedModel {
            model,
            tokenizer,
            template,
            name,
        } = load()?;
        let mc = model.config().clone();
        let dtype_bytes = model.dtype().size_in_bytes();
        let cache_cfg = CacheConfig::from_budget(
            cfg.kv_cache_bytes,
            cfg.block_size,
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            dtype_bytes,
        );
        if cache_cfg.num_blocks == 0 {
            return Err(alora_model::ModelError::Config(format!(
                "--kv-cache-memory {} bytes holds no block of {} tokens",
                cfg.kv_cache_bytes, cfg.block_size
            )));
        }
        let kv = model.new_kv_store(cache_cfg.num_blocks, cfg.block_size)?;
        let cache = KvCacheManager::new(cache_cfg, BlockHasher::random());
        let max_model_len = model
            .max_positions()
            .min(cache_cfg.num_blocks * cfg.block_size);
        let info = ModelInfo {
            name,
            config: mc,
            tokenizer: tokenizer.clone(),
            template,
            device: model.device().clone(),
            max_model_len,
            num_blocks: cache_cfg.num_blocks,
        };
        let _ = shared.info.set(Arc::new(info));
        Ok(Engine {
            model,
            tokenizer,
            kv,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cfg,
            shared,
            max_model_len,
            last_stats: CacheStats::default(),
        })
    }

    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(m) => self.handle(m),
                    Err(RecvTimeoutError::Timeout) => {
                        self.publish_gauges();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            self.drop_cancelled();
            let plan = self.schedule();
            if !plan.is_empty() {
                self.step(&plan);
            }
            self.publish_gauges();
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Submit(seq) => {
                self.shared
                    .metrics
                    .adapter_requests
                    .get_or_create(&crate::metrics::AdapterLabel {
                        adapter: seq.adapter_label().to_string(),
                    })
                    .inc();
                self.waiting.push_back(seq);
            }
            Msg::ResetPrefixCache(tx) => {
                let _ = tx.send(self.cache.reset_prefix_cache());
            }
        }
    }

    /// Leaves the waiting-queue accounting the handlers' bound is checked against.
    fn unqueue(&self, seq: &mut Seq) {
        if std::mem::replace(&mut seq.queued, false) {
            self.shared.waiting_requests.fetch_sub(1, Ordering::SeqCst);
            self.shared
                .waiting_tokens
                .fetch_sub(seq.num_prompt, Ordering::SeqCst);
        }
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].is_cancelled() {
                let mut s = self.waiting.remove(i).expect("index in range");
                self.unqueue(&mut s);
                self.release(s);
            } else {
                i += 1;
            }
        }
        let (gone, keep): (Vec<_>, Vec<_>) = self.running.drain(..).partition(|s| s.is_cancelled());
        self.running = keep;
        for s in gone {
            tracing::debug!(seq = s.id, "cancelled");
            self.release(s);
        }
    }

    fn release(&mut self, mut s: Box<Seq>) {
        if let Some(b) = s.blocks.take() {
            self.cache.free(b);
        }
    }

    /// Returns (index into `running`, tokens to compute) for this step.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let mut plan = Vec::new();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = (self.running[i].tokens.len() - self.running[i].num_computed).min(budget);
            let need = self.running[i].num_computed + n;
            loop {
                let s = &mut self.running[i];
                let blocks = s.blocks.as_mut().expect("running sequences hold blocks");
                if self.cache.grow(blocks, need) {
                    plan.push((i, n));
                    budget -= n;
                    i += 1;
                    break;
                }
                // Out of blocks: recompute the most recently admitted sequence later.
                let victim = self.running.pop().expect("running is not empty");
                let is_self = self.running.len() == i;
                self.preempt(victim);
                preempted = true;
                if is_self {
                    break;
                }
            }
        }
        if preempted {
            return plan;
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(s) = self.waiting.front() else { break };
            let hit = self.cache.lookup(&s.tokens, &s.key);
            let cached = hit.num_computed_tokens;
            let n = (s.tokens.len() - cached).min(budget);
            let Some(blocks) = self.cache.allocate(hit, s.key.clone(), cached + n) else {
                if self.running.is_empty() {
                    // Nothing will free blocks: the request cannot fit at all.
                    let s = self.waiting.pop_front().expect("front exists");
                    let err = EngineError::CacheTooSmall {
                        needed_tokens: cached + n,
                        capacity_tokens: self.kv.num_blocks() * self.cfg.block_size,
                    };
                    self.fail(s, err);
                    continue;
                }
                break;
            };
            let mut s = self.waiting.pop_front().expect("front exists");
            self.unqueue(&mut s);
            if s.cached_tokens.is_none() {
                s.cached_tokens = Some(cached);
                let m = &self.shared.metrics;
                m.prompt_tokens.inc_by(s.num_prompt as u64);
            }
            s.num_computed = cached;
            s.blocks = Some(blocks);
            plan.push((self.running.len(), n));
            budget -= n;
            self.running.push(s);
        }
        plan
    }

    fn preempt(&mut self, mut s: Box<Seq>) {
        tracing::debug!(seq = s.id, "preempted");
        if let Some(b) = s.blocks.take() {
            self.cache.free(b);
        }
        s.num_computed = 0;
        self.shared.metrics.num_preemptions.inc();
        self.waiting.push_front(s);
    }

    fn fail(&mut self, mut s: Box<Seq>, err: EngineError) {
        self.unqueue(&mut s);
        let _ = s.tx.send(Event::Error(err));
        self.release(s);
    }

    fn step(&mut self, plan: &[(usize, usize)]) {
        let result = {
            let steps: Vec<SeqStep<'_>> = plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    SeqStep {
                        tokens: &s.tokens[s.num_computed..s.num_computed + n],
                        start_pos: s.num_computed,
                        adapter: s.active.clone(),
                        block_table: s.blocks.as_ref().expect("scheduled with blocks").blocks(),
                        all_logits: false,
                    }
                })
                .collect();
            let _span = tracing::debug_span!("step", seqs = steps.len()).entered();
            self.model.forward(&steps, &self.kv).and_then(|l| {
                let rows = l.logits.to_vec2::<f32>()?;
                Ok((rows, l.rows))
            })
        };
        let (rows, ranges) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let s = self.running.remove(i);
                    self.fail(s, EngineError::Step);
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (j, &(i, n)) in plan.iter().enumerate() {
            let s = &mut self.running[i];
            s.num_computed += n;
            let computed = s.num_computed;
            self.cache
                .commit(s.blocks.as_mut().expect("blocks"), &s.tokens[..computed]);
            if computed < s.tokens.len() {
                continue; // mid-prefill chunk
            }
            let sampled = s.sampler.sample(&rows[ranges[j].end - 1]);
            if let Some(f) = self.on_token(i, sampled) {
                finished.push((i, f));
            }
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, f) in finished {
            let s = self.running.remove(i);
            self.finish(s, f);
        }
    }

    /// Appends a sampled token and streams its text; returns the finish reason when done.
    fn on_token(&mut self, i: usize, sampled: alora_model::Sampled) -> Option<Finish> {
        let s = &mut self.running[i];
        let now = Instant::now();
        let m = &self.shared.metrics;
        match s.last_token_at {
            None => m.ttft.observe((now - s.arrival).as_secs_f64()),
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        let t = sampled.token;
        let pushed = s.output.push(&self.tokenizer, t);
        if !pushed.appended {
            return pushed.finish;
        }
        s.tokens.push(t);
        m.generation_tokens.inc();
        let _ = s.tx.send(Event::Token(TokenEvent {
            id: t,
            text: pushed.text,
            logprob: sampled.logprob,
            top: sampled.top,
        }));
        pushed.finish
    }

    fn finish(&mut self, mut s: Box<Seq>, finish: Finish) {
        // Release what was held back (an incomplete character, a possible stop-string prefix)
        // unless a stop string already cut the output.
        let text = s.output.finish(&self.tokenizer);
        let usage = Usage {
            prompt_tokens: s.num_prompt,
            completion_tokens: s.num_generated(),
            cached_tokens: s.cached_tokens.unwrap_or(0),
        };
        self.shared
            .metrics
            .e2e
            .observe(s.arrival.elapsed().as_secs_f64());
        // Blocks go back to the pool, and the gauges say so, before the client hears it is
        // done: whoever reads /metrics after a response sees the blocks free.
        if let Some(b) = s.blocks.take() {
            self.cache.free(b);
        }
        self.publish_kv_gauges();
        let _ = s.tx.send(Event::Done {
            text,
            finish,
            usage,
        });
    }

    fn publish_kv_gauges(&mut self) {
        let m = &self.shared.metrics;
        m.kv_cache_usage_perc.set(self.cache.usage());
        m.kv_blocks_in_use.set(self.cache.num_used_blocks() as i64);
    }

    fn publish_gauges(&mut self) {
        self.publish_kv_gauges();
        let m = &self.shared.metrics;
        m.num_requests_running.set(self.running.len() as i64);
        m.num_requests_waiting.set(self.waiting.len() as i64);
        let st = self.cache.stats();
        m.prefix_cache_queries
            .inc_by(st.query_tokens - self.last_stats.query_tokens);
        m.prefix_cache_hits
            .inc_by(st.hit_tokens - self.last_stats.hit_tokens);
        m.adapter_tokens_from_base_blocks
            .inc_by(st.adapter_hit_tokens_from_base - self.last_stats.adapter_hit_tokens_from_base);
        self.last_stats = st;
        let names = |v: &mut dyn Iterator<Item = &Box<Seq>>| {
            let mut n: Vec<String> = v
                .filter_map(|s| s.req.adapter.as_ref().map(|a| a.name.clone()))
                .collect();
            n.sort();
            n.dedup();
            n.join(",")
        };
        let labels = crate::metrics::LoraInfoLabels {
            running_lora_adapters: names(&mut self.running.iter()),
            waiting_lora_adapters: names(&mut self.waiting.iter()),
            max_lora: "0".into(),
        };
        m.lora_requests_info.clear();
        m.lora_requests_info.get_or_create(&labels).set(1);
    }
}
