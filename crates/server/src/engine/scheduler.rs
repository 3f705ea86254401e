//! The scheduler: which sequences compute which tokens this step, and whose blocks they use.
//!
//! It knows token ids, blocks and cache keys, nothing of the model, the sampler or the client:
//! each step it returns a plain [`SchedulerOutput`] keyed by sequence id, the runner computes
//! what it says, and the engine reports back what happened ([`Scheduler::computed`],
//! [`Scheduler::append_token`], [`Scheduler::remove`]). That split is what lets the tests below
//! drive it without a model, in the manner of vLLM's scheduler tests.
//!
//! Policy (vLLM v1's shape, with short work first): iteration-level. A sequence whose tokens
//! still to compute number more than `long_prefill_token_threshold` is a *long prefill*; the
//! rest (decodes, a prompt mostly found in the prefix cache, such as an aLoRA call on a
//! conversation already served) is *short*. Each step, within the token budget:
//! 1. every running short sequence gets its tokens, preempting the most recently admitted
//!    sequences by recompute when blocks run out;
//! 2. waiting short sequences are admitted, in arrival order, past waiting long ones;
//! 3. running long prefills get their next chunks, FCFS, all together at most
//!    `long_prefill_token_threshold` tokens;
//! 4. waiting long ones are admitted in arrival order within what is left of that share.
//!
//! The engine may take the long chunks (steps 3 and 4) out into a step of their own that runs
//! in slices of layers ([`Scheduler::take_long`]); until it is computed, those sequences are
//! in flight and each `schedule` plans steps 1 and 2 only, around them.
//!
//! So a step's length is bounded by its decodes plus one share of prefill, and a short request
//! never waits behind a long prompt's chunks; while long prompts wait or run, short admissions
//! leave their share, so they progress every step that decodes do not fill (no starvation). Admission needs no preemption in the step, a free seat (`max_num_seqs`)
//! and blocks; a waiting sequence is classified by a prefix-cache lookup made once.
//!
//! ```text
//!   running: [A decode 1][B prefill chunk 300][C decode 1]  + admitted: [D prefill 200 (48 cached)]
//!   one forward over 502 rows -> sample A, C, D (D's prompt done), B continues next step
//! ```

use std::collections::VecDeque;

use alora_cache::{BlockCopy, BlockId, KvCacheManager, RequestKey, SeqBlocks};

use super::request::EngineError;

/// The scheduler's limits (a subset of `EngineConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Remaining tokens past which a sequence is a long prefill, and the tokens long prefills
    /// share per step.
    pub long_prefill_token_threshold: usize,
}

/// A sequence as the scheduler sees it: tokens, progress and blocks.
#[derive(Debug)]
pub(crate) struct SchedSeq {
    id: u64,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose K/V is in `blocks`.
    num_computed: usize,
    blocks: Option<SeqBlocks>,
    key: RequestKey,
    /// Admitted at least once (a preempted sequence is re-admitted, not new).
    admitted: bool,
    /// Takes prefix-cache hits at admission. False for a request that scores its prompt
    /// (`echo` with `logprobs`): every prompt position must run to give its logits. Its
    /// blocks are still registered for others.
    reuse_prefix: bool,
    /// While waiting: tokens its first prefix-cache lookup found, which classifies it as short
    /// or long (admission looks up again).
    cached_hint: Option<usize>,
    /// Finished; computing its turn end ahead ([`Scheduler::close`]): lowest priority, never
    /// preempts and is dropped rather than preempted.
    closing: bool,
    /// Its chunk runs in a step that other steps interleave with ([`Scheduler::take_long`]):
    /// not scheduled again, never preempted, until that step is [`Scheduler::computed`].
    in_flight: bool,
}

impl SchedSeq {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Computing its turn end ahead ([`Scheduler::close`]).
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// The block table; empty while waiting.
    pub fn block_table(&self) -> &[BlockId] {
        self.blocks.as_ref().map(|b| b.blocks()).unwrap_or(&[])
    }
}

