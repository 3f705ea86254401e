//! Reliability against hostile and careless clients: one case per finding of the black-box
//! battery (issue #18), each asserting the status, the error body's `param`/`code`, and that
//! unrelated requests in flight meanwhile (base chat and completion streams, LoRA and aLoRA
//! completion streams) ended with exactly the text and log-probabilities they have alone; then
//! a property test (proptest) of request parsing over chat and completion bodies.
//!
//! 1. a bad adapter is refused at load, and a forward that fails anyway fails only its request
//! 2. header and body read timeouts, a connection limit
//! 3. per-token work bounded by the request (stop strings, logit_bias, stop ids, n, prompts)
//! 4. graceful shutdown lets in-flight streams finish (the real binary on SIGTERM:
//!    `crates/cli/tests/serve_process.rs`)
//! 5. `/health` is 200 only once every start-up adapter is registered
//! 6. request preparation runs on a bounded blocking pool, not on the async workers
//! 7. a request that can never fit the queue bounds is a 400 naming the bound, not a 429
//! 8. adapter names cannot forge `/metrics` lines
//! 9. every 400 names its field, the flattened sampling fields included
//! 10. adapter files are confined by resolved path; FIFOs refused; no server paths in errors
//! 11. a denormal temperature is greedy; unload's 400 is in the OpenAPI document; logs at
//!     `info` by default, prompt text only with `--log-prompts` (`crates/cli/tests/serve_process.rs`)

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alora_server::openai::types::{CHAT_FIELDS, COMPLETION_FIELDS};
use common::{start, user, Opts, Server};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::{json, Value};

const NEIGHBOUR_TOKENS: usize = 160;

/// The neighbours' requests: base chat, LoRA and aLoRA completions, greedy and long.
fn neighbour_requests() -> Vec<(&'static str, Value)> {
    let n = NEIGHBOUR_TOKENS;
    vec![
        (
            "/v1/chat/completions",
            json!({"messages": user("tell me a story"), "max_tokens": n, "ignore_eos": true, "temperature": 0, "logprobs": true}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "the sea is", "max_tokens": n, "ignore_eos": true, "temperature": 0, "logprobs": 1}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "once upon a time", "adapter": "lora", "max_tokens": n, "ignore_eos": true, "temperature": 0, "logprobs": 1}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "xyz? abc", "adapter": "alora", "max_tokens": n, "ignore_eos": true, "temperature": 0, "logprobs": 1}),
        ),
    ]
}

