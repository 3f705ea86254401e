//! The engine loop: receive, drop cancelled, schedule, run one forward, sample, stream.
//!
//! Three stages with plain data between them: the [`Scheduler`] plans a step as a
//! [`SchedulerOutput`] keyed by sequence id (see scheduler.rs for the policy); the runner
//! ([`Engine::step`]) builds the model batch from it, runs one forward and samples the sequences
//! whose prompt is complete; the output stage ([`Engine::on_token`], [`Engine::finish`]) pushes
//! each token through the request's `OutputStream` and streams it to the client.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alora_cache::{BlockHasher, CacheConfig, CacheStats, KvCacheManager};
use alora_model::{CausalLm, KvStore, LoadedModel, SeqStep, StepInProgress, StepLogits, Tokenizer};

use super::request::{EngineError, Event, Finish, TokenEvent, Usage};
use super::scheduler::{Scheduled, Scheduler, SchedulerConfig, SchedulerOutput};
use super::seq::Seq;
use super::{EngineConfig, LoadState, ModelInfo, Msg, Shared};

struct Engine {
    model: CausalLm,
    tokenizer: Tokenizer,
    kv: KvStore,
    /// Tokens, blocks and what runs when.
    sched: Scheduler,
    /// Runner and output state of every request the scheduler holds, by id.
    seqs: HashMap<u64, Box<Seq>>,
    shared: Arc<Shared>,
    max_model_len: usize,
    last_stats: CacheStats,
    /// When the last reply that closes its turn finished: requests submitted after it wait
    /// for the next step (which computes the turn end), so one sent after the response finds
    /// the turn end cached.
    closed_at: Option<Instant>,
    close_grace: Duration,
    /// `EngineConfig::prefill_slice`.
    prefill_slice: Option<Duration>,
    /// The long prefills' step computing in slices, if one is.
    background: Option<Background>,
    /// `Shared::submitted` before the channel was last drained.
    drained_submissions: u64,
}

/// What the loop does next.
enum Next {
    /// Drain the channel, schedule and run a step.
    Step,
    /// Start the loop over.
    Again,
    /// The channel is closed: the engine stops.
    Stop,
}

