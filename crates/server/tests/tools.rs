//! Tool calling over HTTP on the tiny model: forced calls (`required`, a named function) under
//! their schemas, `auto` outputs read by the tool-call parser (a regex structured output makes
//! the random model write a given text), streamed deltas that rebuild the non-streamed
//! result, adapters with tools, conversations that carry calls and results, and the errors.

mod common;

use alora_model::tools::ToolFormat;
use common::{start, user, Opts};
use serde_json::{json, Value};

fn add_tool() -> Value {
    json!({"type": "function", "function": {"name": "add", "strict": true, "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer", "enum": [1, 2, 3]}, "op": {"enum": ["plus", "minus"]}},
        "required": ["a", "op"], "additionalProperties": false}}})
}

fn neg_tool() -> Value {
    json!({"type": "function", "function": {"name": "neg", "parameters": {
        "type": "object", "properties": {"x": {"enum": [5, 6]}}, "required": ["x"]}}})
}

/// (name, arguments) of a non-streamed choice's calls.
fn calls(v: &Value) -> Vec<(String, String)> {
    v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    assert_eq!(c["type"], "function");
                    assert!(c["id"].as_str().unwrap().starts_with("call_"));
                    let f = &c["function"];
                    (
                        f["name"].as_str().unwrap().into(),
                        f["arguments"].as_str().unwrap().into(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A stream's content, calls (rebuilt from deltas: id and name first, then arguments) and
/// finish reason.
fn streamed(chunks: &[Value]) -> (String, Vec<(String, String)>, String) {
    let (mut content, mut calls, mut finish) =
        (String::new(), Vec::<(String, String)>::new(), String::new());
    for c in chunks {
        let Some(ch) = c["choices"].get(0) else {
            continue;
        };
        content.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        for d in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                // The first delta of a call carries its id, type and name.
                assert!(d["id"].as_str().unwrap().starts_with("call_"), "{d}");
                assert_eq!(d["type"], "function");
                calls.push((
                    d["function"]["name"].as_str().unwrap().into(),
                    String::new(),
                ));
            } else {
                assert!(
                    d.get("id").is_none() && d["function"].get("name").is_none(),
                    "{d}"
                );
            }
            calls[i]
                .1
                .push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    (content, calls, finish)
}

/// Non-streamed and streamed, the same request gives the same content, calls and finish.
async fn both(s: &common::Server, body: Value) -> (Option<String>, Vec<(String, String)>, String) {
    let (st, v) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let ch = &v["choices"][0];
    let whole = (
        ch["message"]["content"].as_str().map(str::to_string),
        calls(&v),
        ch["finish_reason"].as_str().unwrap().to_string(),
    );
    let (content, scalls, finish) = streamed(&s.stream("/v1/chat/completions", body).await);
    assert_eq!(
        whole.0.clone().unwrap_or_default(),
        content,
        "content, stream vs whole"
    );
    assert_eq!(
        (&whole.1, &whole.2),
        (&scalls, &finish),
        "calls, stream vs whole"
    );
    whole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_calls_follow_their_schemas() {
    let s = start(Opts::default()).await;
    for (choice, parallel) in [
        (json!("required"), json!(false)),
        (json!("required"), json!(true)),
        (
            json!({"type": "function", "function": {"name": "neg"}}),
            json!(null),
        ),
    ] {
        for seed in [1, 2, 3] {
            let body = json!({"messages": user("sum"), "tools": [add_tool(), neg_tool()],
                              "tool_choice": choice, "parallel_tool_calls": parallel,
                              "seed": seed, "max_tokens": 200});
            let (content, calls, finish) = both(&s, body).await;
            // Parallel calls allowed, a random model may call until the limit: the calls it
            // finished are returned.
            if parallel == true && finish == "length" {
                assert!(!calls.is_empty());
            } else {
                assert_eq!(finish, "tool_calls", "{choice}: {calls:?}");
            }
            assert_eq!(content, None, "{choice}");
            assert!(!calls.is_empty());
            if parallel == false || choice.is_object() {
                assert_eq!(calls.len(), 1, "{choice}");
            }
            for (name, args) in &calls {
                let args: Value = serde_json::from_str(args).unwrap();
                match name.as_str() {
                    "add" => {
                        assert!([1, 2, 3].contains(&args["a"].as_i64().unwrap()), "{args}");
                        assert!(["plus", "minus"].contains(&args["op"].as_str().unwrap()));
                    }
                    "neg" => assert!([5, 6].contains(&args["x"].as_i64().unwrap()), "{args}"),
                    n => panic!("call to {n}"),
                }
                if choice.is_object() {
                    assert_eq!(name, "neg");
                }
            }
        }
    }
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_outputs_are_read_by_the_parser() {
    let mut o = Opts::default();
    o.http.tool_call_parser = Some(ToolFormat::Llama3Json);
    let s = start(o).await;
    let ask = |regex: &str| {
        json!({"messages": user("sum"), "tools": [add_tool(), neg_tool()], "max_tokens": 120,
               "structured_outputs": {"regex": regex}})
    };
    // Two calls, Llama 3 style.
    let two = r#"\{"name": "add", "parameters": \{"a": 2, "op": "plus"\}\}; \{"name": "neg", "parameters": \{"x": 5\}\}"#;
    let (content, calls, finish) = both(&s, ask(two)).await;
    assert_eq!(content, None);
    assert_eq!(
        calls,
        vec![
            ("add".to_string(), r#"{"a":2,"op":"plus"}"#.to_string()),
            ("neg".to_string(), r#"{"x":5}"#.to_string())
        ]
    );
    assert_eq!(finish, "tool_calls");
    // parallel_tool_calls false: the first call only.
    let mut one = ask(two);
    one["parallel_tool_calls"] = false.into();
    assert_eq!(both(&s, one).await.1.len(), 1);
    // Plain text and a malformed call are content, with the engine's finish reason.
    for text in ["the sum is three", r#"{"name": "add", "parameters": 3}"#] {
        let re = regex_escape(text);
        let (content, calls, finish) = both(&s, ask(&re)).await;
        assert_eq!(
            (content.as_deref(), calls.len(), finish.as_str()),
            (Some(text), 0, "stop")
        );
    }
    // `tool_choice: "none"`: never parsed.
    let mut none = ask(two);
    none["tool_choice"] = "none".into();
    let (content, calls, _) = both(&s, none).await;
    assert!(calls.is_empty() && content.unwrap().starts_with("{\"name\""));
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '{' | '}' | '[' | ']' | '(' | ')' | '.' | '+' | '*' | '?' | '|' | '\\' | '^' | '$' => {
                format!("\\{c}")
            }
            c => c.to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_call_tools_and_conversations_carry_calls() {
    let s = start(Opts::default()).await;
    let history = json!([
        {"role": "user", "content": "sum"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 1, \"op\": \"plus\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]);
    for adapter in [None, Some("lora"), Some("alora")] {
        // One call (its arguments are enums): the output always ends, whatever is sampled.
        let mut body = json!({"messages": history, "tools": [add_tool()], "tool_choice": "required",
                              "parallel_tool_calls": false, "max_tokens": 200, "logprobs": true,
                              "seed": 5});
        if let Some(a) = adapter {
            body["model"] = a.into();
        }
        let (st, v) = s.post("/v1/chat/completions", body).await;
        assert_eq!(st, 200, "{adapter:?}: {v}");
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{adapter:?}"
        );
        assert_eq!(calls(&v)[0].0, "add");
        // Logprobs keep their shape: one entry per generated token.
        let n = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len() as u64;
        assert_eq!(n, v["usage"]["completion_tokens"].as_u64().unwrap());
    }
    assert_eq!(
        s.metric("alora:adapter_requests_total{adapter=\"alora\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_requests_name_the_field() {
    let s = start(Opts::default()).await;
    let m = user("sum");
    for (body, param) in [
        (
            json!({"messages": m, "tools": [{"type": "function"}]}),
            "tools[0].function",
        ),
        (
            json!({"messages": m, "tools": [add_tool()], "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"messages": m, "tools": [add_tool()],
                   "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"messages": m, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": m, "tools": [add_tool()], "tool_choice": "required",
                   "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{a"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
    ] {
        let (st, v) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": "a", "tools": [add_tool()]}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("tools")),
        "{v}"
    );
}
