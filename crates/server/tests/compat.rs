//! What client libraries rely on beyond plain generation, over real HTTP on the tiny model:
//! the leniency policy for extra fields, template fields (documents, kwargs, generation prompt,
//! continuing a message), output options, structured outputs, logprob tokens that join to the
//! content, an intrinsic sent the granite-common way, request ids, EOS counting, `/tokenize`
//! for an aLoRA.

mod common;

use common::{cached, content, start, user, Opts};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

/// The leniency policy: what everyday OpenAI clients send beside the fields alora uses is
/// accepted (nulls as absent, unknown fields ignored and counted by name, no-op values of
/// unimplemented fields), what would change the output is a 400 naming it, and
/// `reject_unknown_fields` restores the strict behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_extras_are_ignored_and_output_changers_refused() {
    let s = start(Opts::default()).await;
    let plain = json!({"messages": user("hello there"), "max_tokens": 6, "temperature": 0});
    let (st, want) = s.post("/v1/chat/completions", plain.clone()).await;
    assert_eq!(st, 200, "{want}");
    let mut extra = plain.clone();
    for (k, v) in [
        ("store", json!(false)),
        ("metadata", json!({"trace": "1"})),
        ("service_tier", json!("auto")),
        ("prompt_cache_key", json!("k")),
        ("parallel_tool_calls", json!(true)),
        ("reasoning_effort", json!("low")),
        ("tools", Value::Null),
        ("tool_choice", json!("none")),
        ("response_format", json!({"type": "text"})),
        ("stream", Value::Null),
        ("stop", Value::Null),
        ("min_tokens", json!(0)),
        (
            "stream_options",
            json!({"include_usage": null, "include_obfuscation": false}),
        ),
    ] {
        extra[k] = v;
    }
    extra["messages"][0]["cache_control"] = json!({"type": "ephemeral"});
    let (st, got) = s.post("/v1/chat/completions", extra.clone()).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(
        content(&got),
        content(&want),
        "ignored fields changed the output"
    );
    let (st, got) = s
        .post(
            "/v1/completions",
            json!({"prompt": "ab", "max_tokens": 2, "store": true, "logprobs": null}),
        )
        .await;
    assert_eq!(st, 200, "{got}");
    let metrics = s.get("/metrics").await.1;
    for f in [
        "store",
        "metadata",
        "messages[].cache_control",
        "stream_options.include_obfuscation",
    ] {
        assert!(
            metrics.contains(&format!(
                "alora:ignored_request_fields_total{{field=\"{f}\"}}"
            )),
            "{f} not counted"
        );
    }
    let store = metrics
        .lines()
        .find(|l| l.starts_with(r#"alora:ignored_request_fields_total{field="store"}"#))
        .unwrap();
    assert!(store.ends_with(" 2"), "{store}");

    for (k, v) in [
        ("guided_choice", json!(["a", "b"])),
        ("functions", json!([{"name": "f"}])),
        ("bad_words", json!(["dust"])),
        ("chat_template", json!("{{ messages }}")),
    ] {
        let mut b = plain.clone();
        b[k] = v;
        let (st, v) = s.post("/v1/chat/completions", b).await;
        assert_eq!(st, 400, "{k}: {v}");
        assert_eq!(v["error"]["param"], k, "{v}");
        assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
    }

    let mut o = Opts::default();
    o.http.reject_unknown_fields = true;
    let strict = start(o).await;
    let (st, v) = strict.post("/v1/chat/completions", extra).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
    let (st, v) = strict
        .post(
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_tokens": 2, "tools": null, "stream": null}),
        )
        .await;
    assert_eq!(st, 200, "nulls are absent in strict mode too: {v}");
}

/// Chat fields that shape the prompt reach the model's template as transformers passes them:
/// `documents`, `chat_template_kwargs` (with `adapter_name` selecting an adapter, as IBM's
/// libraries send it), `add_generation_prompt`, `continue_final_message`; and the output
/// options `include_stop_str_in_output` and `skip_special_tokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_and_output_options() {
    let o = Opts {
        chat_template: Some(
            "{% for d in documents or [] %}[{{ d.text }}]{% endfor %}{% if mood %}({{ mood }}){% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ),
        ..Opts::default()
    };
    let s = start(o).await;
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    let base = json!({"messages": user("hi"), "max_tokens": 1, "temperature": 0});
    let (_, plain) = s.post("/v1/chat/completions", base.clone()).await;
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let (st, docs) = s
        .post(
            "/v1/chat/completions",
            with("documents", json!([{"text": "abcd"}])),
        )
        .await;
    assert_eq!(st, 200, "{docs}");
    assert_eq!(tokens(&docs), tokens(&plain) + 6, "[abcd] rendered");
    let (_, kw) = s
        .post(
            "/v1/chat/completions",
            with("chat_template_kwargs", json!({"mood": "xy"})),
        )
        .await;
    assert_eq!(tokens(&kw), tokens(&plain) + 4, "(xy) rendered");
    let (_, no_gen) = s
        .post(
            "/v1/chat/completions",
            with("add_generation_prompt", json!(false)),
        )
        .await;
    // "<|im_start|>" is one token, then "assistant\n".
    assert_eq!(tokens(&no_gen), tokens(&plain) - 11);
    let mut cont = base.clone();
    cont["messages"] =
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The"}]);
    cont["continue_final_message"] = json!(true);
    let (st, c) = s.post("/v1/chat/completions", cont.clone()).await;
    assert_eq!(st, 200, "{c}");
    // The final turn stays open: no <|im_end|>\n and no generation prompt after "The".
    let mut closed = cont.clone();
    closed["continue_final_message"] = json!(false);
    closed["add_generation_prompt"] = json!(false);
    let (_, cl) = s.post("/v1/chat/completions", closed).await;
    assert_eq!(tokens(&c), tokens(&cl) - 2);
    cont["add_generation_prompt"] = json!(true);
    let (st, v) = s.post("/v1/chat/completions", cont).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "continue_final_message", "{v}");

    // adapter_name selects the adapter like `adapter` does.
    let by_field = with("adapter", json!("alora"));
    let by_kwargs = with("chat_template_kwargs", json!({"adapter_name": "alora"}));
    let (st, a) = s.post("/v1/chat/completions", by_field).await;
    assert_eq!(st, 200, "{a}");
    let (st, b) = s.post("/v1/chat/completions", by_kwargs).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["model"], "alora");
    assert_eq!(tokens(&a), tokens(&b));
    assert_eq!(content(&a), content(&b));
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            with("chat_template_kwargs", json!({"adapter_name": "nope"})),
        )
        .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["param"], "chat_template_kwargs.adapter_name");
    let mut both = with("chat_template_kwargs", json!({"adapter_name": "lora"}));
    both["adapter"] = json!("alora");
    let (st, v) = s.post("/v1/chat/completions", both).await;
    assert_eq!(st, 400, "{v}");

    // Output options.
    let (_, free) = s
        .post(
            "/v1/completions",
            json!({"prompt": "abcab", "max_tokens": 12, "ignore_eos": true, "temperature": 0}),
        )
        .await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().skip(3).take(2).collect();
    let cut = |include: bool| {
        json!({"prompt": "abcab", "max_tokens": 12, "ignore_eos": true, "temperature": 0,
               "stop": [stop.clone()], "include_stop_str_in_output": include})
    };
    let (_, without) = s.post("/v1/completions", cut(false)).await;
    let (_, with_stop) = s.post("/v1/completions", cut(true)).await;
    let without = without["choices"][0]["text"].as_str().unwrap().to_string();
    let with_stop = with_stop["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.starts_with(&with_stop), "{text:?} {with_stop:?}");
    assert_eq!(with_stop, format!("{without}{stop}"));
    let (_, t) = s.post("/tokenize", json!({"prompt": "<|im_end|>"})).await;
    let im_end = t["tokens"][0].as_u64().unwrap();
    assert_eq!(t["count"], 1, "{t}");
    let special = |skip: bool| {
        json!({"prompt": "ab", "max_tokens": 2, "ignore_eos": true, "temperature": 0,
               "logit_bias": {im_end.to_string(): 100}, "skip_special_tokens": skip})
    };
    let (st, kept) = s.post("/v1/completions", special(false)).await;
    assert_eq!(st, 200, "{kept}");
    assert_eq!(kept["choices"][0]["text"], "<|im_end|><|im_end|>");
    let (_, skipped) = s.post("/v1/completions", special(true)).await;
    assert_eq!(skipped["choices"][0]["text"], "");
}