/// One sequence's work in a step: compute `num_tokens` tokens from position `start_pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub id: u64,
    pub start_pos: usize,
    pub num_tokens: usize,
    /// The step computes the last known token: its logits give the next token.
    pub samples: bool,
}

/// A first admission (not a re-admission after preemption).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    pub id: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// What one step is to do, keyed by sequence id.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SchedulerOutput {
    /// In running order; running sequences first, then this step's admissions.
    pub scheduled: Vec<Scheduled>,
    pub admitted: Vec<Admitted>,
    /// Moved back to the front of the waiting queue, their blocks freed (recomputed later).
    pub preempted: Vec<u64>,
    /// Removed for good: they can never be scheduled.
    pub rejected: Vec<(u64, EngineError)>,
    /// K/V rows admitted sequences take from partial prefix hits, by sequence id: the runner
    /// copies them, in this order, before the step's forward.
    pub copies: Vec<(u64, BlockCopy)>,
    /// Closing sequences given up for blocks that others need: removed, their blocks freed.
    pub dropped: Vec<u64>,
    /// The long prefills' chunks among `scheduled` (steps 3 and 4), which
    /// [`Scheduler::take_long`] moves to a step of their own.
    pub long: Vec<u64>,
}

impl SchedulerOutput {
    pub fn num_batched_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.num_tokens).sum()
    }
}

/// Owns the waiting queue, the running set and the KV block manager.
pub(crate) struct Scheduler {
    cache: KvCacheManager,
    waiting: VecDeque<SchedSeq>,
    running: Vec<SchedSeq>,
    cfg: SchedulerConfig,
}

impl Scheduler {
    pub fn new(cache: KvCacheManager, cfg: SchedulerConfig) -> Self {
        Scheduler {
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cfg,
        }
    }

    /// Queues a new sequence behind the waiting ones.
    #[cfg(test)]
    pub fn add(&mut self, id: u64, prompt: Vec<u32>, key: RequestKey) {
        self.add_with(id, prompt, key, true);
    }

    /// Queues a new sequence behind the waiting ones; `reuse_prefix: false` computes the whole prompt even where the
    /// prefix cache holds it (vLLM does the same for prompt logprobs).
    pub fn add_with(&mut self, id: u64, prompt: Vec<u32>, key: RequestKey, reuse_prefix: bool) {
        self.waiting.push_back(SchedSeq {
            id,
            tokens: prompt,
            num_computed: 0,
            blocks: None,
            key,
            admitted: false,
            reuse_prefix,
            cached_hint: None,
            closing: false,
            in_flight: false,
        });
    }

