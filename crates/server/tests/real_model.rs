//! The server on the real default model (SmolLM2-135M-Instruct GGUF, fetched by the README's
//! test command): a chat answer through HTTP matches the model's greedy reference answer
//! (`model/tests/fixtures/smollm2_greedy.json`, made with transformers), and the same
//! conversation's next turn is served mostly from cached blocks. The committed demo aLoRA
//! (`demo/topic-alora`) answers the README's examples as the README says. The README's
//! `required` tool call to a two-argument function comes back (greedy) with the arguments it
//! shows, valid under the function's schema, streamed and not, the same.
//! Without the model file this fails, unless ALORA_SKIP_REAL_MODEL=1.

mod common;

use std::path::PathBuf;

use alora_model::{LoadOptions, LoadedModel};
use alora_server::{EngineConfig, HttpConfig, ServeConfig};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_over_http() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        if std::env::var("ALORA_SKIP_REAL_MODEL").as_deref() == Ok("1") {
            return;
        }
        panic!(
            "{} is missing: run scripts/fetch-model.sh (or set ALORA_SKIP_REAL_MODEL=1)",
            path.display()
        );
    }
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("crates/model/tests/fixtures/smollm2_greedy.json"))
            .unwrap(),
    )
    .unwrap();
    let case = &golden["cases"][1];
    let cfg = ServeConfig {
        engine: EngineConfig {
            kv_cache_bytes: 64 << 20,
            ..Default::default()
        },
        http: HttpConfig {
            max_body_bytes: 1 << 20,
            ..Default::default()
        },
        adapters: vec![("topic".into(), root.join("demo/topic-alora"))],
    };
    let state = alora_server::start(cfg, move || {
        LoadedModel::load(&path, &LoadOptions::default())
    });
    let url = format!("{}/v1/chat/completions", common::listen(&state).await);
    alora_server::wait_ready(&state, &[("topic".into(), root.join("demo/topic-alora"))])
        .await
        .unwrap();

    let client = reqwest::Client::new();
    let question = case["chat"].as_str().unwrap();
    let n = case["greedy_ids"].as_array().unwrap().len();
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": n, "temperature": 0, "ignore_eos": true});
    let r: Value = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let info = state.info().unwrap();
    let ids: Vec<u32> = case["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let expected = info.tokenizer.decode(&ids, true).unwrap();
    let answer = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(answer, expected);
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(
        r["usage"]["prompt_tokens"],
        case["prompt_ids"].as_array().unwrap().len()
    );

    let next = json!({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "And of Italy?"}], "max_tokens": 8, "temperature": 0});
    let r2: Value = client
        .post(&url)
        .json(&next)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= 32,
        "second turn reuses the first turn's blocks: {r2}"
    );

    // The README's first example, then its demo: a base turn, then the intrinsic on it.
    let readme = json!({"messages": [{"role": "user", "content": "What happened today?"},
        {"role": "assistant", "content": "The forecast calls for heavy rain and strong winds tonight."}],
        "adapter": "topic", "max_tokens": 4, "temperature": 0});
    let post = |b: Value| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.post(&url).json(&b).send().await.unwrap();
            r.json::<Value>().await.unwrap()
        }
    };
    assert_eq!(
        post(readme).await["choices"][0]["message"]["content"],
        "weather"
    );
    let q = json!({"role": "user", "content": "Who won the cup final last night?"});
    let base = post(json!({"messages": [q], "max_tokens": 40, "temperature": 0})).await;
    let a = base["choices"][0]["message"]["content"].clone();
    let topic = post(json!({"model": "topic", "max_tokens": 4, "temperature": 0,
        "messages": [q, {"role": "assistant", "content": a}]}))
    .await;
    assert_eq!(
        topic["choices"][0]["message"]["content"], "sports",
        "{topic}"
    );
    let cached = topic["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = topic["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt - cached <= 8,
        "the intrinsic computes only its last few tokens: {topic}"
    );

    // Tool calling on SmolLM2 (its template does not render tools: the forced call's grammar
    // carries the function's name and argument schema).
    // The README's example, verbatim.
    let params = json!({"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}});
    let tools = json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": params}}],
        "tool_choice": "required", "temperature": 0});
    let whole = post(tools.clone()).await;
    let ch = &whole["choices"][0];
    assert_eq!(ch["finish_reason"], "tool_calls", "{whole}");
    let call = &ch["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather", "{whole}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(
        jsonschema::validator_for(&params).unwrap().is_valid(&args),
        "{args}"
    );
    assert_eq!(
        args,
        json!({"city": "Paris", "unit": "celsius"}),
        "as the README shows"
    );
    let mut stream_body = tools;
    stream_body["stream"] = true.into();
    let text = client
        .post(&url)
        .json(&stream_body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (mut name, mut streamed_args) = (String::new(), String::new());
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let c: Value = serde_json::from_str(line).unwrap();
        for d in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            name.push_str(d["function"]["name"].as_str().unwrap_or(""));
            streamed_args.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(
        (name.as_str(), streamed_args.as_str()),
        ("get_weather", call["arguments"].as_str().unwrap())
    );
}