/// Structured outputs: `response_format` (json_object, json_schema) and vLLM's
/// `structured_outputs` (json, regex, choice, grammar) constrain every choice of base, LoRA and
/// aLoRA requests, streamed or not, with logprobs; a finished output parses under its schema;
/// a bad schema is a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_constrain_every_choice() {
    let s = start(Opts::default()).await;
    let schema = json!({"type": "object", "properties": {"score": {"type": "integer", "enum": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}}, "required": ["score"], "additionalProperties": false});
    let validator = jsonschema::validator_for(&schema).unwrap();
    let texts = |v: &Value| -> Vec<(String, String)> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["message"]["content"]
                        .as_str()
                        .or(c["text"].as_str())
                        .unwrap()
                        .to_string(),
                    c["finish_reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    for adapter in [None, Some("lora"), Some("alora")] {
        for form in [
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": true}}}),
            json!({"structured_outputs": {"json": schema}}),
        ] {
            let mut body = json!({"messages": user("rate it"), "max_tokens": 40, "n": 3, "temperature": 1.0, "seed": 3, "logprobs": true, "top_logprobs": 3});
            for (k, v) in form.as_object().unwrap() {
                body[k] = v.clone();
            }
            if let Some(a) = adapter {
                body["adapter"] = json!(a);
            }
            let (st, v) = s.post("/v1/chat/completions", body.clone()).await;
            assert_eq!(st, 200, "{v}");
            for (text, finish) in texts(&v) {
                assert_eq!(finish, "stop", "{adapter:?}: {text:?}");
                let parsed: Value = serde_json::from_str(&text).unwrap();
                assert!(validator.is_valid(&parsed), "{adapter:?}: {text}");
            }
            // The stream carries the same kind of output.
            body["stream"] = json!(true);
            body["n"] = json!(1);
            let r = s
                .client
                .post(format!("{}/v1/chat/completions", s.url))
                .json(&body)
                .send()
                .await
                .unwrap();
            let mut events = r.bytes_stream().eventsource();
            let mut text = String::new();
            while let Some(e) = events.next().await {
                let e = e.unwrap();
                if e.data == "[DONE]" {
                    break;
                }
                let c: Value = serde_json::from_str(&e.data).unwrap();
                text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            }
            assert!(
                validator.is_valid(&serde_json::from_str(&text).unwrap()),
                "{text}"
            );
        }
    }
    // Completions: regex, choice, a Lark grammar, any JSON object.
    for (so, check) in [
        (json!({"regex": "[0-9]{3}-[a-c]{2}"}), "regex"),
        (json!({"choice": ["yes", "no", "maybe"]}), "choice"),
        (
            json!({"grammar": "start: \"(\" NUM \")\"\nNUM: /[0-9]{1,3}/"}),
            "grammar",
        ),
        (json!({"json_object": true}), "object"),
    ] {
        let body =
            json!({"prompt": "abc", "max_tokens": 30, "temperature": 0, "structured_outputs": so});
        let (st, v) = s.post("/v1/completions", body).await;
        assert_eq!(st, 200, "{v}");
        let (text, finish) = texts(&v).remove(0);
        match check {
            "regex" => {
                let (d, rest) = text.split_at(3);
                assert!(
                    d.chars().all(|c| c.is_ascii_digit()) && rest.starts_with('-'),
                    "{text}"
                );
                assert!(rest[1..].chars().all(|c| "abc".contains(c)), "{text}");
            }
            "choice" => assert!(["yes", "no", "maybe"].contains(&text.as_str()), "{text}"),
            "grammar" => {
                assert!(text.starts_with('(') && text.ends_with(')'), "{text}");
                assert!(
                    text[1..text.len() - 1].chars().all(|c| c.is_ascii_digit()),
                    "{text}"
                );
            }
            _ => {
                if finish == "stop" {
                    assert!(
                        serde_json::from_str::<Value>(&text).unwrap().is_object(),
                        "{text}"
                    );
                }
            }
        }
        if check != "object" {
            assert_eq!(finish, "stop", "{check}: {text}");
        }
    }
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": user("x"), "response_format": {"type": "json_object"}, "max_tokens": 30}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // Bad forms name their field.
    for (body, param) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nonsense"}}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"choice": []}}),
            "structured_outputs.choice",
        ),
        (
            json!({"structured_outputs": {"json": {}, "regex": "a"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"choice": ["a"]}, "stop": ["x"]}),
            "stop",
        ),
        (
            json!({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}),
            "structured_outputs",
        ),
    ] {
        let mut b = body.clone();
        b["messages"] = user("x");
        let (st, v) = s.post("/v1/chat/completions", b).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}