    pub fn cache(&mut self) -> &mut KvCacheManager {
        &mut self.cache
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn running(&self) -> impl Iterator<Item = &SchedSeq> {
        self.running.iter()
    }

    pub fn waiting(&self) -> impl Iterator<Item = &SchedSeq> {
        self.waiting.iter()
    }

    #[cfg(test)]
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Running sequences that hold a seat (`max_num_seqs`): closing ones do not.
    fn seats_taken(&self) -> usize {
        self.running.iter().filter(|s| !s.closing).count()
    }

    /// Nothing but closing sequences to run.
    pub fn only_closing(&self) -> bool {
        self.waiting.is_empty()
            && !self.running.is_empty()
            && self.running.iter().all(|s| s.closing)
    }

    /// A closing sequence, and no short work besides (long prefills aside, in flight or not).
    pub fn only_closing_beside_long(&mut self) -> bool {
        self.running.iter().any(|s| s.closing)
            && !self.has_ready_short()
            && !self.has_waiting_short()
    }

    /// Running sequence `id` finished: its `turn_end` tokens are appended and computed in a
    /// later step, after which the engine removes it. Until then it holds its blocks, takes
    /// no seat, never preempts and is dropped ([`SchedulerOutput::dropped`]) where it would be
    /// preempted or would have to preempt. False if `id` is not running.
    pub fn close(&mut self, id: u64, turn_end: &[u32]) -> bool {
        let Some(s) = self.running.iter_mut().find(|s| s.id == id) else {
            return false;
        };
        s.tokens.extend_from_slice(turn_end);
        s.closing = true;
        true
    }

    /// A long prefill's chunk is in a step not yet computed ([`Scheduler::take_long`]).
    pub fn has_in_flight(&self) -> bool {
        self.running.iter().any(|s| s.in_flight)
    }

    /// Sequence `id`'s chunk is in a step not yet computed: it must not be removed before.
    pub fn is_in_flight(&self, id: u64) -> bool {
        self.seq(id).is_some_and(|s| s.in_flight)
    }

    /// Running sequences with tokens to compute that a step can take now (decodes, short
    /// prefills), closing ones aside.
    pub fn has_ready_short(&self) -> bool {
        let threshold = self.cfg.long_prefill_token_threshold.max(1);
        self.running.iter().any(|s| {
            let rem = Self::remaining(s);
            !s.in_flight && !s.closing && rem > 0 && rem <= threshold
        })
    }

    /// A waiting request that is short (classified by its first prefix-cache lookup).
    pub fn has_waiting_short(&mut self) -> bool {
        let threshold = self.cfg.long_prefill_token_threshold.max(1);
        self.waiting
            .iter_mut()
            .any(|s| !Self::is_long_waiting(&mut self.cache, s, threshold))
    }

    /// Moves the long prefills' chunks out of `out` into a step of their own, which the
    /// engine runs in slices with `out`'s and later steps between them; until that step is
    /// [`Scheduler::computed`] its sequences are in flight: [`Scheduler::schedule`] plans only
    /// short work, around them. None if `out` has no long chunk.
    pub fn take_long(&mut self, out: &mut SchedulerOutput) -> Option<SchedulerOutput> {
        if out.long.is_empty() {
            return None;
        }
        let long = std::mem::take(&mut out.long);
        let (bg, fg): (Vec<Scheduled>, Vec<Scheduled>) = std::mem::take(&mut out.scheduled)
            .into_iter()
            .partition(|sch| long.contains(&sch.id));
        out.scheduled = fg;
        for sch in &bg {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == sch.id) {
                s.in_flight = true;
            }
        }
        (!bg.is_empty()).then(|| SchedulerOutput {
            scheduled: bg,
            ..SchedulerOutput::default()
        })
    }

    /// The running sequence `id`.
    pub fn seq(&self, id: u64) -> Option<&SchedSeq> {
        self.running.iter().find(|s| s.id == id)
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.cache.pool().num_blocks() * self.cache.block_size()
    }

