//! Replays request bodies recorded from real client libraries (openai-python, LangChain,
//! LiteLLM, granite-common, mellea, the OpenAI Agents SDK: `fixtures/clients/record.py`,
//! versions in `versions.json`) over HTTP: each gets a 200 with the response shape its client
//! parses (streamed or not), and where the request asks for a structured output the content
//! parses under its schema. With tools: a call the request forces (`tool_choice` `required` or
//! a named function) comes back as `tool_calls` (streamed as deltas, or whole), to a function
//! of the request, with arguments that parse under that function's schema. `MODEL` in a
//! recording is the served base model, `ADAPTER` the fixture aLoRA, and so is mellea's
//! `chat_template_kwargs.adapter_name` (`answerability`).

mod common;

use std::path::PathBuf;

use common::{start, Opts};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clients")
}

/// The schema a structured request's content must satisfy (`{"type": "object"}` for JSON mode).
fn schema_of(body: &Value) -> Option<Value> {
    let rf = &body["response_format"];
    match rf["type"].as_str() {
        Some("json_schema") => return Some(rf["json_schema"]["schema"].clone()),
        Some("json_object") => return Some(serde_json::json!({"type": "object"})),
        _ => {}
    }
    body["structured_outputs"].get("json").cloned()
}

/// The functions a request forces a call to (`tool_choice` `required`: any of its tools; a
/// named function: that one), with their argument schemas; `None` when no call is forced.
fn forced_calls(body: &Value) -> Option<Vec<(String, Value)>> {
    let tools: Vec<(String, Value)> = body["tools"]
        .as_array()?
        .iter()
        .map(|t| {
            let f = &t["function"];
            (
                f["name"].as_str().unwrap().to_string(),
                f["parameters"].clone(),
            )
        })
        .collect();
    match &body["tool_choice"] {
        Value::String(s) if s == "required" => Some(tools),
        Value::Object(o) => {
            let name = o["function"]["name"].as_str().unwrap();
            Some(tools.into_iter().filter(|(n, _)| n == name).collect())
        }
        _ => None,
    }
}

/// A choice's calls as (name, arguments), from a message's `tool_calls` or a stream's deltas.
fn calls_of(calls: &mut Vec<(String, String, String)>, deltas: &Value) {
    for d in deltas.as_array().into_iter().flatten() {
        let i = d["index"].as_u64().unwrap_or(calls.len() as u64) as usize;
        if i == calls.len() {
            calls.push(Default::default());
        }
        let c = &mut calls[i];
        if let Some(id) = d["id"].as_str() {
            c.0 = id.to_string();
        }
        if let Some(n) = d["function"]["name"].as_str() {
            c.1.push_str(n);
        }
        if let Some(a) = d["function"]["arguments"].as_str() {
            c.2.push_str(a);
        }
    }
}