fn output_text(v: &Value) -> String {
    let c = &v["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["delta"]["content"].as_str())
        .or(c["text"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The token log-probabilities of a response or stream chunk (chat or completion).
fn output_logprobs(v: &Value) -> Vec<f64> {
    let lp = &v["choices"][0]["logprobs"];
    let list = match lp["content"].as_array() {
        Some(c) => c.iter().map(|t| &t["logprob"]).collect::<Vec<_>>(),
        None => lp["token_logprobs"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
    };
    list.iter().filter_map(|x| x.as_f64()).collect()
}

/// What a neighbour produced: its text and its tokens' log-probabilities (the random-weight
/// model repeats itself, so the log-probabilities are what shows a disturbed computation).
type Output = (String, Vec<f64>);

fn output(v: &Value) -> Output {
    (output_text(v), output_logprobs(v))
}

/// Requests in flight beside a hostile case, and the outputs they must end with.
struct Neighbours {
    running: Vec<tokio::task::JoinHandle<Output>>,
    want: Vec<Output>,
}

impl Neighbours {
    /// Measures each neighbour alone, then starts all three as streams and returns once each
    /// has produced its first token.
    async fn start(s: &Server) -> Neighbours {
        let mut want = Vec::new();
        for (path, body) in neighbour_requests() {
            let (st, v) = s.post(path, body).await;
            assert_eq!(st, 200, "{v}");
            want.push(output(&v));
        }
        let mut running = Vec::new();
        let mut started = Vec::new();
        for (path, mut body) in neighbour_requests() {
            body["stream"] = json!(true);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            started.push(rx);
            let r = s
                .client
                .post(format!("{}{path}", s.url))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            running.push(tokio::spawn(async move {
                let mut events = r.bytes_stream().eventsource();
                let (mut text, mut logprobs) = (String::new(), Vec::new());
                let mut tx = Some(tx);
                while let Some(e) = events.next().await {
                    let e = match e {
                        Ok(e) => e,
                        Err(e) => return (format!("<stream broke: {e}>"), logprobs),
                    };
                    if e.data == "[DONE]" {
                        return (text, logprobs);
                    }
                    let v: Value = serde_json::from_str(&e.data).unwrap();
                    if v.get("error").is_some() {
                        return (format!("<error event: {v}>"), logprobs);
                    }
                    text.push_str(&output_text(&v));
                    logprobs.extend(output_logprobs(&v));
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                (format!("<stream ended without [DONE]: {text}>"), logprobs)
            }));
        }
        for rx in started {
            let _ = rx.await;
        }
        Neighbours { running, want }
    }

    /// Whether any neighbour is still streaming.
    fn any_running(&self) -> bool {
        self.running.iter().any(|h| !h.is_finished())
    }

    /// Every neighbour finished with its output alone: the same text, and log-probabilities
    /// equal up to the rounding that batching with others may change.
    async fn check(self, case: &str) {
        for (h, (text, logprobs)) in self.running.into_iter().zip(self.want) {
            let (got_text, got) = h.await.unwrap();
            assert_eq!(got_text, text, "{case}: a neighbour's output changed");
            assert_eq!(
                got.len(),
                NEIGHBOUR_TOKENS,
                "{case}: log-probabilities missing"
            );
            assert_eq!(got.len(), logprobs.len(), "{case}");
            for (i, (a, b)) in got.iter().zip(&logprobs).enumerate() {
                assert!(
                    (a - b).abs() < 1e-3,
                    "{case}: a neighbour's token {i} log-probability moved: {a} vs {b}"
                );
            }
        }
    }
}

/// Asserts an OpenAI error body with this status, `param` and `code`.
#[track_caller]
fn assert_error(got: (u16, &Value), status: u16, param: Option<&str>, code: Option<&str>) {
    let (st, v) = got;
    assert_eq!(st, status, "{v}");
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(),
        "not an OpenAI error body: {v}"
    );
    assert_eq!(e["param"].as_str(), param, "{v}");
    assert_eq!(e["code"].as_str(), code, "{v}");
}

/// A copy of adapter `from` under `name` in the adapter directory, with `edit` applied to its
/// config.
fn adapter_variant(s: &Server, from: &str, name: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let d = s.adapters.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(s.adapters.join(from).join(f), d.join(f)).unwrap();
    }
    let p = d.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, cfg.to_string()).unwrap();
    d
}

fn loading_opts() -> Opts {
    let mut o = Opts::default();
    o.http.enable_adapter_loading = true;
    o
}

async fn load(s: &Server, name: &str, path: &str) -> (u16, Value) {
    s.post(
        "/v1/load_lora_adapter",
        json!({"lora_name": name, "lora_path": path}),
    )
    .await
}

/// 1. Token ids past the vocabulary, non-finite factors and a truncated weights file are refused
/// at load with a 400 naming the adapter's file; and should a forward fail anyway (here an
/// adapter corrupted in memory), only the request using it fails: the step is re-run one
/// sequence at a time and its neighbours' outputs are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_01_bad_adapters_fail_only_their_own_request() {
    let s = start(loading_opts()).await;
    let vocab = s.state.engine.info().unwrap().config.vocab_size;
    adapter_variant(&s, "alora", "past_vocab", |c| {
        c["alora_invocation_tokens"] = json!([5, vocab])
    });
    let nan = adapter_variant(&s, "lora", "nan", |_| {});
    let w = nan.join("adapter_model.safetensors");
    let t = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let t: std::collections::HashMap<_, _> = t
        .into_iter()
        .map(|(k, v)| (k, (v * f64::NAN).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, &w).unwrap();
    let cut = adapter_variant(&s, "lora", "truncated", |_| {});
    let w = cut.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();

    let n = Neighbours::start(&s).await;
    for (name, words) in [
        ("past_vocab", "vocabulary"),
        ("nan", "finite"),
        ("truncated", "adapter_model.safetensors"),
    ] {
        let (st, v) = load(&s, name, name).await;
        assert_error(
            (st, &v),
            400,
            Some("lora_path"),
            Some("adapter_load_failed"),
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words) && msg.contains(name), "{name}: {msg}");
    }
    n.check("refused adapters").await;

    // A forward that fails in a step shared with others.
    let good = s.state.registry.get("lora").unwrap();
    s.state
        .registry
        .insert(Arc::new(good.broken_copy("broken").unwrap()));
    let mut overlapped = false;
    for _ in 0..3 {
        let retries = s.metric("alora:step_retries_total").await;
        let n = Neighbours::start(&s).await;
        let (st, v) = s
            .post(
                "/v1/completions",
                json!({"prompt": "hello", "adapter": "broken", "max_tokens": 4}),
            )
            .await;
        assert_error((st, &v), 500, None, None);
        let shared_a_step = n.any_running();
        n.check("a failing neighbour").await;
        if shared_a_step {
            assert!(s.metric("alora:step_retries_total").await > retries);
            overlapped = true;
            break;
        }
    }
    assert!(overlapped, "the failing request never shared a step");
    assert!(s.metric("alora:step_failed_requests_total").await >= 1.0);
    // Still serving, nothing held.
    let (st, v) = s
        .post("/v1/completions", json!({"prompt": "ok", "max_tokens": 2}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}

/// Reads what the server sends on `stream` until it closes the connection (or 5 s pass).
async fn read_until_closed(mut stream: std::net::TcpStream) -> (std::io::Result<usize>, String) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let r = stream.read_to_end(&mut buf);
        (r, String::from_utf8_lossy(&buf).into_owned())
    })
    .await
    .unwrap()
}

/// The connection was closed by the server (EOF or reset), not left open until our timeout.
#[track_caller]
fn assert_closed(read: &std::io::Result<usize>, what: &str) {
    if let Err(e) = read {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{what}: the server kept the connection open"
        );
    }
}