/// A step of long prefill chunks ([`Scheduler::take_long`]) between its layers.
struct Background {
    out: SchedulerOutput,
    step: StepInProgress,
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

/// Leaves the waiting-queue accounting the handlers' bound is checked against.
fn unqueue(shared: &Shared, seq: &mut Seq) {
    if std::mem::replace(&mut seq.queued, false) {
        shared.waiting_requests.fetch_sub(1, Ordering::SeqCst);
        shared
            .waiting_tokens
            .fetch_sub(seq.num_prompt, Ordering::SeqCst);
    }
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
        let kv_dtype = cfg.kv_cache_dtype.unwrap_or(model.dtype());
        let dtype_bytes = kv_dtype.size_in_bytes();
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
        let kv = model.new_kv_store_as(cache_cfg.num_blocks, cfg.block_size, kv_dtype)?;
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
            kv_cache_dtype: kv_dtype,
            grammars: Default::default(),
            token_bytes: Default::default(),
        };
        let _ = shared.info.set(Arc::new(info));
        let sched = Scheduler::new(
            cache,
            SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                long_prefill_token_threshold: cfg.long_prefill_token_threshold,
            },
        );
        Ok(Engine {
            model,
            tokenizer,
            kv,
            sched,
            seqs: HashMap::new(),
            shared,
            max_model_len,
            last_stats: CacheStats::default(),
            closed_at: None,
            close_grace: cfg.close_turn_grace,
            prefill_slice: cfg.prefill_slice,
            background: None,
            drained_submissions: 0,
        })
    }

    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            if self.sched.is_idle() {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(m) => self.handle(m),
                    Err(RecvTimeoutError::Timeout) => {
                        self.publish_gauges();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            match self.await_call(&rx) {
                Next::Step => {}
                Next::Again => continue,
                Next::Stop => return,
            }
            let closed_at = self.closed_at.take();
            let mut after_close = Vec::new();
            // Submissions counted from here on may not be drained below: a sliced step yields
            // for them.
            self.drained_submissions = self.shared.submitted.load(Ordering::SeqCst);
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Submit(seq) if closed_at.is_some_and(|t| seq.arrival >= t) => {
                        after_close.push(Msg::Submit(seq));
                    }
                    m => self.handle(m),
                }
            }
            self.drop_cancelled();
            let mut out = self.sched.schedule();
            self.on_schedule(&out);
            self.copy_kv(&mut out);
            let long = match self.prefill_slice {
                Some(_) => self.sched.take_long(&mut out),
                None => None,
            };
            if !out.scheduled.is_empty() {
                self.step(&out);
            }
            if let Some(long) = long {
                self.begin_background(long);
            }
            // Requests held back for the turn end are admitted next, before any more prefill.
            let held = !after_close.is_empty();
            for m in after_close {
                self.handle(m);
            }
            if !held {
                self.advance_background(None);
            }
            self.publish_gauges();
        }
    }

    /// The turn-end grace. A reply just finished and nothing else runs (but a sliced
    /// prefill): a request sent right after it (the call on the conversation) computes the
    /// turn end itself rather than wait behind a speculative step; only if none comes within
    /// `close_grace` is it computed ahead. A sliced prefill goes on meanwhile.
    fn await_call(&mut self, rx: &Receiver<Msg>) -> Next {
        let alone = match self.background {
            None => self.sched.only_closing(),
            Some(_) => self.sched.only_closing_beside_long(),
        };
        let Some(t) = self.closed_at.filter(|_| alone) else {
            return Next::Step;
        };
        let left = self.close_grace.saturating_sub(t.elapsed());
        if left.is_zero() {
            return Next::Step;
        }
        let got = match self.background {
            None => rx.recv_timeout(left),
            Some(_) => {
                self.drained_submissions = self.shared.submitted.load(Ordering::SeqCst);
                match rx.try_recv() {
                    Ok(m) => Ok(m),
                    Err(TryRecvError::Empty) => {
                        self.advance_background(Some(t + self.close_grace));
                        return Next::Again;
                    }
                    Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                }
            }
        };
        match got {
            Ok(m @ Msg::Submit(_)) => {
                self.drop_closing();
                self.closed_at = None;
                self.handle(m);
                Next::Step
            }
            Ok(m) => {
                self.handle(m);
                Next::Again
            }
            Err(RecvTimeoutError::Timeout) => Next::Step,
            Err(RecvTimeoutError::Disconnected) => Next::Stop,
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Submit(mut seq) => {
                self.shared
                    .metrics
                    .adapter_requests
                    .get_or_create(&crate::metrics::AdapterLabel {
                        adapter: seq.adapter_label().to_string().into(),
                    })
                    .inc();
                let prompt = std::mem::take(&mut seq.prompt);
                let reuse_prefix = seq.prompt_scores.is_none();
                self.sched
                    .add_with(seq.id, prompt, seq.key.clone(), reuse_prefix);
                self.seqs.insert(seq.id, seq);
            }
            Msg::ResetPrefixCache(tx) => {
                let _ = tx.send(self.sched.cache().reset_prefix_cache());
            }
        }
    }

    /// Takes request `id` out of the scheduler (freeing its blocks) and the engine.
    fn remove(&mut self, id: u64) -> Option<Box<Seq>> {
        self.sched.remove(id);
        let mut s = self.seqs.remove(&id)?;
        unqueue(&self.shared, &mut s);
        Some(s)
    }

    /// Sequence `id` has answered and computes its turn end ([`Scheduler::close`]).
    fn is_closing(&self, id: u64) -> bool {
        self.sched.seq(id).is_some_and(|s| s.is_closing())
    }

    /// Gives up the turn ends not computed yet.
    fn drop_closing(&mut self) {
        let ids: Vec<u64> = self
            .sched
            .running()
            .filter(|s| s.is_closing())
            .map(|s| s.id())
            .collect();
        for id in ids {
            self.remove(id);
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .seqs
            .values()
            // A closing sequence has answered: its client is gone by design. One in flight
            // goes once its step is done (the step writes into its blocks until then).
            .filter(|s| {
                s.is_cancelled() && !self.is_closing(s.id) && !self.sched.is_in_flight(s.id)
            })
            .map(|s| s.id)
            .collect();
        for id in gone {
            tracing::debug!(seq = id, "cancelled");
            self.remove(id);
        }
    }

    /// Books what the scheduler decided besides the batch: admissions, preemptions, rejections.
    fn on_schedule(&mut self, out: &SchedulerOutput) {
        let m = &self.shared.metrics;
        for a in &out.admitted {
            let Some(s) = self.seqs.get_mut(&a.id) else {
                continue;
            };
            s.cached_tokens = Some(a.cached_tokens);
            if s.admitted_at.is_none() {
                let now = Instant::now();
                m.queue_time.observe((now - s.arrival).as_secs_f64());
                s.admitted_at = Some(now);
            }
            m.prompt_tokens.inc_by(s.num_prompt as u64);
            unqueue(&self.shared, s);
        }
        m.num_preemptions.inc_by(out.preempted.len() as u64);
        for id in &out.dropped {
            self.remove(*id);
        }
        for (id, err) in &out.rejected {
            self.fail(*id, err.clone());
        }
    }

    fn fail(&mut self, id: u64, err: EngineError) {
        if let Some(s) = self.remove(id) {
            let _ = s.tx.send(Event::Error(err));
        }
    }

    /// Makes the step's partial-hit copies: the rows a new sequence shares with a donor block
    /// go into its own block before the forward, which may write over the donor. A failed copy
    /// fails the sequences that needed it, and only those.
    fn copy_kv(&mut self, out: &mut SchedulerOutput) {
        if out.copies.is_empty() {
            return;
        }
        let bs = self.kv.block_size();
        let slot = |b: alora_cache::BlockId, r: usize| (b.index() * bs + r) as u32;
        let (src, dst): (Vec<u32>, Vec<u32>) = out
            .copies
            .iter()
            .flat_map(|(_, c)| (0..c.rows).map(move |r| (slot(c.src, r), slot(c.dst, r))))
            .unzip();
        if let Err(e) = self.kv.copy_slots(&src, &dst) {
            tracing::error!(rows = src.len(), "K/V copy failed: {e}");
            let ids: Vec<u64> = out.copies.iter().map(|(id, _)| *id).collect();
            out.scheduled.retain(|s| !ids.contains(&s.id));
            for id in ids {
                self.shared.metrics.step_failed_requests.inc();
                self.fail(id, EngineError::Step);
            }
        }
    }

    /// The runner: one forward over the scheduled tokens, then sampling where a prompt is done.
    fn step(&mut self, out: &SchedulerOutput) {
        let result = {
            let steps: Vec<SeqStep<'_>> =
                out.scheduled.iter().map(|sch| self.seq_step(sch)).collect();
            let _span = tracing::debug_span!(
                "step",
                seqs = steps.len(),
                tokens = out.num_batched_tokens()
            )
            .entered();
            self.model.forward(&steps, &self.kv)
        };
        self.after_forward(out, result);
    }

    /// Starts the long prefills' step `long` (its sequences are in flight): embeds it; its
    /// layers run in [`Engine::advance_background`].
    fn begin_background(&mut self, long: SchedulerOutput) {
        let begun = {
            let steps: Vec<SeqStep<'_>> = long
                .scheduled
                .iter()
                .map(|sch| self.seq_step(sch))
                .collect();
            self.model.begin(&steps, &self.kv)
        };
        match begun {
            Ok(step) => {
                self.shared.metrics.sliced_prefill_steps.inc();
                self.background = Some(Background { out: long, step });
            }
            Err(e) => {
                tracing::error!("sliced step failed to start: {e}; running it whole");
                self.step(&long);
            }
        }
    }

    /// Runs the long prefills' step until it is done, or until short work waits: a request
    /// submitted since the channel was drained or a short one waiting (at the next layer
    /// boundary), or decodes ready after the step has computed for `prefill_slice`, or (after
    /// a layer) at `until`. Done, its chunks are booked and sampled as any step's.
    fn advance_background(&mut self, until: Option<Instant>) {
        let Some(mut bg) = self.background.take() else {
            return;
        };
        let slice = self.prefill_slice.unwrap_or(Duration::MAX);
        let short_ready = self.sched.has_ready_short();
        let short_waiting = self.sched.has_waiting_short();
        let shared = self.shared.clone();
        let seen = self.drained_submissions;
        let started = Instant::now();
        let first = bg.step.layers_done();
        // A new submission stops it even before its first layer (each can do so once: the
        // loop drains it); the rest only after a layer, so the step always progresses.
        let mut yield_at = |layer: usize| {
            shared.submitted.load(Ordering::SeqCst) != seen
                || (layer > first
                    && (short_waiting
                        || (short_ready && started.elapsed() >= slice)
                        || until.is_some_and(|u| Instant::now() >= u)))
        };
        let ran = {
            let _span = tracing::debug_span!(
                "background step",
                seqs = bg.out.scheduled.len(),
                tokens = bg.out.num_batched_tokens(),
                from_layer = bg.step.layers_done()
            )
            .entered();
            self.model.advance(&mut bg.step, &self.kv, &mut yield_at)
        };
        match ran {
            Ok(false) => {
                self.shared.metrics.sliced_prefill_yields.inc();
                self.background = Some(bg);
            }
            Ok(true) => {
                let result = self.model.finish(bg.step);
                self.after_forward(&bg.out, result);
            }
            Err(e) => {
                // Run it again whole, which retries each sequence alone if it fails again
                // (the same K/V into the same slots; nothing was committed yet).
                tracing::error!("sliced step failed: {e}; running it whole");
                self.step(&bg.out);
            }
        }
    }

    /// A forward's result for step `out`: book, sample and stream; on failure, each sequence
    /// alone.
    fn after_forward(&mut self, out: &SchedulerOutput, result: alora_model::Result<StepLogits>) {
        let result = result.and_then(|l| {
            let rows = l.logits.to_vec2::<f32>()?;
            Ok((rows, l.rows))
        });
        match result {
            Ok((rows, ranges)) => {
                let per_seq: Vec<&[Vec<f32>]> = ranges.iter().map(|r| &rows[r.clone()]).collect();
                self.complete(out, &out.scheduled.iter().collect::<Vec<_>>(), &per_seq);
            }
            Err(e) if out.scheduled.len() == 1 => {
                tracing::error!(seq = out.scheduled[0].id, "forward failed: {e}");
                self.shared.metrics.step_failed_requests.inc();
                self.fail(out.scheduled[0].id, EngineError::Step);
            }
            Err(e) => {
                // One request's failure must not fail its neighbours: run each alone, fail
                // the ones that fail again, keep the rest. (Re-running writes the same K/V into
                // the same slots; nothing was committed to the prefix cache yet.)
                tracing::error!(
                    seqs = out.scheduled.len(),
                    "forward failed: {e}; retrying each sequence alone"
                );
                self.shared.metrics.step_retries.inc();
                let mut ok = Vec::new();
                let mut logits = Vec::new();
                for sch in &out.scheduled {
                    match self.forward_one(sch) {
                        Ok(l) => {
                            ok.push(sch);
                            logits.push(l);
                        }
                        Err(e) => {
                            tracing::error!(seq = sch.id, "forward failed alone: {e}");
                            self.shared.metrics.step_failed_requests.inc();
                            self.fail(sch.id, EngineError::Step);
                        }
                    }
                }
                let per_seq: Vec<&[Vec<f32>]> = logits.iter().map(Vec::as_slice).collect();
                self.complete(out, &ok, &per_seq);
            }
        }
    }

    /// Batch row for one scheduled piece of work.
    fn seq_step(&self, sch: &Scheduled) -> SeqStep<'_> {
        let s = self.sched.seq(sch.id).expect("scheduled sequences run");
        let seq = &self.seqs[&sch.id];
        SeqStep {
            tokens: &s.tokens()[sch.start_pos..sch.start_pos + sch.num_tokens],
            start_pos: sch.start_pos,
            adapter: seq.active.clone(),
            block_table: s.block_table(),
            // A prompt being scored needs every row's logits (each scores the next token).
            all_logits: seq.prompt_scores.is_some(),
        }
    }

    /// One sequence's forward alone (the retry after a failed batch): its logits rows.
    fn forward_one(&self, sch: &Scheduled) -> alora_model::Result<Vec<Vec<f32>>> {
        let l = self.model.forward(&[self.seq_step(sch)], &self.kv)?;
        let rows = l.logits.to_vec2::<f32>()?;
        Ok(rows)
    }

    /// After a forward: books the computed tokens (of the sequences still here), scores
    /// prompts that ask for it, and samples where a prompt is done; `rows[i]` are `ran[i]`'s
    /// logits rows (its last token's, or every token's when it scores its prompt).
    fn complete(&mut self, out: &SchedulerOutput, ran: &[&Scheduled], rows: &[&[Vec<f32>]]) {
        self.sched.computed(out);
        for (sch, rows) in ran.iter().zip(rows) {
            if self.is_closing(sch.id) {
                if sch.samples {
                    let s = self.seqs.get(&sch.id);
                    let n = s
                        .and_then(|s| s.turn_end.as_ref())
                        .map_or(0, |e| e.ids.len());
                    self.shared.metrics.turn_end_tokens.inc_by(n as u64);
                    self.remove(sch.id); // its turn end is in the prefix cache now
                }
                continue;
            }
            self.score_prompt(sch, rows);
            if !sch.samples {
                continue; // mid-prefill chunk
            }
            let Some(s) = self.seqs.get_mut(&sch.id) else {
                continue;
            };
            if let Some((_, scores)) = s.prompt_scores.take() {
                let _ = s.tx.send(Event::Prompt(scores));
            }
            if s.output.is_empty_limit() {
                // `max_tokens: 0` (prompt scoring, echo): the prompt has run, nothing more.
                self.finish(sch.id, Finish::Length);
                continue;
            }
            let Some(last) = rows.last() else { continue };
            if let Some(f) = self.on_token(sch, last) {
                self.finish(sch.id, f);
            }
        }
    }

    /// Scores the prompt tokens this step's rows predict (row j, at position p, scores the
    /// token at p + 1). Positions already scored (a chunk re-run after preemption) are skipped.
    fn score_prompt(&mut self, sch: &Scheduled, rows: &[Vec<f32>]) {
        let Some(s) = self.seqs.get_mut(&sch.id) else {
            return;
        };
        let Some((k, scores)) = &mut s.prompt_scores else {
            return;
        };
        let Some(tokens) = self.sched.seq(sch.id).map(|q| q.tokens()) else {
            return;
        };
        let prompt = &tokens[..s.num_prompt];
        if scores.is_empty() {
            scores.push(TokenEvent {
                id: prompt[0],
                text: String::new(),
                logprob: None,
                top: vec![],
            });
        }
        for (j, row) in rows.iter().enumerate() {
            let target = sch.start_pos + j + 1;
            if target != scores.len() || target >= prompt.len() {
                continue;
            }
            let (logprob, top) = alora_model::sampling::token_logprobs(row, prompt[target], *k);
            scores.push(TokenEvent {
                id: prompt[target],
                text: String::new(),
                logprob: Some(logprob),
                top,
            });
        }
        if scores.len() == prompt.len() {
            // Each token's share of the prompt text, as the output's tokens get theirs.
            let mut dec = alora_model::IncrementalDecoder::new(false);
            for t in scores.iter_mut() {
                t.text = dec
                    .push(&self.tokenizer, t.id)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
            }
            if let (Some(last), Ok(Some(rest))) = (scores.last_mut(), dec.flush(&self.tokenizer)) {
                last.text.push_str(&rest);
            }
        }
    }

    /// Samples, appends and streams one token; returns the finish reason when done.
    fn on_token(&mut self, sch: &Scheduled, logits: &[f32]) -> Option<Finish> {
        match self.sample_and_stream(sch, logits) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(seq = sch.id, "{e}");
                self.fail(sch.id, e);
                None
            }
        }
    }

    /// [`Engine::on_token`]'s work; an error fails only this request.
    fn sample_and_stream(
        &mut self,
        sch: &Scheduled,
        logits: &[f32],
    ) -> Result<Option<Finish>, EngineError> {
        let s = self
            .seqs
            .get_mut(&sch.id)
            .expect("scheduled sequences exist");
        // Before `min_tokens`, no EOS or stop id (vLLM's min-tokens logits processor); a
        // grammar that allows nothing else still gets its way.
        let hold = !s.output.may_stop();
        let output = &s.output;
        let sampled = match &mut s.constraint {
            None if !hold => s.sampler.sample(logits),
            None => s
                .sampler
                .sample_allowed(logits, Some(&|t| !output.is_held_id(t))),
            Some(c) => {
                let mask = c.allowed().map_err(EngineError::Grammar)?;
                let both = |t: u32| mask.is_allowed(t) && !output.is_held_id(t);
                let hold = hold && (0..logits.len() as u32).any(both);
                s.sampler.sample_allowed(
                    logits,
                    Some(&|t| mask.is_allowed(t) && !(hold && output.is_held_id(t))),
                )
            }
        };
        let now = Instant::now();
        let m = &self.shared.metrics;
        match s.last_token_at {
            None => {
                m.ttft.observe((now - s.arrival).as_secs_f64());
                if let Some(t) = s.admitted_at {
                    m.prefill_time.observe((now - t).as_secs_f64());
                }
            }
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        let t = sampled.token;
        let pushed = s.output.push(&self.tokenizer, t);
        if !pushed.appended {
            // An EOS or stop id ends the output; like OpenAI and vLLM, it counts as generated.
            s.num_generated += 1;
            m.generation_tokens.inc();
            return Ok(pushed.finish);
        }
        let mut finish = pushed.finish;
        if let Some(c) = &mut s.constraint {
            c.consume(t).map_err(EngineError::Grammar)?;
            // The grammar is complete and allows nothing more: done, without waiting for EOS.
            if c.is_stopped() && finish.is_none() {
                finish = Some(Finish::Stop);
            }
        }
        s.num_generated += 1;
        self.sched.append_token(sch.id, t);
        m.generation_tokens.inc();
        let _ = s.tx.send(Event::Token(TokenEvent {
            id: t,
            text: pushed.text,
            logprob: sampled.logprob,
            top: sampled.top,
        }));
        Ok(finish)
    }

    fn finish(&mut self, id: u64, finish: Finish) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        // Release what was held back (an incomplete character, a possible stop-string prefix)
        // unless a stop string already cut the output.
        let text = s.output.finish(&self.tokenizer);
        let usage = Usage {
            prompt_tokens: s.num_prompt,
            completion_tokens: s.num_generated,
            cached_tokens: s.cached_tokens.unwrap_or(0),
        };
        let removed = match self.turn_end_ahead(id) {
            // The turn end is computed in the next step (before new requests are read); the
            // client hears now, and the blocks are freed after that step.
            Some(ids) => {
                self.sched.close(id, &ids);
                self.closed_at = Some(Instant::now());
                None
            }
            // Blocks go back to the pool, and the gauges say so, before the client hears it
            // is done: whoever reads /metrics after a response sees the blocks free.
            None => {
                let Some(s) = self.remove(id) else { return };
                self.publish_kv_gauges();
                Some(s)
            }
        };
        let Some(s) = removed
            .as_deref()
            .or_else(|| self.seqs.get(&id).map(|s| &**s))
        else {
            return;
        };
        self.shared
            .metrics
            .e2e
            .observe(s.arrival.elapsed().as_secs_f64());
        let _ = s.tx.send(Event::Done {
            text,
            finish,
            usage,
        });
    }

    /// The turn end to compute ahead for finished sequence `id`, if it has one and the
    /// conversation the client sends back would hold it right after the output: the reply's
    /// text followed by the turn end tokenizes to the output's tokens followed by the turn
    /// end's (not so after a stop string cut the text, a special token was skipped, or the
    /// text re-tokenizes otherwise), and the whole fits the context.
    fn turn_end_ahead(&self, id: u64) -> Option<Vec<u32>> {
        let s = self.seqs.get(&id)?;
        let end = s.turn_end.as_ref()?;
        let tokens = self.sched.seq(id)?.tokens();
        if tokens.len() + end.ids.len() > self.max_model_len {
            return None;
        }
        let output = &tokens[s.num_prompt..];
        let text = format!("{}{}", s.output.text_so_far(), end.text);
        let ids = self.tokenizer.encode(&text).ok()?;
        (ids.len() == output.len() + end.ids.len()
            && ids.starts_with(output)
            && ids.ends_with(&end.ids))
        .then(|| end.ids.clone())
    }

    fn publish_kv_gauges(&mut self) {
        let m = &self.shared.metrics;
        let cache = self.sched.cache();
        m.kv_cache_usage_perc.set(cache.usage());
        m.kv_blocks_in_use.set(cache.num_used_blocks() as i64);
    }

    fn publish_gauges(&mut self) {
        self.publish_kv_gauges();
        let m = &self.shared.metrics;
        let running = self.sched.running().filter(|s| !s.is_closing());
        m.num_requests_running.set(running.count() as i64);
        m.num_requests_waiting.set(self.sched.num_waiting() as i64);
        let st = self.sched.cache().stats();
        m.prefix_cache_queries
            .inc_by(st.query_tokens - self.last_stats.query_tokens);
        m.prefix_cache_hits
            .inc_by(st.hit_tokens - self.last_stats.hit_tokens);
        m.adapter_tokens_from_base_blocks
            .inc_by(st.adapter_hit_tokens_from_base - self.last_stats.adapter_hit_tokens_from_base);
        self.last_stats = st;
        let names = |ids: &mut dyn Iterator<Item = u64>| {
            let mut n: Vec<String> = ids
                .filter_map(|id| self.seqs.get(&id)?.adapter_name.clone())
                .collect();
            n.sort();
            n.dedup();
            n.join(",")
        };
        let labels = crate::metrics::LoraInfoLabels {
            running_lora_adapters: names(
                &mut self
                    .sched
                    .running()
                    .filter(|s| !s.is_closing())
                    .map(|s| s.id()),
            )
            .into(),
            waiting_lora_adapters: names(&mut self.sched.waiting().map(|s| s.id())).into(),
            max_lora: "0".into(),
        };
        m.lora_requests_info.clear();
        m.lora_requests_info.get_or_create(&labels).set(1);
    }
}