/// Requests the engine has run with the fixture aLoRA (0 before the first).
async fn alora_requests(s: &common::Server) -> f64 {
    let text = s.get("/metrics").await.1;
    text.lines()
        .find_map(|l| l.strip_prefix("alora:adapter_requests_total{adapter=\"alora\"} "))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_client_requests_are_served() {
    let s = start(Opts::default()).await;
    let base = s.state.served_name(s.state.engine.info().unwrap());
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.ends_with("versions.json"))
        .collect();
    files.sort();
    assert!(files.len() >= 26, "{} recordings", files.len());
    let (mut structured, mut forced_replays) = (0, 0);
    for f in files {
        let name = f.file_stem().unwrap().to_str().unwrap().to_string();
        let recorded: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        for r in recorded {
            let path = r["path"].as_str().unwrap();
            let text = r["body"]
                .to_string()
                .replace("\"MODEL\"", &format!("\"{base}\""))
                .replace("\"ADAPTER\"", "\"alora\"")
                .replace("\"openai/MODEL\"", &format!("\"{base}\""))
                .replace(
                    "\"adapter_name\":\"answerability\"",
                    "\"adapter_name\":\"alora\"",
                );
            let mut body: Value = serde_json::from_str(&text).unwrap();
            // Clients that leave sampling random are pinned to a seed, so each run replays
            // the same outputs (the recording itself is unchanged otherwise).
            if body.get("seed").is_none() {
                body["seed"] = serde_json::json!(7);
            }
            // A random model writes long strings: the whole context is left for a forced call's
            // arguments to close in.
            let forced = forced_calls(&body);
            if forced.is_some() {
                let o = body.as_object_mut().unwrap();
                o.remove("max_tokens");
                o.remove("max_completion_tokens");
            }
            let adapter_calls = alora_requests(&s).await;
            let resp = s
                .client
                .post(format!("{}{path}", s.url))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let chat = path.contains("chat");
            let mut calls = Vec::new();
            let (content, finish) = if body["stream"] == true {
                assert_eq!(status, 200, "{name}");
                let mut events = resp.bytes_stream().eventsource();
                let (mut content, mut finish, mut done) = (String::new(), None, false);
                while let Some(e) = events.next().await {
                    let e = e.unwrap();
                    if e.data == "[DONE]" {
                        done = true;
                        break;
                    }
                    let c: Value = serde_json::from_str(&e.data).unwrap();
                    let want = if chat {
                        "chat.completion.chunk"
                    } else {
                        "text_completion"
                    };
                    assert_eq!(c["object"], want, "{name}: {c}");
                    if let Some(ch) = c["choices"].get(0) {
                        content.push_str(
                            ch["delta"]["content"]
                                .as_str()
                                .or(ch["text"].as_str())
                                .unwrap_or(""),
                        );
                        calls_of(&mut calls, &ch["delta"]["tool_calls"]);
                        if let Some(f) = ch["finish_reason"].as_str() {
                            finish = Some(f.to_string());
                        }
                    }
                }
                assert!(done, "{name}: no [DONE]");
                (content, finish.unwrap_or_default())
            } else {
                let v: Value = resp.json().await.unwrap();
                assert_eq!(status, 200, "{name}: {v}");
                let want = if chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                assert_eq!(v["object"], want, "{name}: {v}");
                let ch = &v["choices"][0];
                assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0, "{name}");
                calls_of(&mut calls, &ch["message"]["tool_calls"]);
                if body["logprobs"] == true && body.get("tools").is_none() {
                    let entries = ch["logprobs"]["content"].as_array().unwrap();
                    let joined: String = entries
                        .iter()
                        .map(|e| e["token"].as_str().unwrap())
                        .collect();
                    assert_eq!(joined, ch["message"]["content"].as_str().unwrap(), "{name}");
                    if let Some(k) = body["top_logprobs"].as_u64() {
                        assert!(entries.iter().all(|e| e["top_logprobs"]
                            .as_array()
                            .unwrap()
                            .len()
                            == k as usize));
                    }
                }
                let content = ch["message"]["content"].as_str().or(ch["text"].as_str());
                // Content is `null` only beside calls.
                assert!(content.is_some() || !calls.is_empty(), "{name}: {v}");
                (
                    content.unwrap_or("").to_string(),
                    ch["finish_reason"].as_str().unwrap().to_string(),
                )
            };
            // Every way of naming the aLoRA (model, adapter_name) reached it.
            let names_alora = text.contains("\"alora\"");
            let after = alora_requests(&s).await;
            assert_eq!(
                after > adapter_calls,
                names_alora,
                "{name}: aLoRA requests {adapter_calls} -> {after}"
            );
            if let Some(allowed) = forced {
                forced_replays += 1;
                // With parallel calls allowed a random model may go on calling until the limit;
                // the calls it finished are still returned, and checked below.
                let open_ended = body["parallel_tool_calls"] != false
                    && body["tool_choice"] == "required"
                    && finish == "length";
                if !open_ended {
                    assert_eq!(finish, "tool_calls", "{name}: {content:?} {calls:?}");
                }
                assert!(!calls.is_empty(), "{name}: {finish} {content:?}");
                if body["parallel_tool_calls"] == false {
                    assert_eq!(calls.len(), 1, "{name}");
                }
                for (id, fname, args) in &calls {
                    assert!(id.starts_with("call_"), "{name}: {id}");
                    let (_, schema) = allowed
                        .iter()
                        .find(|(n, _)| n == fname)
                        .unwrap_or_else(|| panic!("{name}: call to {fname}"));
                    let parsed: Value = serde_json::from_str(args)
                        .unwrap_or_else(|e| panic!("{name}: {args:?} is not JSON: {e}"));
                    let v = jsonschema::validator_for(schema).unwrap();
                    assert!(v.is_valid(&parsed), "{name}: {parsed} against {schema}");
                }
            }
            if let Some(schema) = schema_of(&body) {
                structured += 1;
                // JSON mode allows any object, so a random model may run to the limit; a
                // schema of enums always finishes.
                if finish == "length" && body["response_format"]["type"] == "json_object" {
                    continue;
                }
                assert_eq!(finish, "stop", "{name}: {content:?}");
                let parsed: Value = serde_json::from_str(&content)
                    .unwrap_or_else(|e| panic!("{name}: {content:?} is not JSON: {e}"));
                let v = jsonschema::validator_for(&schema).unwrap();
                assert!(v.is_valid(&parsed), "{name}: {parsed} against {schema}");
            }
        }
    }
    assert!(structured >= 6, "{structured} structured requests");
    assert!(forced_replays >= 7, "{forced_replays} forced tool calls");
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}