/// 2. A client that sends half the headers and stalls is dropped after the header read
/// timeout; one that sends the headers and part of the body gets a 408 `body_read_timeout`
/// and is dropped; connections past `max_connections` wait instead of being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_02_stalled_clients_time_out_and_connections_are_bounded() {
    let mut o = Opts::default();
    o.http.header_read_timeout = Some(Duration::from_millis(300));
    o.http.body_read_timeout = Some(Duration::from_millis(300));
    o.http.max_connections = Some(4);
    let s = start(o).await;
    let addr = s.url.trim_start_matches("http://").to_string();
    let n = Neighbours::start(&s).await;

    // Half a body, then silence: 408 naming the timeout, then the connection is closed.
    let mut half = std::net::TcpStream::connect(&addr).unwrap();
    half.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
    )
    .unwrap();
    let (read, got) = read_until_closed(half).await;
    assert_closed(&read, "half a body");
    let status: u16 = got.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body: Value = serde_json::from_str(got.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_error((status, &body), 408, None, Some("body_read_timeout"));
    n.check("a stalled body").await;

    // Half the headers, then silence: closed, never answered as a request.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        stalled.push(c);
    }
    // While they hold every connection slot, another client is not served.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    assert!(
        quick.get(format!("{}/health", s.url)).send().await.is_err(),
        "a connection was served past max_connections"
    );
    for c in stalled {
        let (read, got) = read_until_closed(c).await;
        assert_closed(&read, "half the headers");
        assert!(!got.contains("200 OK"), "{got}");
    }
    // The slots are free again.
    assert_eq!(s.get("/health").await.0, 200);
}

