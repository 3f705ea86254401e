//! Sliced prefill over real HTTP (`EngineConfig::prefill_slice`): long prompts' chunks run in
//! slices of layers with short steps between them; outputs, cancellation and failures behave
//! as with the chunk in one forward. The tiny golden model and character tokenizer of http.rs.

mod common;

use std::time::Duration;

use common::{content, start, user, Opts};
use serde_json::{json, Value};

/// Long prefills' chunks run in slices of layers with short steps between them
/// (`EngineConfig::prefill_slice`): concurrent requests, long and short, with mixed adapters,
/// get the greedy outputs they get one at a time with slicing off, also when the KV cache is
/// tight enough to preempt (a chunk in flight is never a victim), and every block comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sliced_long_prefills_keep_outputs() {
    let mut o = Opts::default();
    o.engine.prefill_slice = None;
    let reference = start(o).await;
    let sliced = |kv_cache_bytes: usize| {
        let mut o = Opts::default();
        // Prompts past 8 tokens are long: chunks of 8 computed in slices, yielding at every
        // layer boundary while decodes are ready.
        o.engine.long_prefill_token_threshold = 8;
        o.engine.prefill_slice = Some(Duration::ZERO);
        o.engine.kv_cache_bytes = kv_cache_bytes;
        start(o)
    };
    let roomy = sliced(4 << 20).await;
    // 2 KiB a block (see preemption_by_recompute_keeps_outputs): 40 blocks.
    let tight = sliced(40 * 2048).await;
    let adapters = [
        None,
        Some("lora"),
        Some("alora"),
        None,
        Some("alora2"),
        None,
    ];
    let reqs: Vec<Value> = (0..6)
        .map(|i| {
            let topic = ["cats", "rain", "maps", "tea", "ships", "bees"][i];
            let text = match i % 2 {
                0 => format!("a long story about {topic} that keeps going on and on about {topic}"),
                _ => format!("hi {topic}"),
            };
            let mut r = json!({"messages": user(&text), "max_tokens": 24, "temperature": 0, "ignore_eos": true});
            if let Some(a) = adapters[i] {
                r["adapter"] = json!(a);
            }
            r
        })
        .collect();
    let mut want = Vec::new();
    for r in &reqs {
        let (st, v) = reference.post("/v1/chat/completions", r.clone()).await;
        assert_eq!(st, 200, "{v}");
        want.push(content(&v));
    }
    for (name, s) in [("roomy", &roomy), ("tight", &tight)] {
        let got = futures::future::join_all(
            reqs.iter()
                .map(|r| s.post("/v1/chat/completions", r.clone())),
        )
        .await;
        for (i, (st, v)) in got.iter().enumerate() {
            assert_eq!(*st, 200, "{name} {v}");
            assert_eq!(
                content(v),
                want[i],
                "{name}: request {i} ({:?})",
                adapters[i]
            );
        }
        assert!(
            s.metric("alora:sliced_prefill_steps_total").await > 0.0,
            "{name}: long prompts must run sliced"
        );
        assert_eq!(s.blocks_in_use_settled().await, 0.0, "{name}");
    }
    assert_eq!(
        reference.metric("alora:sliced_prefill_steps_total").await,
        0.0
    );
}

/// A client that goes away while its long prompt is being prefilled in slices: the chunk in
/// flight finishes, then the request is dropped and its blocks come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_during_a_sliced_prefill_frees_blocks() {
    let mut o = Opts::default();
    o.engine.long_prefill_token_threshold = 4;
    o.engine.prefill_slice = Some(Duration::ZERO);
    o.engine.max_num_batched_tokens = 4;
    let s = start(o).await;
    let long = "so many words in this prompt that it takes a good number of chunks ".repeat(2);
    let r = s
        .send(
            "/v1/chat/completions",
            &json!({"messages": user(&long), "max_tokens": 50, "ignore_eos": true, "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    // Gone once its prefill has started (4 tokens a chunk, ~40 chunks).
    for _ in 0..2000 {
        if s.metric("alora:sliced_prefill_steps_total").await > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(s.metric("alora:sliced_prefill_steps_total").await > 0.0);
    drop(r);
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
    assert_eq!(s.metric("vllm:num_requests_running").await, 0.0);
    // A request after it is served normally.
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": user("hello"), "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}

/// A sliced prefill step whose forward fails (an adapter with broken factors) is run again
/// whole and then sequence by sequence: that request gets a 500, requests beside it keep their
/// outputs, and nothing is held after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_sliced_prefill_fails_only_its_request() {
    let mut o = Opts::default();
    o.engine.long_prefill_token_threshold = 8;
    o.engine.prefill_slice = Some(Duration::ZERO);
    let s = start(o).await;
    let good = s.state.registry.get("lora").unwrap();
    s.state
        .registry
        .insert(std::sync::Arc::new(good.broken_copy("broken").unwrap()));
    let req = |adapter: Option<&str>, topic: &str| {
        let mut r = json!({
            "messages": user(&format!("a long story about {topic} that keeps going on and on")),
            "max_tokens": 12, "temperature": 0, "ignore_eos": true,
        });
        if let Some(a) = adapter {
            r["adapter"] = json!(a);
        }
        r
    };
    let neighbours = [req(None, "cats"), req(Some("lora"), "rain")];
    let mut want = Vec::new();
    for r in &neighbours {
        let (st, v) = s.post("/v1/chat/completions", r.clone()).await;
        assert_eq!(st, 200, "{v}");
        want.push(content(&v));
    }
    s.state.engine.reset_prefix_cache().await.unwrap();
    let steps = s.metric("alora:sliced_prefill_steps_total").await;
    let (broken, a, b) = tokio::join!(
        s.post("/v1/chat/completions", req(Some("broken"), "maps")),
        s.post("/v1/chat/completions", neighbours[0].clone()),
        s.post("/v1/chat/completions", neighbours[1].clone()),
    );
    assert_eq!(broken.0, 500, "{}", broken.1);
    for (i, (st, v)) in [a, b].iter().enumerate() {
        assert_eq!(*st, 200, "{v}");
        assert_eq!(content(v), want[i], "neighbour {i}");
    }
    assert!(s.metric("alora:sliced_prefill_steps_total").await > steps);
    assert!(s.metric("alora:step_failed_requests_total").await >= 1.0);
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}
