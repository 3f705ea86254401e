//! The OpenAPI document (`openapi/openapi.yaml`) describes what the server really sends:
//! real responses of every endpoint, streamed chunks and error bodies are validated against
//! the document's schemas (JSON Schema 2020-12, as OpenAPI 3.1 uses).

mod common;

use common::{start, user, Opts};
use serde_json::{json, Value};

fn spec() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/openapi.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// JSON pointer of the schema for (path, method, status, content type), following a response
/// `$ref` into components.
fn schema_pointer(spec: &Value, path: &str, method: &str, status: u16, ctype: &str) -> String {
    let resp_ptr = format!("/paths/{}/{method}/responses/{status}", escape(path));
    let resp = spec
        .pointer(&resp_ptr)
        .unwrap_or_else(|| panic!("{path} {method} {status} not documented"));
    let resp_ptr = match resp.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => r.trim_start_matches('#').to_string(),
        None => resp_ptr,
    };
    let ptr = format!("{resp_ptr}/content/{}/schema", escape(ctype));
    assert!(
        spec.pointer(&ptr).is_some(),
        "{path} {method} {status}: no {ctype} schema"
    );
    ptr
}

fn check(spec: &Value, path: &str, method: &str, status: u16, ctype: &str, body: &Value) {
    let mut root = spec.clone();
    root["$ref"] = json!(format!(
        "#{}",
        schema_pointer(spec, path, method, status, ctype)
    ));
    let v = jsonschema::draft202012::new(&root).expect("the document compiles as a schema");
    let errors: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} {ctype}: {errors:?}\nbody: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_match_the_openapi_document() {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    let mut o = Opts::default();
    o.http.enable_adapter_loading = true;
    let s = start(o).await;
    let chat = json!({"messages": user("hi there"), "adapter": "alora", "max_tokens": 4, "logprobs": true, "top_logprobs": 2, "n": 2});
    let tools = json!({"messages": user("hi"), "max_tokens": 60, "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]}}}]});
    let posts: Vec<(&str, Value, u16)> = vec![
        ("/v1/chat/completions", chat.clone(), 200),
        ("/v1/chat/completions", json!({"messages": []}), 400),
        ("/v1/chat/completions", tools.clone(), 200),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "adapter": "missing"}),
            404,
        ),
        (
            "/v1/completions",
            json!({"prompt": ["abc", "xabc"], "adapter": "alora", "max_tokens": 3, "logprobs": 2, "echo": true}),
            200,
        ),
        (
            "/v1/completions",
            json!({"prompt": "no invocation", "adapter": "alora"}),
            400,
        ),
        ("/tokenize", json!({"messages": user("abc")}), 200),
        ("/detokenize", json!({"tokens": [5, 6]}), 200),
        ("/reset_prefix_cache", json!({}), 200),
        (
            "/v1/load_lora_adapter",
            json!({"lora_name": "again", "lora_path": "lora"}),
            200,
        ),
        (
            "/v1/load_lora_adapter",
            json!({"lora_name": "again", "lora_path": "lora"}),
            400,
        ),
        (
            "/v1/unload_lora_adapter",
            json!({"lora_name": "again"}),
            200,
        ),
        (
            "/v1/unload_lora_adapter",
            json!({"lora_name": "again"}),
            404,
        ),
    ];
    for (path, body, status) in posts {
        let (st, v) = s.post(path, body).await;
        assert_eq!(st, status, "{path}: {v}");
        check(&spec, path, "post", st, "application/json", &v);
    }
    let models: Value = s
        .client
        .get(format!("{}/v1/models", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check(&spec, "/v1/models", "get", 200, "application/json", &models);
    let version: Value = s
        .client
        .get(format!("{}/version", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check(&spec, "/version", "get", 200, "application/json", &version);
    assert_eq!(
        version["version"],
        alora_server::openai::models::VLLM_API_VERSION
    );

    // Every chunk of a stream validates too.
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "ignore_eos": true}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "abc", "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true}),
        ),
        ("/v1/chat/completions", {
            let mut t = tools.clone();
            t["stream"] = true.into();
            t
        }),
    ] {
        let chunks = s.stream(path, body).await;
        for c in &chunks {
            check(&spec, path, "post", 200, "text/event-stream", c);
        }
        let n = chunks.len();
        assert!(n >= 3, "{path}: {n} chunks");
    }
}