/// 3. Per-token work is bounded by the request: 16 stop strings of 1,024 bytes in all still
/// match in linear time (the output equals the run without them, since none occurs), and past
/// each bound (stop count and bytes, `logit_bias` entries, `stop_token_ids`, `n`, prompts,
/// `top_logprobs`) the request is a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_03_per_token_work_is_bounded() {
    let s = start(Opts::default()).await;
    let n = Neighbours::start(&s).await;
    let plain = json!({"prompt": "abcab", "max_tokens": 40, "ignore_eos": true, "temperature": 0});
    let (_, want) = s.post("/v1/completions", plain.clone()).await;
    let mut stopped = plain.clone();
    // Self-overlapping stop strings that never occur in full (the character `~` is never
    // generated here): the worst case for a naive matcher.
    stopped["stop"] = json!((0..16)
        .map(|_| format!("{}~", "ab".repeat(31) + "a"))
        .collect::<Vec<_>>());
    assert_eq!(
        stopped["stop"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().len())
            .sum::<usize>(),
        1024
    );
    let (st, got) = s.post("/v1/completions", stopped).await;
    assert_eq!(st, 200, "{got}");
    assert!(!output_text(&want).contains('~'));
    assert_eq!(output_text(&got), output_text(&want));

    let over = |field: &str, v: Value| {
        let mut b = plain.clone();
        b[field] = v;
        b
    };
    let bias: serde_json::Map<String, Value> =
        (0..301).map(|i| (i.to_string(), json!(1))).collect();
    for (field, body) in [
        ("stop", over("stop", json!(vec!["q"; 17]))),
        ("stop", over("stop", json!(["q".repeat(1025)]))),
        ("logit_bias", over("logit_bias", Value::Object(bias))),
        (
            "stop_token_ids",
            over("stop_token_ids", json!(vec![3; 257])),
        ),
        ("n", over("n", json!(17))),
        ("top_logprobs", over("logprobs", json!(21))),
        ("prompt", over("prompt", json!(vec!["x"; 65]))),
    ] {
        let (st, v) = s.post("/v1/completions", body).await;
        let param = if field == "top_logprobs" {
            "logprobs"
        } else {
            field
        };
        assert_error((st, &v), 400, Some(param), None);
    }
    n.check("bounded work").await;
}

/// 4. A graceful shutdown stops taking connections and lets in-flight streams run to their
/// end, then `serve` returns (SIGTERM and SIGINT start it in the binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_04_shutdown_lets_in_flight_streams_finish() {
    let s = start(Opts::default()).await;
    let listener = alora_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(alora_server::serve_until(
        s.state.clone(),
        listener,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let own = Server {
        url: url.clone(),
        state: s.state.clone(),
        adapters: s.adapters.clone(),
        client: reqwest::Client::new(),
    };
    let n = Neighbours::start(&own).await;
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), served)
        .await
        .expect("serve returned after its streams")
        .unwrap()
        .unwrap();
    n.check("shutdown").await;
    assert!(
        reqwest::get(format!("{url}/health")).await.is_err(),
        "no new connections after shutdown"
    );
    // The shared state says draining: any server on it reports 503 now.
    let r = s
        .client
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "shutting down");
}

/// 5. `/health` is 503 "loading adapters" until every start-up adapter is registered, and stays
/// 503 when one cannot load (the error names it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_05_health_waits_for_start_up_adapters() {
    use alora_model::{LoadOptions, LoadedModel};
    let model = common::tiny_model_dir();
    let adapters = vec![
        ("lora".to_string(), common::fixtures().join("lora")),
        ("missing".to_string(), PathBuf::from("/nonexistent/adapter")),
    ];
    let state = alora_server::start(
        alora_server::ServeConfig {
            engine: Opts::default().engine,
            http: Opts::default().http,
            adapters: adapters.clone(),
        },
        move || LoadedModel::load(&model, &LoadOptions::default()),
    );
    let url = common::listen(&state).await;
    let err = alora_server::wait_ready(&state, &adapters)
        .await
        .unwrap_err();
    assert!(err.contains("missing"), "{err}");
    let r = reqwest::get(format!("{url}/health")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "loading adapters");
}

