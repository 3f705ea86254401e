//! Reliability under careless and hostile request bodies: a seeded randomized test (a property
//! test without a framework) mutates valid chat and completion bodies field by field, with
//! values of every JSON type and edge values, and checks that the server never answers 5xx,
//! that every refusal is an OpenAI error body, and that it keeps serving afterwards with no KV
//! block held.

mod common;

use alora_server::openai::types::{CHAT_FIELDS, COMPLETION_FIELDS};
use common::{start, Opts};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Values to put in a field: every JSON type, empties, extremes, wrong shapes.
fn weird_value(rng: &mut StdRng) -> Value {
    let pool = [
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(-0.5),
        json!(3.5),
        json!(1e308),
        json!(-1e308),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(""),
        json!("x"),
        json!("ab"),
        json!("\u{0}\u{ffff}é"),
        json!("<|im_start|>"),
        json!([]),
        json!([1, 2]),
        json!([-1]),
        json!([[1, 2], [3]]),
        json!(["a", "b"]),
        json!([null]),
        json!({}),
        json!({"a": 1}),
        json!({"include_usage": true}),
        json!({"type": "text", "text": "hi"}),
        json!([{"role": "user", "content": "hi"}]),
        json!([{"role": "user"}]),
        json!([{"role": "", "content": "hi"}]),
        json!([{"role": "user", "content": [{"type": "image_url"}]}]),
        json!({"5": 100, "x": 1}),
        json!({"5": 1e9}),
    ];
    match rng.random_range(0..10) {
        0 => json!("y".repeat(rng.random_range(1000..20_000))),
        1 => {
            // Nested deeper than anything a field expects.
            let mut v = json!(1);
            for _ in 0..rng.random_range(2..40) {
                v = json!([v]);
            }
            v
        }
        _ => pool[rng.random_range(0..pool.len())].clone(),
    }
}

fn mutate(rng: &mut StdRng, mut body: Value, fields: &[&str]) -> Value {
    for _ in 0..rng.random_range(1..4) {
        let obj = body.as_object_mut().unwrap();
        match rng.random_range(0..10) {
            // Drop a field (never max_tokens: the test stays short).
            0 => {
                let keys: Vec<String> =
                    obj.keys().filter(|k| *k != "max_tokens").cloned().collect();
                if !keys.is_empty() {
                    obj.remove(&keys[rng.random_range(0..keys.len())]);
                }
            }
            // A field the server does not know.
            1 => {
                obj.insert(
                    format!("unknown_{}", rng.random_range(0..5)),
                    weird_value(rng),
                );
            }
            // A known field, any value.
            _ => {
                let k = fields[rng.random_range(0..fields.len())];
                if k != "max_tokens" && k != "max_completion_tokens" {
                    obj.insert(k.to_string(), weird_value(rng));
                }
            }
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_never_get_a_5xx_and_always_an_openai_error() {
    let s = start(Opts::default()).await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let completion = json!({"prompt": "ab", "max_tokens": 2});
    let (mut ok, mut refused) = (0, 0);
    for case in 0..400 {
        let (path, body) = if case % 2 == 0 {
            (
                "/v1/chat/completions",
                mutate(&mut rng, chat.clone(), CHAT_FIELDS),
            )
        } else {
            (
                "/v1/completions",
                mutate(&mut rng, completion.clone(), COMPLETION_FIELDS),
            )
        };
        let (status, v) = s.post(path, body.clone()).await;
        let shown = {
            let t = body.to_string();
            t.chars().take(300).collect::<String>()
        };
        assert!(status < 500, "case {case}: {path} {shown} -> {status} {v}");
        if status == 200 {
            ok += 1;
            // A stream (SSE text) or a completion object.
            assert!(
                v.is_string() || v["object"].as_str().is_some(),
                "case {case}: {shown} -> {v}"
            );
        } else {
            refused += 1;
            let e = &v["error"];
            assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(),
                "case {case}: {path} {shown} -> {status} {v}"
            );
        }
    }
    // Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert!(ok > 20 && refused > 100, "ok {ok}, refused {refused}");
    // Still serving, and nothing holds a block once the requests are done.
    let (status, v) = s.post("/v1/completions", completion).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(s.metric("alora:kv_blocks_in_use").await, 0.0);
}
