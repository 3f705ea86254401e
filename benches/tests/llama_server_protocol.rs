//! The harness against a stand-in for llama-server's HTTP surface (`/lora-adapters`,
//! `/apply-template`, `lora` lists): what the race sends a peer that takes adapters by id and
//! finds an aLoRA's invocation in the prompt. The stand-in answers every request with a fixed
//! streamed text and records the bodies; the real llama-server runs are in BENCHMARKS.md.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use alora_bench::{AdapterField, Client, Kind, LoadConfig, Target, Workload, WorkloadConfig};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

type Log = Arc<Mutex<Vec<(String, Value)>>>;

fn sse(text: &str, prompt_tokens: usize, cached: usize) -> String {
    let chunk = json!({"choices": [{"index": 0, "delta": {"content": text}, "text": text,
        "finish_reason": null}]});
    let end =
        json!({"choices": [{"index": 0, "delta": {}, "text": "", "finish_reason": "length"}]});
    let usage = json!({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
        "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": cached}}});
    format!("data: {chunk}\n\ndata: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n")
}

async fn serve() -> (String, Log) {
    let log: Log = Arc::default();
    let record = |path: &'static str| {
        move |State(log): State<Log>, Json(body): Json<Value>| async move {
            log.lock().unwrap().push((path.to_string(), body.clone()));
            Json(body)
        }
    };
    let app = Router::new()
        .route(
            "/lora-adapters",
            get(|| async {
                Json(json!([
                    {"id": 0, "path": "/m/topic.gguf", "scale": 1.0,
                     "alora_invocation_string": "<|im_start|>topic\n"},
                    {"id": 1, "path": "/m/plain-lora.gguf", "scale": 1.0,
                     "alora_invocation_string": ""},
                ]))
            })
            .post(record("POST /lora-adapters")),
        )
        .route(
            "/apply-template",
            post(
                |State(log): State<Log>, Json(body): Json<Value>| async move {
                    log.lock()
                        .unwrap()
                        .push(("/apply-template".into(), body.clone()));
                    let mut p = String::new();
                    for m in body["messages"].as_array().unwrap() {
                        let (r, c) = (m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
                        p.push_str(&format!("<|im_start|>{r}\n{c}<|im_end|>\n"));
                    }
                    Json(json!({ "prompt": p }))
                },
            ),
        )
        .route(
            "/v1/chat/completions",
            post(
                |State(log): State<Log>, Json(body): Json<Value>| async move {
                    log.lock()
                        .unwrap()
                        .push(("/v1/chat/completions".into(), body));
                    sse("answer", 40, 12)
                },
            ),
        )
        .route(
            "/v1/completions",
            post(
                |State(log): State<Log>, Json(body): Json<Value>| async move {
                    log.lock().unwrap().push(("/v1/completions".into(), body));
                    sse("sports", 44, 40)
                },
            ),
        )
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

fn target(url: &str) -> Target {
    Target {
        base_url: url.to_string(),
        api_key: None,
        model: "base".into(),
        adapter_field: AdapterField::Lora,
        ignore_eos: true,
        timeout: Duration::from_secs(30),
        extra_body: Default::default(),
    }
}

#[tokio::test]
async fn race_against_llama_server_style_adapters() {
    let (url, log) = serve().await;
    let client = Client::connect(target(&url)).await.unwrap();
    // Names: the id, or the file's stem.
    assert_eq!(client.lora("topic").unwrap().id, 0);
    assert_eq!(client.lora("0").unwrap(), client.lora("topic").unwrap());
    assert_eq!(client.lora("plain-lora").unwrap().invocation, None);
    let e = client.lora("nope").unwrap_err().to_string();
    assert!(e.contains("\"nope\"") && e.contains("plain-lora"), "{e}");

    let wl = WorkloadConfig {
        kind: Kind::Race,
        endpoint: alora_bench::Endpoint::Chat,
        input_len: 0,
        output_len: 3,
        conversation_lengths: vec![20],
        turns: 2,
        intrinsic_output_len: 1,
        adapters: vec!["topic".into(), "1".into()],
        seed: 5,
    };
    let load = LoadConfig {
        concurrency: Some(2),
        request_rate: None,
        max_concurrency: None,
        num_sessions: Some(2),
        duration: None,
        progress: false,
        seed: 0,
        think_time: std::time::Duration::ZERO,
    };
    let out = alora_bench::run(client, Workload::new(wl, None).unwrap(), &load)
        .await
        .unwrap();
    assert_eq!(out.records.len(), 2 * 2 * 3);
    assert!(out.records.iter().all(|r| r.out.ok), "{:?}", out.records);
    assert!(out.records.iter().all(|r| r.out.cached_tokens.is_some()));

    let log = log.lock().unwrap().clone();
    // First: every global scale set to 0, so base requests (no `lora`) run the base model.
    assert_eq!(log[0].0, "POST /lora-adapters");
    assert_eq!(
        log[0].1,
        json!([{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}])
    );
    let of = |path: &str| -> Vec<&Value> {
        log.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b)
            .collect()
    };
    // The aLoRA: the conversation rendered without a generation prompt, its invocation
    // appended, sent as a completion with the adapter's id.
    let renders = of("/apply-template");
    assert_eq!(renders.len(), 4);
    assert!(renders
        .iter()
        .all(|b| b["add_generation_prompt"] == json!(false)));
    let completions = of("/v1/completions");
    assert_eq!(completions.len(), 4);
    for b in &completions {
        let p = b["prompt"].as_str().unwrap();
        assert!(
            p.ends_with("<|im_start|>assistant\nanswer<|im_end|>\n<|im_start|>topic\n"),
            "{p}"
        );
        assert_eq!(b["lora"], json!([{"id": 0, "scale": 1.0}]));
        assert_eq!(b["max_tokens"], json!(1));
    }
    // The plain LoRA goes through chat with its id; base turns carry no `lora` at all.
    let chats = of("/v1/chat/completions");
    assert_eq!(chats.len(), 8);
    let (lora, base): (Vec<&&Value>, Vec<&&Value>) =
        chats.iter().partition(|b| b.get("lora").is_some());
    assert_eq!(lora.len(), 4);
    assert!(lora
        .iter()
        .all(|b| b["lora"] == json!([{"id": 1, "scale": 1.0}])));
    assert_eq!(base.len(), 4);
    // A fixed output length keeps the special tokens' text, so the answer sent back in the
    // next turn is the text of the tokens the server cached.
    assert!(base
        .iter()
        .all(|b| b["ignore_eos"] == json!(true) && b["skip_special_tokens"] == json!(false)));
    // The second base turn of a conversation carries the first turn's answer.
    assert!(base
        .iter()
        .any(|b| b["messages"].as_array().unwrap().len() == 3));
}
