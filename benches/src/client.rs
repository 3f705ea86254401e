//! One streamed request against an OpenAI-compatible server, timed chunk by chunk.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

/// How a request names its adapter: vLLM and alora take the adapter's name in `model`; alora
/// also takes a separate `adapter` field next to the base model's name; llama-server takes
/// `lora: [{"id", "scale"}]` with the ids of its `--lora` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdapterField {
    Model,
    Adapter,
    Lora,
}

/// One of llama-server's adapters, from its `GET /lora-adapters`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    pub id: u64,
    /// An aLoRA's invocation text (`alora_invocation_string`); `None` for a plain LoRA.
    pub invocation: Option<String>,
}

/// The names an adapter of `GET /lora-adapters` answers to: its id and its file's stem
/// (`/x/topic.gguf` is `topic`), with what a request needs to use it.
pub fn lora_adapters(list: &Value) -> anyhow::Result<Vec<(Vec<String>, LoraAdapter)>> {
    let items = list
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("/lora-adapters did not answer a list"))?;
    items
        .iter()
        .map(|a| {
            let id = a["id"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("/lora-adapters entry without an id: {a}"))?;
            let mut names = vec![id.to_string()];
            if let Some(stem) = a["path"]
                .as_str()
                .and_then(|p| std::path::Path::new(p).file_stem()?.to_str())
            {
                names.push(stem.to_string());
            }
            let invocation = a["alora_invocation_string"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            Ok((names, LoraAdapter { id, invocation }))
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Target {
    pub base_url: String,
    pub api_key: Option<String>,
    /// The served base model's name.
    pub model: String,
    pub adapter_field: AdapterField,
    pub ignore_eos: bool,
    pub timeout: Duration,
    /// Fields merged into every request body last (`--extra-body`), e.g. a structured output.
    pub extra_body: serde_json::Map<String, Value>,
}

/// What one request measured. Times are seconds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub ok: bool,
    pub error: Option<String>,
    pub ttft: f64,
    pub e2e: f64,
    /// Gaps between consecutive content chunks after the first.
    pub itl: Vec<f64>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// From `usage.prompt_tokens_details.cached_tokens`, when the server reports it.
    pub cached_tokens: Option<usize>,
    /// The generated text (a conversation's next turn); not kept in results.
    #[serde(skip)]
    pub text: String,
}

pub struct Client {
    http: reqwest::Client,
    /// Keeps no idle connection: a retry through it always opens a new one.
    fresh: reqwest::Client,
    pub target: Target,
    /// `AdapterField::Lora`: llama-server's adapters by every name they answer to.
    loras: HashMap<String, LoraAdapter>,
}

impl Client {
    pub fn new(target: Target) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()?;
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(Client {
            http,
            fresh,
            target,
            loras: HashMap::new(),
        })
    }

    /// A client ready to send: with `AdapterField::Lora`, it reads llama-server's adapters and
    /// sets every global scale to 0, so a request without `lora` runs the base model (the
    /// server applies its global scales to such requests, 1.0 for each `--lora` by default).
    pub async fn connect(target: Target) -> anyhow::Result<Client> {
        let mut c = Client::new(target)?;
        if c.target.adapter_field != AdapterField::Lora {
            return Ok(c);
        }
        let list: Value = c
            .get("/lora-adapters")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let adapters = lora_adapters(&list)?;
        let zero: Vec<Value> = adapters
            .iter()
            .map(|(_, a)| json!({"id": a.id, "scale": 0.0}))
            .collect();
        c.post("/lora-adapters", &Value::Array(zero))
            .send()
            .await?
            .error_for_status()?;
        for (names, a) in adapters {
            for n in names {
                c.loras.insert(n, a.clone());
            }
        }
        Ok(c)
    }

    /// The adapter `name` of `AdapterField::Lora`, or an error naming the ones there are.
    pub fn lora(&self, name: &str) -> anyhow::Result<&LoraAdapter> {
        self.loras.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.loras.keys().map(String::as_str).collect();
            known.sort();
            anyhow::anyhow!("the server has no LoRA adapter {name:?} (it has: {known:?})")
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.base_url.trim_end_matches('/'))
    }

    fn authed(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.target.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.http.get(self.url(path)))
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.authed(self.http.post(self.url(path)).json(body))
    }

    /// Sends a POST, once more on a fresh connection if the first try broke before any answer
    /// came: servers close kept-alive connections (llama-server's HTTP library after 100
    /// requests or 5 idle seconds), and a request that loses that race never reached them.
    async fn send(&self, path: &str, body: &Value) -> Result<reqwest::Response, String> {
        match self.post(path, body).send().await {
            Err(e) if !e.is_timeout() && e.status().is_none() => {
                // Not the pool again: it may hold more connections the server closed.
                let retry = self.fresh.post(self.url(path)).json(body);
                self.authed(retry).send().await.map_err(|e| chain(&e))
            }
            r => r.map_err(|e| chain(&e)),
        }
    }

    /// The first model the server lists (the base model, for alora and vLLM).
    pub async fn first_model(&self) -> anyhow::Result<String> {
        let v: Value = self
            .get("/v1/models")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        v["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("/v1/models lists no model"))
    }

    /// The server's Prometheus text, if it serves /metrics.
    pub async fn metrics(&self) -> Option<String> {
        let r = self.get("/metrics").send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }

    fn body(&self, adapter: Option<&str>, max_tokens: usize) -> serde_json::Map<String, Value> {
        let mut b = serde_json::Map::new();
        let model = match (adapter, self.target.adapter_field) {
            (Some(a), AdapterField::Model) => a.to_string(),
            (Some(a), AdapterField::Adapter) => {
                b.insert("adapter".into(), json!(a));
                self.target.model.clone()
            }
            (Some(a), AdapterField::Lora) => {
                // An unknown name is sent as is: the request fails and the report says why.
                let id = self.lora(a).map(|l| json!(l.id)).unwrap_or(json!(a));
                b.insert("lora".into(), json!([{"id": id, "scale": 1.0}]));
                self.target.model.clone()
            }
            (None, _) => self.target.model.clone(),
        };
        b.insert("model".into(), json!(model));
        b.insert("max_tokens".into(), json!(max_tokens));
        b.insert("temperature".into(), json!(0.0));
        b.insert("stream".into(), json!(true));
        b.insert("stream_options".into(), json!({"include_usage": true}));
        if self.target.ignore_eos {
            b.insert("ignore_eos".into(), json!(true));
            // Past an ignored EOS the model writes turn markers (`<|im_end|>`, `<|im_start|>`);
            // skipped from the text, the conversation sent back no longer tokenizes as the
            // cached one and the next call recomputes from there (6 to 24 rows instead of 6 at
            // ~1,900 tokens). Kept, the text round-trips, as llama-server's does.
            b.insert("skip_special_tokens".into(), json!(false));
        }
        for (k, v) in &self.target.extra_body {
            b.insert(k.clone(), v.clone());
        }
        b
    }

    pub async fn chat(
        &self,
        messages: &[Value],
        adapter: Option<&str>,
        max_tokens: usize,
    ) -> Outcome {
        let mut b = self.body(adapter, max_tokens);
        b.insert("messages".into(), Value::Array(messages.to_vec()));
        self.stream("/v1/chat/completions", Value::Object(b)).await
    }

    /// An adapter call on a conversation. alora and vLLM-style servers take the chat and append
    /// an aLoRA's invocation themselves. llama-server does not: it looks for the invocation in
    /// the prompt, so the conversation is rendered by its own template (`POST /apply-template`
    /// without a generation prompt, not timed), the invocation appended, and the text sent to
    /// `/v1/completions`: the same tokens alora computes. (Start llama-server with
    /// `--no-prefill-assistant`, or its render of a conversation ending in an assistant turn
    /// leaves that turn open, without its end-of-turn tokens.)
    pub async fn intrinsic(&self, messages: &[Value], adapter: &str, max_tokens: usize) -> Outcome {
        let invocation = match self.target.adapter_field {
            AdapterField::Lora => self.lora(adapter).ok().and_then(|l| l.invocation.clone()),
            _ => None,
        };
        let Some(invocation) = invocation else {
            return self.chat(messages, Some(adapter), max_tokens).await;
        };
        match self.render(messages).await {
            Ok(prompt) => {
                self.completion(&(prompt + &invocation), Some(adapter), max_tokens)
                    .await
            }
            Err(e) => Outcome {
                error: Some(format!("rendering the conversation: {e}")),
                ..Outcome::default()
            },
        }
    }

    /// The conversation as llama-server's template renders it, without a generation prompt.
    async fn render(&self, messages: &[Value]) -> anyhow::Result<String> {
        let body = json!({"messages": messages, "add_generation_prompt": false});
        let v: Value = self
            .send("/apply-template", &body)
            .await
            .map_err(anyhow::Error::msg)?
            .error_for_status()?
            .json()
            .await?;
        v["prompt"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("/apply-template answered no prompt: {v}"))
    }

    pub async fn completion(
        &self,
        prompt: &str,
        adapter: Option<&str>,
        max_tokens: usize,
    ) -> Outcome {
        let mut b = self.body(adapter, max_tokens);
        b.insert("prompt".into(), json!(prompt));
        self.stream("/v1/completions", Value::Object(b)).await
    }

    async fn stream(&self, path: &str, body: Value) -> Outcome {
        let start = Instant::now();
        let mut out = Outcome::default();
        match tokio::time::timeout(
            self.target.timeout,
            self.stream_inner(path, body, start, &mut out),
        )
        .await
        {
            Ok(Ok(())) => out.ok = true,
            Ok(Err(e)) => out.error = Some(e),
            Err(_) => out.error = Some(format!("timed out after {:?}", self.target.timeout)),
        }
        out.e2e = start.elapsed().as_secs_f64();
        out
    }

    async fn stream_inner(
        &self,
        path: &str,
        body: Value,
        start: Instant,
        out: &mut Outcome,
    ) -> Result<(), String> {
        let resp = self
            .send(path, &body)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(format!("HTTP {}: {msg}", status.as_u16()));
        }
        let mut events = resp.bytes_stream().eventsource();
        let mut last: Option<Instant> = None;
        let mut finished: Option<Instant> = None;
        let mut chunks = 0usize;
        while let Some(ev) = events.next().await {
            let ev = ev.map_err(|e| format!("stream broke: {e}"))?;
            if ev.data.trim() == "[DONE]" {
                break;
            }
            let v: Value =
                serde_json::from_str(&ev.data).map_err(|e| format!("bad stream chunk: {e}"))?;
            if let Some(e) = v.get("error") {
                return Err(format!("error in stream: {e}"));
            }
            let piece = v["choices"][0]["delta"]["content"]
                .as_str()
                .or_else(|| v["choices"][0]["text"].as_str())
                .unwrap_or("");
            if !piece.is_empty() {
                let now = Instant::now();
                match last {
                    None => out.ttft = now.duration_since(start).as_secs_f64(),
                    Some(t) => out.itl.push(now.duration_since(t).as_secs_f64()),
                }
                last = Some(now);
                chunks += 1;
                out.text.push_str(piece);
            }
            if !v["choices"][0]["finish_reason"].is_null() && finished.is_none() {
                finished = Some(Instant::now());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                out.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .map(|c| c as usize);
            }
        }
        if last.is_none() {
            // Tokens that decode to no text (special tokens): the first token's time is unknown,
            // the finishing chunk's is an upper bound.
            match finished {
                Some(t) if out.output_tokens > 0 => {
                    out.ttft = t.duration_since(start).as_secs_f64();
                    return Ok(());
                }
                _ => return Err("the stream ended without any content".into()),
            }
        }
        if out.output_tokens == 0 {
            // The server sent no usage: count content chunks instead.
            out.output_tokens = chunks;
        }
        Ok(())
    }
}

/// An error with its causes (reqwest's own message names only the URL).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Sum of every sample of the metric `name` (with or without a `_total` suffix, any labels).
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = rest.strip_prefix("_total").unwrap_or(rest);
        let value = if let Some(r) = rest.strip_prefix('{') {
            r.split_once('}').map(|(_, v)| v)
        } else {
            rest.starts_with(' ').then_some(rest)
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn metric_sum_reads_counters_with_and_without_labels() {
        let t = "# HELP vllm:prefix_cache_hits x\nvllm:prefix_cache_hits_total 12\n\
                 vllm:prefix_cache_hits_created 1.7e9\n\
                 vllm:prefix_cache_queries_total{model_name=\"a\"} 30\n\
                 vllm:prefix_cache_queries_total{model_name=\"b\"} 10\n";
        assert_eq!(metric_sum(t, "vllm:prefix_cache_hits"), Some(12.0));
        assert_eq!(metric_sum(t, "vllm:prefix_cache_queries"), Some(40.0));
        assert_eq!(metric_sum(t, "vllm:nothing"), None);
    }
}
