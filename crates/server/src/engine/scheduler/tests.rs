//! The scheduler's tests: it is driven without a model, as the engine would drive it.

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