    /// Plans one step (the policy above).
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let threshold = self.cfg.long_prefill_token_threshold.max(1);
        let mut long_share = threshold.min(budget);
        self.schedule_running(&mut out, &mut budget, None);
        if !out.preempted.is_empty() {
            return out;
        }
        if self.has_in_flight() {
            // A long prefill's chunk is computing in slices between steps: this step is short
            // work only, with the whole budget (the long share is being used).
            let mut unused = 0;
            self.admit(&mut out, &mut budget, false, &mut unused);
            return out;
        }
        // Short admissions leave the long prefills' share, if there are any, so a stream of
        // short requests cannot hold a long prompt back (with a threshold below the budget;
        // at the budget, long prefills take what short work leaves, as before).
        let reserve = match self.has_long_work(threshold) {
            true => long_share
                .min(self.cfg.max_num_batched_tokens.saturating_sub(threshold))
                .min(budget),
            false => 0,
        };
        let mut short_budget = budget - reserve;
        self.admit(&mut out, &mut short_budget, false, &mut long_share);
        budget = short_budget + reserve;
        let num_short = out.scheduled.len();
        self.schedule_running(&mut out, &mut budget, Some(&mut long_share));
        if out.preempted.is_empty() {
            self.admit(&mut out, &mut budget, true, &mut long_share);
        }
        out.long = out.scheduled[num_short..].iter().map(|s| s.id).collect();
        out
    }

    /// A running long prefill, or a waiting sequence that would be one (classifying every
    /// waiting sequence, once).
    fn has_long_work(&mut self, threshold: usize) -> bool {
        if self.running.iter().any(|s| Self::remaining(s) > threshold) {
            return true;
        }
        let mut long = false;
        for s in self.waiting.iter_mut() {
            long |= Self::is_long_waiting(&mut self.cache, s, threshold);
        }
        long
    }

    /// Waiting `s` is a long prefill by its first prefix-cache lookup (the one rule
    /// `has_long_work`, `has_waiting_short` and `admit` classify by).
    fn is_long_waiting(cache: &mut KvCacheManager, s: &mut SchedSeq, threshold: usize) -> bool {
        let h = Self::hint(cache, s);
        s.tokens.len() - h.min(s.tokens.len()) > threshold
    }

    /// Tokens `s`'s first prefix-cache lookup found (made now if not yet).
    fn hint(cache: &mut KvCacheManager, s: &mut SchedSeq) -> usize {
        if let Some(h) = s.cached_hint {
            return h;
        }
        let h = match s.reuse_prefix {
            true => cache.lookup(&s.tokens, &s.key).num_computed_tokens,
            false => 0,
        };
        *s.cached_hint.insert(h)
    }

    /// Tokens `s` still has to compute.
    fn remaining(s: &SchedSeq) -> usize {
        s.tokens.len() - s.num_computed
    }

    /// Steps 1 and 3: running short sequences (`long_share` None), or long prefills, capped by
    /// `long_share`. Short ones preempt to get blocks; a long prefill that cannot grow waits,
    /// unless nothing else runs this step, when it preempts too (someone must progress).
    fn schedule_running(
        &mut self,
        out: &mut SchedulerOutput,
        budget: &mut usize,
        mut long_share: Option<&mut usize>,
    ) {
        let threshold = self.cfg.long_prefill_token_threshold.max(1);
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let s = &self.running[i];
            let rem = Self::remaining(s);
            let is_long = rem > threshold;
            // Already scheduled this step: admitted as short on a prefix-cache hint the actual
            // lookup no longer found (its blocks were evicted since), so it is long by now.
            let scheduled = out.scheduled.iter().any(|x| x.id == s.id);
            if is_long != long_share.is_some() || rem == 0 || s.in_flight || scheduled {
                i += 1;
                continue;
            }
            let cap = long_share.as_deref().copied().unwrap_or(usize::MAX);
            let n = rem.min(*budget).min(cap);
            if n == 0 {
                break;
            }
            let need = s.num_computed + n;
            loop {
                let s = &mut self.running[i];
                let blocks = s.blocks.as_mut().expect("running sequences hold blocks");
                if self.cache.grow(blocks, need) {
                    out.scheduled.push(Scheduled {
                        id: s.id,
                        start_pos: s.num_computed,
                        num_tokens: n,
                        samples: need == s.tokens.len(),
                    });
                    *budget -= n;
                    if let Some(share) = long_share.as_deref_mut() {
                        *share -= n;
                    }
                    i += 1;
                    break;
                }
                if s.closing {
                    // A turn end is computed ahead only with blocks to spare.
                    let s = self.running.remove(i);
                    out.dropped.push(s.id);
                    self.drop_seq(s);
                    break;
                }
                if long_share.is_some() && !out.scheduled.is_empty() {
                    i += 1; // waits for blocks the running ones will free
                    break;
                }
                // Out of blocks: recompute the most recently admitted sequence later (a
                // closing one is dropped instead). The victims come from the end, past `i`:
                // none is scheduled yet this step. One in flight is never a victim (its
                // step writes into its blocks); `i` itself is not in flight.
                let v = self
                    .running
                    .iter()
                    .rposition(|s| !s.in_flight)
                    .expect("the sequence at i is not in flight");
                let victim = self.running.remove(v);
                let is_self = v == i;
                if victim.closing {
                    out.dropped.push(victim.id);
                    self.drop_seq(victim);
                } else {
                    out.preempted.push(victim.id);
                    self.preempt(victim);
                }
                if is_self {
                    break;
                }
            }
        }
    }

    /// Steps 2 and 4: admits waiting sequences, short ones (`long` false, past long ones) or
    /// long ones (FCFS, within `long_share`).
    fn admit(
        &mut self,
        out: &mut SchedulerOutput,
        budget: &mut usize,
        long: bool,
        long_share: &mut usize,
    ) {
        let threshold = self.cfg.long_prefill_token_threshold.max(1);
        let mut i = 0;
        while *budget > 0 && self.seats_taken() < self.cfg.max_num_seqs && i < self.waiting.len() {
            let s = &mut self.waiting[i];
            if Self::is_long_waiting(&mut self.cache, s, threshold) != long {
                i += 1;
                continue;
            }
            if long && *long_share == 0 {
                break;
            }
            let mut hit = self.cache.lookup(&s.tokens, &s.key);
            if !s.reuse_prefix {
                hit.truncate(0);
            }
            let cached = hit.num_computed_tokens;
            let cap = if long { *long_share } else { usize::MAX };
            let n = (s.tokens.len() - cached).min(*budget).min(cap);
            let Some(blocks) = self.cache.allocate(hit, s.key.clone(), cached + n) else {
                if self.running.is_empty() {
                    // Nothing will free blocks: the request cannot fit at all.
                    let s = self.waiting.remove(i).expect("index in range");
                    let err = EngineError::CacheTooSmall {
                        needed_tokens: cached + n,
                        capacity_tokens: self.capacity_tokens(),
                    };
                    out.rejected.push((s.id, err));
                    continue;
                }
                break;
            };
            let mut blocks = blocks;
            let mut s = self.waiting.remove(i).expect("index in range");
            if let Some(c) = blocks.take_copy() {
                out.copies.push((s.id, c));
            }
            if !std::mem::replace(&mut s.admitted, true) {
                out.admitted.push(Admitted {
                    id: s.id,
                    cached_tokens: cached,
                });
            }
            s.num_computed = cached;
            s.blocks = Some(blocks);
            out.scheduled.push(Scheduled {
                id: s.id,
                start_pos: cached,
                num_tokens: n,
                samples: cached + n == s.tokens.len(),
            });
            *budget -= n;
            if long {
                *long_share = long_share.saturating_sub(n);
            }
            self.running.push(s);
        }
    }

    fn drop_seq(&mut self, s: SchedSeq) {
        tracing::debug!(seq = s.id, "turn end dropped");
        if let Some(b) = s.blocks {
            self.cache.free(b);
        }
    }

    fn preempt(&mut self, mut s: SchedSeq) {
        tracing::debug!(seq = s.id, "preempted");
        if let Some(b) = s.blocks.take() {
            self.cache.free(b);
        }
        s.num_computed = 0;
        s.cached_hint = None;
        self.waiting.push_front(s);
    }

    /// The step ran: its tokens' K/V is in their blocks, and full blocks become findable.
    pub fn computed(&mut self, out: &SchedulerOutput) {
        for sch in &out.scheduled {
            let Some(s) = self.running.iter_mut().find(|s| s.id == sch.id) else {
                continue; // removed since (cancelled)
            };
            debug_assert_eq!(s.num_computed, sch.start_pos);
            s.num_computed += sch.num_tokens;
            s.in_flight = false;
            let blocks = s.blocks.as_mut().expect("running sequences hold blocks");
            self.cache.commit(blocks, &s.tokens[..s.num_computed]);
        }
    }

    /// A token was sampled for running sequence `id`; it is computed in the next step.
    pub fn append_token(&mut self, id: u64, token: u32) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }

    /// Takes `id` out, waiting or running, and frees its blocks (finish, cancel, failure).
    /// False if it is not here.
    pub fn remove(&mut self, id: u64) -> bool {
        let s = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i).expect("index in range")
        } else {
            return false;
        };
        if let Some(b) = s.blocks {
            self.cache.free(b);
        }
        true
    }
}

#[cfg(test)]
mod tests;
