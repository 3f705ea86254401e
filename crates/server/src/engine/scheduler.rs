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
        self.waiting.iter_mut().any(|s| {
            let h = Self::hint(&mut self.cache, s);
            s.tokens.len() - h.min(s.tokens.len()) <= threshold
        })
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
            let h = Self::hint(&mut self.cache, s);
            long |= s.tokens.len() - h.min(s.tokens.len()) > threshold;
        }
        long
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
            let hint = Self::hint(&mut self.cache, s);
            if (s.tokens.len() - hint.min(s.tokens.len()) > threshold) != long {
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
mod tests {
    use alora_cache::{AdapterDigest, AdapterKey, BlockHasher, CacheConfig};

    use super::*;

    const BS: usize = 4;

    fn scheduler(num_blocks: usize, max_num_seqs: usize, budget: usize) -> Scheduler {
        let cache = KvCacheManager::new(
            CacheConfig {
                block_size: BS,
                num_blocks,
            },
            BlockHasher::with_seed(7),
        );
        Scheduler::new(
            cache,
            SchedulerConfig {
                max_num_seqs,
                max_num_batched_tokens: budget,
                long_prefill_token_threshold: budget,
            },
        )
    }

    fn prompt(len: usize, salt: u32) -> Vec<u32> {
        (0..len as u32).map(|t| t * 31 + salt).collect()
    }

    /// Runs the planned step as the engine would: computed, then one token per sampling seq.
    fn run(s: &mut Scheduler, out: &SchedulerOutput) {
        s.computed(out);
        for sch in &out.scheduled {
            if sch.samples {
                s.append_token(sch.id, 1000 + sch.id as u32);
            }
        }
    }

    fn plan(out: &SchedulerOutput) -> Vec<(u64, usize, usize)> {
        out.scheduled
            .iter()
            .map(|s| (s.id, s.start_pos, s.num_tokens))
            .collect()
    }

    fn assert_no_blocks_held(s: &mut Scheduler) {
        assert!(s.is_idle());
        assert_eq!(s.cache().num_used_blocks(), 0);
        let n = s.cache().pool().num_blocks();
        s.cache().check_invariants(&vec![0; n]).unwrap();
    }

    #[test]
    fn admits_in_arrival_order_up_to_max_num_seqs() {
        let mut s = scheduler(64, 2, 1000);
        for id in 1..=3 {
            s.add(id, prompt(5, id as u32), RequestKey::base());
        }
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 0, 5), (2, 0, 5)]);
        assert_eq!(
            out.admitted.iter().map(|a| a.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(out.scheduled.iter().all(|x| x.samples));
        assert_eq!(s.num_waiting(), 1);
        run(&mut s, &out);
        // Both decode; 3 waits for a free seat.
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 5, 1), (2, 5, 1)]);
        run(&mut s, &out);
        assert!(s.remove(1));
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 6, 1), (3, 0, 5)]);
        run(&mut s, &out);
        s.remove(2);
        s.remove(3);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn the_token_budget_chunks_prefill_and_decode_goes_first() {
        let mut s = scheduler(64, 8, 6);
        s.add(1, prompt(3, 1), RequestKey::base());
        s.add(2, prompt(10, 2), RequestKey::base());
        let out = s.schedule();
        // 1 takes 3, 2 gets the 3 left: a chunk that does not sample.
        assert_eq!(plan(&out), vec![(1, 0, 3), (2, 0, 3)]);
        assert_eq!(
            out.scheduled.iter().map(|x| x.samples).collect::<Vec<_>>(),
            vec![true, false]
        );
        assert_eq!(out.num_batched_tokens(), 6);
        run(&mut s, &out);
        let out = s.schedule();
        // 1 decodes one token, 2 continues where it stopped with the rest of the budget.
        assert_eq!(plan(&out), vec![(1, 3, 1), (2, 3, 5)]);
        run(&mut s, &out);
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 4, 1), (2, 8, 2)]);
        assert!(out.scheduled[1].samples);
        run(&mut s, &out);
        assert_eq!(s.seq(2).unwrap().tokens().len(), 11);
        s.remove(1);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_closing_turn_runs_its_turn_end_without_a_seat_and_leaves_it_cached() {
        let mut s = scheduler(64, 1, 100);
        s.add(1, prompt(6, 1), RequestKey::base());
        s.add(2, prompt(5, 2), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 0, 6)], "one seat");
        run(&mut s, &out);
        // 1 finished on an EOS (not appended) after sampling its first token: the turn end
        // [90, 91] follows the token computed last step.
        assert!(s.close(1, &[90, 91]));
        assert!(!s.close(7, &[90]), "not running");
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 6, 3), (2, 0, 5)], "2 takes the seat");
        assert!(out.scheduled[0].samples);
        s.computed(&out); // the engine samples nothing for a closing turn
        let mut convo = s.seq(1).unwrap().tokens().to_vec();
        assert_eq!(convo[6..], [1001, 90, 91]);
        s.remove(1);
        // The conversation sent back finds every row of the closed turn.
        convo.extend([20, 21]);
        s.add(3, convo, RequestKey::base());
        s.remove(2);
        let out = s.schedule();
        assert_eq!(out.admitted[0].cached_tokens, 9);
        run(&mut s, &out);
        s.remove(3);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_closing_turn_is_dropped_rather_than_preempting_or_being_preempted() {
        // 4 blocks of 4: 1 (8 tokens) and 2 (7 tokens) hold two blocks each.
        let mut s = scheduler(4, 8, 100);
        s.add(1, prompt(8, 1), RequestKey::base());
        s.add(2, prompt(7, 2), RequestKey::base());
        let out = s.schedule();
        run(&mut s, &out);
        // 1 closes with 2 turn-end tokens (needs a third block); 2 decodes into its own.
        assert!(s.close(1, &[90, 91]));
        let out = s.schedule();
        assert_eq!(
            out.dropped,
            vec![1],
            "no block to spare: the turn end is given up"
        );
        assert!(out.preempted.is_empty());
        assert_eq!(plan(&out), vec![(2, 7, 1)]);
        run(&mut s, &out);
        assert!(s.seq(1).is_none());
        s.remove(2);
        assert_no_blocks_held(&mut s);

        // Again, the other way round: 2 closes, 1 decodes and needs the last free block.
        s.add(3, prompt(8, 3), RequestKey::base());
        s.add(4, prompt(7, 4), RequestKey::base());
        let out = s.schedule();
        run(&mut s, &out);
        assert!(s.close(4, &[90]));
        let out = s.schedule();
        assert_eq!(
            out.dropped,
            vec![4],
            "the victim is closing: dropped, not preempted"
        );
        assert!(out.preempted.is_empty());
        assert_eq!(plan(&out), vec![(3, 8, 1)]);
        run(&mut s, &out);
        assert_eq!(s.num_waiting(), 0);
        s.remove(3);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn preempts_the_latest_admitted_and_recomputes_it_with_its_output() {
        // 4 blocks of 4: two sequences of 8 prompt tokens fill 2 blocks each.
        let mut s = scheduler(4, 8, 100);
        s.add(1, prompt(8, 1), RequestKey::base());
        s.add(2, prompt(8, 2), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 0, 8), (2, 0, 8)]);
        run(&mut s, &out);
        // Both now need position 8, a third block each; the pool has none: 2 goes back.
        let out = s.schedule();
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(plan(&out), vec![(1, 8, 1)]);
        assert_eq!(s.num_waiting(), 1);
        assert!(s.waiting().all(|w| w.block_table().is_empty()));
        run(&mut s, &out);
        s.remove(1);
        // 2 is re-admitted with the token it had generated, and it is not a new admission.
        // 1's growth evicted 2's tail block (freed tail first); its first block is still
        // cached, so only the rest is recomputed.
        let out = s.schedule();
        assert!(out.admitted.is_empty());
        assert_eq!(plan(&out), vec![(2, 4, 5)]);
        assert_eq!(s.seq(2).unwrap().tokens()[8], 1002);
        run(&mut s, &out);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn the_latest_admitted_preempts_itself_when_it_cannot_grow() {
        // 3 blocks: 1 holds 2 (5 tokens), 2 holds 1 (4 tokens).
        let mut s = scheduler(3, 8, 100);
        s.add(1, prompt(5, 1), RequestKey::base());
        s.add(2, prompt(4, 2), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 0, 5), (2, 0, 4)]);
        run(&mut s, &out);
        // 1 decodes into its second block; 2 needs a second block, the pool is empty, and
        // the latest admitted is 2 itself.
        let out = s.schedule();
        assert_eq!(out.preempted, vec![2]);
        assert_eq!(plan(&out), vec![(1, 5, 1)]);
        // Nothing is admitted in a step that preempted.
        assert_eq!(s.num_running(), 1);
        run(&mut s, &out);
        s.remove(1);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_repeated_prompt_hits_all_but_its_last_token() {
        let mut s = scheduler(64, 8, 100);
        s.add(1, prompt(10, 1), RequestKey::base());
        let out = s.schedule();
        assert!(out.copies.is_empty(), "a cold prompt copies nothing");
        let first = s.seq(1).unwrap().block_table().to_vec();
        run(&mut s, &out);
        s.remove(1);
        s.add(2, prompt(10, 1), RequestKey::base());
        let out = s.schedule();
        assert_eq!(
            out.admitted,
            vec![Admitted {
                id: 2,
                cached_tokens: 9
            }]
        );
        // Two whole blocks, then row 8 copied from the first request's third block.
        assert_eq!(plan(&out), vec![(2, 9, 1)]);
        let second = s.seq(2).unwrap().block_table().to_vec();
        assert_eq!(second[..2], first[..2]);
        assert_eq!(
            out.copies,
            vec![(
                2,
                BlockCopy {
                    src: first[2],
                    dst: second[2],
                    rows: 1
                }
            )]
        );
        // Exactly a block multiple: one whole block and three rows of the next, the last
        // token runs.
        s.add(3, prompt(8, 1), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out).last(), Some(&(3, 7, 1)));
        s.remove(2);
        s.remove(3);
        // A salted request never shares the unsalted blocks.
        s.add(
            4,
            prompt(10, 1),
            RequestKey {
                adapter: AdapterKey::Base,
                cache_salt: Some("tenant".into()),
            },
        );
        let out = s.schedule();
        assert_eq!(out.admitted[0].cached_tokens, 0);
        s.remove(4);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn an_alora_request_finds_the_base_blocks_before_its_activation_start() {
        let mut s = scheduler(64, 8, 100);
        let conversation = prompt(13, 1);
        s.add(1, conversation.clone(), RequestKey::base());
        let out = s.schedule();
        run(&mut s, &out);
        s.remove(1);
        // The invocation starts at 10: blocks [0,4) and [4,8) are base KV, [8,12) is not, but
        // its rows 8 and 9 are.
        let mut alora = conversation[..10].to_vec();
        alora.extend([7, 7, 7]);
        let key = RequestKey {
            adapter: AdapterKey::ALora {
                digest: AdapterDigest([3; 32]),
                activation_start: 10,
            },
            cache_salt: None,
        };
        s.add(2, alora.clone(), key.clone());
        let out = s.schedule();
        // Two whole blocks and rows 8, 9 of the third: every row before s.
        assert_eq!(out.admitted[0].cached_tokens, 10);
        assert_eq!(plan(&out), vec![(2, 10, 3)]);
        assert_eq!(out.copies.len(), 1);
        assert_eq!(s.cache().stats().adapter_hit_tokens_from_base, 10);
        // A plain LoRA on the same tokens adapts every token: no hit.
        s.add(
            3,
            alora,
            RequestKey {
                adapter: AdapterKey::Lora(AdapterDigest([3; 32])),
                cache_salt: None,
            },
        );
        let out = s.schedule();
        assert_eq!(out.admitted[0].cached_tokens, 0);
        s.remove(2);
        s.remove(3);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn cancelling_while_queued_or_running_frees_everything() {
        let mut s = scheduler(64, 1, 100);
        s.add(1, prompt(9, 1), RequestKey::base());
        s.add(2, prompt(9, 2), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 0, 9)]);
        // Cancelled after scheduling, before the step's result: the result is ignored.
        assert!(s.remove(1));
        run(&mut s, &out);
        assert!(!s.remove(1));
        // 2 is cancelled while queued: it never runs.
        assert!(s.remove(2));
        assert!(s.schedule().scheduled.is_empty());
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_request_that_can_never_fit_is_rejected_with_the_limit() {
        let mut s = scheduler(2, 8, 100);
        s.add(1, prompt(9, 1), RequestKey::base());
        s.add(2, prompt(5, 2), RequestKey::base());
        let out = s.schedule();
        assert_eq!(
            out.rejected,
            vec![(
                1,
                EngineError::CacheTooSmall {
                    needed_tokens: 9,
                    capacity_tokens: 8
                }
            )]
        );
        // The next in line is not held up by it.
        assert_eq!(plan(&out), vec![(2, 0, 5)]);
        run(&mut s, &out);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn waits_rather_than_rejects_while_others_hold_blocks() {
        let mut s = scheduler(3, 8, 100);
        s.add(1, prompt(8, 1), RequestKey::base());
        s.add(2, prompt(8, 2), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 0, 8)]);
        assert!(out.rejected.is_empty());
        assert_eq!(s.num_waiting(), 1);
        run(&mut s, &out);
        s.remove(1);
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 0, 8)]);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }

    fn with_threshold(mut s: Scheduler, t: usize) -> Scheduler {
        s.cfg.long_prefill_token_threshold = t;
        s
    }

    #[test]
    fn short_work_goes_first_and_long_prefills_share_the_threshold() {
        // Budget 20, long prefills share 8 tokens a step.
        let mut s = with_threshold(scheduler(64, 8, 20), 8);
        s.add(1, prompt(40, 1), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 0, 8)]);
        run(&mut s, &out);
        // A short request arrives: admitted, all of it, before the long one's next chunk.
        s.add(2, prompt(5, 2), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 0, 5), (1, 8, 8)]);
        run(&mut s, &out);
        // 2 decodes first; 1 keeps its share. Its last 8 tokens are short: it samples.
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 5, 1), (1, 16, 8)]);
        run(&mut s, &out);
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 6, 1), (1, 24, 8)]);
        run(&mut s, &out);
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(1, 32, 8), (2, 7, 1)]);
        assert!(out.scheduled[0].samples);
        run(&mut s, &out);
        s.remove(1);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_cached_call_jumps_a_waiting_long_prompt() {
        let mut s = with_threshold(scheduler(64, 8, 16), 8);
        // A conversation of 24 tokens is served, and its blocks stay cached.
        let conv = prompt(24, 3);
        s.add(1, conv.clone(), RequestKey::base());
        for _ in 0..3 {
            let out = s.schedule();
            run(&mut s, &out);
        }
        s.remove(1);
        // A long prompt arrives, then a call on the conversation (4 new tokens).
        s.add(2, prompt(30, 4), RequestKey::base());
        let mut call = conv.clone();
        call.extend([7, 8, 9, 10]);
        s.add(3, call, RequestKey::base());
        let out = s.schedule();
        // 3 is short (24 cached): admitted first, past 2, which gets the long share.
        assert_eq!(plan(&out), vec![(3, 24, 4), (2, 0, 8)]);
        assert_eq!(
            out.admitted,
            vec![
                Admitted {
                    id: 3,
                    cached_tokens: 24
                },
                Admitted {
                    id: 2,
                    cached_tokens: 0
                }
            ]
        );
        assert!(out.scheduled[0].samples);
        run(&mut s, &out);
        s.remove(2);
        s.remove(3);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn long_prompts_progress_under_a_stream_of_short_ones() {
        let mut s = with_threshold(scheduler(256, 64, 12), 4);
        s.add(1, prompt(40, 1), RequestKey::base());
        let mut done = 0;
        for step in 0..10u64 {
            // Every step a new short request, each decoding afterwards.
            s.add(100 + step, prompt(3, 100 + step as u32), RequestKey::base());
            let out = s.schedule();
            let long = out
                .scheduled
                .iter()
                .find(|x| x.id == 1)
                .map(|x| x.num_tokens);
            assert!(
                long.is_some_and(|n| n >= 1),
                "step {step}: {:?}",
                plan(&out)
            );
            done += long.unwrap();
            run(&mut s, &out);
        }
        assert!(done >= 10, "{done}");
        s.remove(1);
        for step in 0..10u64 {
            s.remove(100 + step);
        }
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_long_chunk_in_flight_is_not_rescheduled_and_short_work_runs_around_it() {
        // Budget 20, long prefills share 8 tokens a step.
        let mut s = with_threshold(scheduler(64, 8, 20), 8);
        s.add(1, prompt(40, 1), RequestKey::base());
        s.add(2, prompt(5, 2), RequestKey::base());
        let mut out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 0, 5), (1, 0, 8)]);
        assert_eq!(out.long, vec![1]);
        let bg = s.take_long(&mut out).expect("a long chunk");
        assert_eq!(plan(&out), vec![(2, 0, 5)]);
        assert_eq!(plan(&bg), vec![(1, 0, 8)]);
        assert!(out.long.is_empty() && bg.long.is_empty());
        assert!(s.is_in_flight(1) && !s.is_in_flight(2));
        run(&mut s, &out);
        assert!(s.has_ready_short());
        // While 1's chunk computes: 2 decodes, a new short request is admitted with the
        // whole budget, and 1 is not scheduled again.
        s.add(3, prompt(6, 3), RequestKey::base());
        let mut out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 5, 1), (3, 0, 6)]);
        assert!(out.long.is_empty());
        assert!(s.take_long(&mut out).is_none());
        run(&mut s, &out);
        // A long prompt that arrives meanwhile waits for the chunk in flight.
        s.add(4, prompt(30, 4), RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 6, 1), (3, 6, 1)]);
        run(&mut s, &out);
        // The chunk is done: 1 goes on with the long share (4 waits behind it, FCFS).
        s.computed(&bg);
        assert!(!s.has_in_flight());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 7, 1), (3, 7, 1), (1, 8, 8)]);
        assert_eq!(out.long, vec![1]);
        run(&mut s, &out);
        for id in 1..=4 {
            s.remove(id);
        }
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_sequence_in_flight_is_never_preempted() {
        // 2 blocks of 4. 2 (short, 4 tokens) and 1's first chunk of 4 (long) take one each;
        // 1 is admitted last, so it would be the victim, but its chunk is in flight.
        let mut s = with_threshold(scheduler(2, 8, 100), 4);
        s.add(2, prompt(4, 2), RequestKey::base());
        s.add(1, prompt(12, 1), RequestKey::base());
        let mut out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 0, 4), (1, 0, 4)]);
        let bg = s.take_long(&mut out).expect("a long chunk");
        run(&mut s, &out);
        // 2 needs a second block for its decode; none is free: 2 goes back, not 1.
        let out = s.schedule();
        assert_eq!(out.preempted, vec![2]);
        assert!(out.scheduled.is_empty());
        assert!(s.is_in_flight(1));
        assert_eq!(s.seq(1).unwrap().block_table().len(), 1);
        s.computed(&bg);
        assert_eq!(s.seq(1).unwrap().num_computed, 4);
        s.remove(1);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }

    #[test]
    fn a_request_classified_short_on_a_stale_hit_is_scheduled_once() {
        // 4 blocks of 4, one seat, long past 4 tokens. A's 12 tokens leave 3 cached blocks.
        let mut s = with_threshold(scheduler(4, 1, 100), 4);
        let a = prompt(12, 1);
        s.add(1, a.clone(), RequestKey::base());
        for _ in 0..3 {
            let out = s.schedule();
            s.computed(&out);
        }
        assert_eq!(s.seq(1).unwrap().num_computed, 12);
        s.remove(1);
        // C takes the seat; B (A's prompt and 2 more) waits, classified short on A's blocks.
        s.add(3, prompt(4, 3), RequestKey::base());
        let mut b = a.clone();
        b.extend([5, 6]);
        s.add(2, b, RequestKey::base());
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(3, 0, 4)]);
        run(&mut s, &out);
        // C grows to 16 tokens and evicts A's blocks; then it is done.
        for _ in 0..12 {
            let out = s.schedule();
            run(&mut s, &out);
        }
        assert_eq!(s.seq(3).unwrap().tokens().len(), 17);
        s.remove(3);
        // B's hit is gone: it is admitted with all 14 tokens to compute, once.
        let out = s.schedule();
        assert_eq!(plan(&out), vec![(2, 0, 14)]);
        run(&mut s, &out);
        s.remove(2);
        assert_no_blocks_held(&mut s);
    }
}