/// 6. Request preparation (parsing, templating, tokenization) runs on a bounded blocking
/// pool: with every preparation slot taken, a generation request waits while `/health` and
/// the neighbours' streams go on; big `/tokenize` bodies all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_06_preparation_is_off_the_async_workers() {
    let s = start(Opts::default()).await;
    let n = Neighbours::start(&s).await;
    let slots = s.state.prep_permits.available_permits() as u32;
    let held = s
        .state
        .prep_permits
        .clone()
        .acquire_many_owned(slots)
        .await
        .unwrap();
    let waiting = {
        let (c, url) = (s.client.clone(), format!("{}/v1/completions", s.url));
        tokio::spawn(async move {
            c.post(url)
                .json(&json!({"prompt": "hi", "max_tokens": 2}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    for _ in 0..3 {
        let r = s
            .client
            .get(format!("{}/health", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(!waiting.is_finished(), "preparation ran without a slot");
    drop(held);
    assert_eq!(waiting.await.unwrap(), 200);
    let big = "a".repeat(60 << 10);
    let all =
        futures::future::join_all((0..4).map(|_| s.post("/tokenize", json!({"prompt": big}))))
            .await;
    for (st, v) in all {
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["count"], 60 << 10, "{v}");
    }
    n.check("preparation").await;
}

/// 7. A request that could never be queued whole is a 400 naming the bound, not a 429 with a
/// `Retry-After` that a client would honour forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_07_never_admissible_requests_are_400() {
    let mut o = Opts::default();
    o.engine.max_queue_requests = 4;
    // Room for the four neighbours' prompts together, which may all wait at once on a loaded
    // machine: at 64 a clean-clone CI run failed here with a neighbour's 429.
    o.engine.max_queue_tokens = 128;
    let s = start(o).await;
    let n = Neighbours::start(&s).await;
    // Each neighbour was admitted twice (alone, then as a stream): half the counter bounds
    // what the four queue together.
    let together = s.metric("vllm:prompt_tokens_total").await / 2.0;
    assert!(together <= 128.0, "neighbours queue {together} tokens");
    let rejected = s.metric("alora:rejected_requests_total").await;
    for (body, param) in [
        (json!({"prompt": "x", "n": 5, "max_tokens": 1}), "n"),
        (json!({"prompt": vec!["x"; 5], "max_tokens": 1}), "prompt"),
        (
            json!({"prompt": "x".repeat(129), "max_tokens": 1}),
            "prompt",
        ),
    ] {
        let (st, v) = s.post("/v1/completions", body).await;
        assert_error((st, &v), 400, Some(param), Some("queue_limit_exceeded"));
    }
    assert_eq!(
        s.metric("alora:rejected_requests_total").await,
        rejected,
        "no 429 counted"
    );
    n.check("queue bounds").await;
}

/// 8. An adapter name full of quotes, braces and newlines shows up escaped in `/metrics` and
/// cannot add a line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_08_adapter_names_cannot_forge_metrics() {
    let s = start(loading_opts()).await;
    let n = Neighbours::start(&s).await;
    let evil = "x\"} 1\nfake_metric{a=\"b";
    let (st, v) = load(&s, evil, "lora").await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": "hi", "adapter": evil, "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let text = s.get("/metrics").await.1;
    assert!(
        !text.lines().any(|l| l.starts_with("fake_metric")),
        "a forged line in /metrics"
    );
    assert!(
        text.contains(r#"x\"} 1\nfake_metric{a=\"b"#),
        "the escaped name is there"
    );
    n.check("metrics labels").await;
}

/// 9. Every 400 names its field: wrong types for each flattened sampling field, a missing
/// `tokens` on `/detokenize`, and an over-long completion prompt (`prompt`, not `messages`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_09_errors_name_the_field() {
    let s = start(Opts::default()).await;
    let n = Neighbours::start(&s).await;
    for field in [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "n",
        "ignore_eos",
    ] {
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let mut body = json!({"messages": user("hi"), "prompt": "hi", "max_tokens": 2});
            body.as_object_mut()
                .unwrap()
                .remove(if path.contains("chat") {
                    "prompt"
                } else {
                    "messages"
                });
            body[field] = json!({"wrong": ["type"]});
            let (st, v) = s.post(path, body).await;
            // `logit_bias` is an object: the error names the entry (`logit_bias.wrong`).
            let param = v["error"]["param"].as_str().unwrap_or("").to_string();
            assert!(
                param == field || param.starts_with(&format!("{field}.")),
                "{path} {field}: {v}"
            );
            assert_error((st, &v), 400, Some(&param), None);
        }
    }
    let (st, v) = s.post("/detokenize", json!({})).await;
    assert_error((st, &v), 400, Some("tokens"), None);
    let max_len = s.state.engine.info().unwrap().max_model_len;
    let (st, v) = s
        .post("/v1/completions", json!({"prompt": vec![1; max_len]}))
        .await;
    assert_error(
        (st, &v),
        400,
        Some("prompt"),
        Some("context_length_exceeded"),
    );
    n.check("field names").await;
}

/// 10. Adapter files are confined to `--adapter-dir` by resolved path: symlinks leading out
/// (the directory or its files) and non-regular files (a FIFO would hang the load) are
/// refused, and no error shows the server's paths or whether a path outside exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_10_adapter_files_are_confined() {
    let s = start(loading_opts()).await;
    let outside = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("outside-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(&outside).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(s.adapters.join("lora").join(f), outside.join(f)).unwrap();
    }
    let sneaky = s.adapters.join("sneaky");
    std::fs::create_dir_all(&sneaky).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::os::unix::fs::symlink(outside.join(f), sneaky.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(&outside, s.adapters.join("linkdir")).unwrap();
    let fifo = s.adapters.join("fifo");
    std::fs::create_dir_all(&fifo).unwrap();
    std::fs::copy(
        s.adapters.join("lora/adapter_model.safetensors"),
        fifo.join("adapter_model.safetensors"),
    )
    .unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(fifo.join("adapter_config.json"))
        .status()
        .unwrap();
    assert!(made.success());
    let root = s.adapters.canonicalize().unwrap();
    let n = Neighbours::start(&s).await;
    for (path, words) in [
        ("sneaky", "leads outside"),
        ("linkdir", "not an adapter directory"),
        ("fifo", "not a regular file"),
        ("no-such-dir", "not an adapter directory"),
        ("/etc", "not an adapter directory"),
        ("/etc/shadow", "not an adapter directory"),
        ("../../..", "not an adapter directory"),
    ] {
        let (st, v) = load(&s, "x", path).await;
        assert_error((st, &v), 400, Some("lora_path"), None);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{path}: {msg}");
        assert!(!msg.contains(root.to_str().unwrap()), "{path}: {msg}");
    }
    assert!(s.state.registry.get("x").is_none());
    n.check("confinement").await;
}

/// 11. A positive denormal temperature is greedy (the output equals temperature 0); unload
/// with an empty body is a 400 naming `lora_name`, and the OpenAPI document lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_11_small_things() {
    let s = start(loading_opts()).await;
    let n = Neighbours::start(&s).await;
    let body =
        |t: f64| json!({"prompt": "abcab", "max_tokens": 24, "ignore_eos": true, "temperature": t});
    let (_, greedy) = s.post("/v1/completions", body(0.0)).await;
    for t in [1e-45, 1e-30, 1e-6] {
        let (st, v) = s.post("/v1/completions", body(t)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(output_text(&v), output_text(&greedy), "temperature {t}");
    }
    let r = s
        .client
        .post(format!("{}/v1/unload_lora_adapter", s.url))
        .header("content-type", "application/json")
        .body("")
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().is_some(), "{v}");
    let spec: Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi/openapi.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        spec["paths"]["/v1/unload_lora_adapter"]["post"]["responses"]
            .get("400")
            .is_some(),
        "unload's 400 is documented"
    );
    n.check("small things").await;
}

/// Values to put in a field: every JSON type, empties, extremes, wrong shapes, long strings,
/// deep nesting.
fn weird_value() -> impl Strategy<Value = Value> {
    let pool = vec![
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
    prop_oneof![
        8 => proptest::sample::select(pool),
        1 => (1000usize..20_000).prop_map(|n| json!("y".repeat(n))),
        // Nested deeper than anything a field expects.
        1 => (2usize..40).prop_map(|depth| (0..depth).fold(json!(1), |v, _| json!([v]))),
    ]
}

/// One change to a valid body.
#[derive(Debug, Clone)]
enum Mutation {
    /// Drop the n-th field (never `max_tokens`: the test stays short).
    Drop(usize),
    /// Add a field the server does not know.
    Unknown(usize, Value),
    /// Set a known field (the n-th of the endpoint's fields) to any value.
    Set(usize, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<usize>().prop_map(Mutation::Drop),
        1 => (0usize..5, weird_value()).prop_map(|(k, v)| Mutation::Unknown(k, v)),
        8 => (any::<usize>(), weird_value()).prop_map(|(k, v)| Mutation::Set(k, v)),
    ]
}

fn apply(mut body: Value, fields: &[&str], mutations: &[Mutation]) -> Value {
    let obj = body.as_object_mut().unwrap();
    for m in mutations {
        match m {
            Mutation::Drop(i) => {
                let keys: Vec<String> =
                    obj.keys().filter(|k| *k != "max_tokens").cloned().collect();
                if !keys.is_empty() {
                    obj.remove(&keys[i % keys.len()]);
                }
            }
            Mutation::Unknown(k, v) => {
                obj.insert(format!("unknown_{k}"), v.clone());
            }
            Mutation::Set(i, v) => {
                let k = fields[i % fields.len()];
                if k != "max_tokens" && k != "max_completion_tokens" {
                    obj.insert(k.to_string(), v.clone());
                }
            }
        }
    }
    body
}

/// Request parsing, as a property (proptest, deterministic seed, 400 cases): any mutation of
/// a valid chat or completion body gets no 5xx, every refusal is an OpenAI error body, and
/// the server keeps serving with no KV block held. A failure shrinks to a minimal body.
#[test]
fn random_bodies_never_get_a_5xx_and_always_an_openai_error() {
    use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(start(Opts::default()));
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let completion = json!({"prompt": "ab", "max_tokens": 2});
    let config = Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let outcomes = std::cell::Cell::new((0usize, 0usize));
    let strategy = (any::<bool>(), proptest::collection::vec(mutation(), 1..3));
    let result = runner.run(&strategy, |(is_chat, mutations)| {
        let (path, body) = if is_chat {
            (
                "/v1/chat/completions",
                apply(chat.clone(), CHAT_FIELDS, &mutations),
            )
        } else {
            (
                "/v1/completions",
                apply(completion.clone(), COMPLETION_FIELDS, &mutations),
            )
        };
        let (status, v) = rt.block_on(s.post(path, body.clone()));
        let shown: String = body.to_string().chars().take(300).collect();
        let (ok, refused) = outcomes.get();
        if status < 300 {
            outcomes.set((ok + 1, refused));
            // A stream (SSE text) or a completion object.
            prop_assert!(
                v.is_string() || v["object"].as_str().is_some(),
                "{} -> {}",
                shown,
                v
            );
        } else {
            outcomes.set((ok, refused + 1));
            prop_assert!(status < 500, "{} {} -> {} {}", path, shown, status, v);
            let e = &v["error"];
            prop_assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(),
                "{} {} -> {} {}",
                path,
                shown,
                status,
                v
            );
        }
        Ok::<(), TestCaseError>(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Both outcomes occur: the mutations are neither all harmless nor all fatal.
    let (ok, refused) = outcomes.get();
    assert!(ok > 20 && refused > 100, "ok {ok}, refused {refused}");
    // Still serving, and nothing holds a block once the requests are done.
    rt.block_on(async {
        let (status, v) = s.post("/v1/completions", completion).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(s.blocks_in_use_settled().await, 0.0);
    });
}