/// The `token` strings of `logprobs.content` join exactly to the message content, also when a
/// stop string cut the output (IBM's parsers rebuild character offsets that way), and each has
/// its token's bytes; completions' `tokens` and `text_offset` agree with `text`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprob_tokens_join_to_the_content() {
    let s = start(Opts::default()).await;
    let body = json!({"messages": user("the sea is"), "max_tokens": 24, "ignore_eos": true, "temperature": 0, "logprobs": true, "top_logprobs": 10});
    let (_, free) = s.post("/v1/chat/completions", body.clone()).await;
    let text = content(&free);
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[10..12].iter().collect();
    let mut cut = body.clone();
    cut["stop"] = json!([stop]);
    for v in [free, s.post("/v1/chat/completions", cut).await.1] {
        let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
        let joined: String = entries
            .iter()
            .map(|e| e["token"].as_str().unwrap())
            .collect();
        assert_eq!(joined, content(&v), "{v}");
        for e in entries {
            assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 10);
            assert!(!e["bytes"].as_array().unwrap().is_empty(), "{e}");
        }
    }
    let (_, c) = s
        .post(
            "/v1/completions",
            json!({"prompt": "abc", "max_tokens": 12, "ignore_eos": true, "temperature": 0, "logprobs": 2, "stop": [stop]}),
        )
        .await;
    let lp = &c["choices"][0]["logprobs"];
    let text = c["choices"][0]["text"].as_str().unwrap();
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text);
    let mut at = 0;
    for (t, off) in tokens.iter().zip(lp["text_offset"].as_array().unwrap()) {
        assert_eq!(off.as_u64().unwrap() as usize, at);
        at += t.len();
    }
}

/// An intrinsic as IBM's granite-common sends it, end to end: a base RAG turn with
/// `documents`, then the intrinsic on that conversation with `documents`, the adapter named in
/// `chat_template_kwargs.adapter_name`, `structured_outputs` holding an integer enum 0-9 and
/// `logprobs` with `top_logprobs: 10`. The content is in the enum, each token has 10
/// alternatives, the tokens join to the content, and the base turn's blocks cover the
/// conversation up to the invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intrinsic_call_the_granite_common_way() {
    let mut o = Opts {
        chat_template: Some(
            "{% for d in documents or [] %}<|im_start|>document\n{{ d.text }}<|im_end|>\n{% endfor %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ),
        ..Opts::default()
    };
    // Turns closed ahead (`--close-turns`): a call that comes after the turn end was computed
    // (the grace passed with nothing else to run; the test waits for it) finds it cached.
    o.http.close_turns = true;
    let s = start(o).await;
    let documents =
        json!([{"doc_id": "1", "text": "the red planet has dust storms that can last for months"}]);
    let q = "what is the weather like on mars?";
    // Specials are kept out of the answer so it re-renders to the same tokens.
    let (st, base) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": user(q), "documents": documents, "max_tokens": 12, "temperature": 0,
                   "ignore_eos": true, "logit_bias": {"1": -100, "2": -100}}),
        )
        .await;
    assert_eq!(st, 200, "{base}");
    let answer = content(&base);
    assert_eq!(
        s.blocks_in_use_settled().await,
        0.0,
        "the turn end computed, blocks freed"
    );
    let base_computed = base["usage"]["prompt_tokens"].as_u64().unwrap()
        + base["usage"]["completion_tokens"].as_u64().unwrap()
        - 1;
    let intrinsic = json!({
        "model": s.state.served_name(s.state.engine.info().unwrap()),
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
        "documents": documents,
        "chat_template_kwargs": {"adapter_name": "alora"},
        "structured_outputs": {"json": {"type": "integer", "enum": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}},
        "logprobs": true,
        "top_logprobs": 10,
        "max_completion_tokens": 6,
        "temperature": 0.0,
    });
    let (st, v) = s.post("/v1/chat/completions", intrinsic).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "alora");
    let text = content(&v);
    let score: i64 = text
        .parse()
        .unwrap_or_else(|_| panic!("not an integer: {text:?}"));
    assert!((0..=9).contains(&score), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let joined: String = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    for e in entries {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 10, "{e}");
    }
    // The invocation "abc" ends the prompt. The base turn computed its prompt and all but its
    // last output token, and when it finished, that token and the turn end `<|im_end|>\n`
    // ahead: every row before the invocation comes from the base turn (whole blocks, then the
    // part-filled last block's rows).
    let s_pos = v["usage"]["prompt_tokens"].as_u64().unwrap() - 3;
    assert_eq!(s_pos, base_computed + 3, "reply then `<|im_end|>\n`");
    assert!(
        s_pos >= 80,
        "the documents and the question are shared: {s_pos}"
    );
    assert_eq!(s.metric("alora:turn_end_tokens_total").await, 2.0);
    assert_eq!(cached(&v), s_pos, "{v}");
}

/// `x-request-id` is echoed when the client sends one (visible ASCII, at most 128 bytes) and
/// made up otherwise, on every response, errors included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_made() {
    let s = start(Opts::default()).await;
    let url = format!("{}/v1/completions", s.url);
    let body = json!({"prompt": "ab", "max_tokens": 2});
    let r = s
        .client
        .post(&url)
        .header("x-request-id", "trace-42")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    let r = s.client.post(&url).json(&body).send().await.unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 32, "{made}");
    let r = s
        .client
        .post(&url)
        .header("x-request-id", "x".repeat(200))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.headers()["x-request-id"].len(),
        32,
        "an over-long id is replaced"
    );
}

/// An emitted EOS counts as a completion token, as OpenAI and vLLM count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emitted_eos_is_a_completion_token() {
    let s = start(Opts::default()).await;
    let (_, t) = s.post("/tokenize", json!({"prompt": "<|im_end|>"})).await;
    let eos = t["tokens"][0].as_u64().unwrap();
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": "ab", "max_tokens": 5, "logit_bias": {eos.to_string(): 100}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["text"], "");
    assert_eq!(v["usage"]["completion_tokens"], 1, "{v}");
}

/// `min_tokens` (vLLM's): no EOS or stop id is sampled, and no stop string ends the output,
/// before that many tokens; a limit above `max_tokens` or below 0 is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_tokens_holds_off_eos_stop_ids_and_stop_strings() {
    let s = start(Opts::default()).await;
    let (_, t) = s.post("/tokenize", json!({"prompt": "<|im_end|>"})).await;
    let eos = t["tokens"][0].as_u64().unwrap();
    let eager = json!({"prompt": "ab", "max_tokens": 8, "temperature": 0,
        "logit_bias": {eos.to_string(): 100}});
    for (min, key) in [(3, "logit_bias"), (2, "stop_token_ids")] {
        let mut b = eager.clone();
        if key == "stop_token_ids" {
            // The EOS ignored, but the same id is a stop id.
            b["ignore_eos"] = json!(true);
            b["stop_token_ids"] = json!([eos]);
        }
        b["min_tokens"] = json!(min);
        let (st, v) = s.post("/v1/completions", b).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{key}: {v}");
        assert_eq!(
            v["usage"]["completion_tokens"],
            min + 1,
            "{key}: {min} tokens, then the favoured stop: {v}"
        );
    }
    // An ignored EOS is held off too (vLLM's min-tokens processor bans it either way): the
    // favoured EOS comes only after `min_tokens` tokens, then fills the rest of the output.
    let mut b = eager.clone();
    b["ignore_eos"] = json!(true);
    b["min_tokens"] = json!(3);
    b["skip_special_tokens"] = json!(false);
    let (st, v) = s.post("/v1/completions", b).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    let held = text
        .strip_suffix(&"<|im_end|>".repeat(5))
        .expect("5 EOS at the end");
    assert!(
        !held.contains("<|im_end|>"),
        "EOS inside min_tokens: {text:?}"
    );
    // A stop string: the first character of the plain output ends it at once without
    // `min_tokens`, and is passed over before it.
    let plain = json!({"prompt": "ab", "max_tokens": 6, "temperature": 0});
    let (_, p) = s.post("/v1/completions", plain.clone()).await;
    let text = p["choices"][0]["text"].as_str().unwrap().to_string();
    let first = text.chars().next().unwrap().to_string();
    let mut b = plain.clone();
    b["stop"] = json!([first]);
    let (_, cut) = s.post("/v1/completions", b.clone()).await;
    assert_eq!(cut["choices"][0]["text"], "", "{cut}");
    b["min_tokens"] = json!(2);
    let (_, held) = s.post("/v1/completions", b).await;
    let got = held["choices"][0]["text"].as_str().unwrap();
    assert!(
        got.starts_with(&first) && text.starts_with(got),
        "{got:?} is the plain output {text:?} up to a later {first:?}"
    );
    for (body, msg) in [
        (
            json!({"prompt": "ab", "max_tokens": 2, "min_tokens": 3}),
            "must be <= `max_tokens`",
        ),
        (json!({"prompt": "ab", "min_tokens": -1}), "must be >= 0"),
    ] {
        let (st, e) = s.post("/v1/completions", body).await;
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"]["param"], "min_tokens", "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(msg), "{e}");
    }
    let (st, e) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": user("hi"), "max_completion_tokens": 1, "min_tokens": 2}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`max_completion_tokens`"),
        "{e}"
    );
}

/// `/tokenize` with an aLoRA shows the ids its chat request runs: the conversation without a
/// generation prompt, then the invocation, and where the adapter switches on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_shows_what_an_alora_request_runs() {
    let s = start(Opts::default()).await;
    let msgs = user("is it so?");
    let (st, t) = s
        .post("/tokenize", json!({"messages": msgs, "adapter": "alora"}))
        .await;
    assert_eq!(st, 200, "{t}");
    let ids: Vec<u64> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert_eq!(
        &ids[ids.len() - 3..],
        &[5, 6, 7],
        "ends with the invocation"
    );
    assert_eq!(t["activation_start"], ids.len() - 3);
    let (_, v) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": msgs, "adapter": "alora", "max_tokens": 1}),
        )
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    let (_, base) = s.post("/tokenize", json!({"messages": msgs})).await;
    assert!(base["activation_start"].is_null());
    let (_, p) = s
        .post(
            "/tokenize",
            json!({"prompt": "xx abc yy", "model": "alora"}),
        )
        .await;
    assert_eq!(p["activation_start"], 3);
}
