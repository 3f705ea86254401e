//! Test support: a tiny servable model (the golden Llama fixture plus a character tokenizer
//! made here), its adapters, and a server on 127.0.0.1:0.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use alora_model::{LoadOptions, LoadedModel};
use alora_server::{AppState, EngineConfig, HttpConfig, ServeConfig};

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/llama")
}

/// A fresh directory under the target dir (no network, no global temp clutter).
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny model's vocabulary (one token per character; see `alora_model::testing`).
pub fn vocab() -> Vec<String> {
    alora_model::testing::char_vocab()
}

/// A model directory: the golden Llama fixture's weights and config plus the tokenizer.
pub fn tiny_model_dir() -> PathBuf {
    let d = scratch("model");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join(f), d.join(f)).unwrap();
    }
    alora_model::testing::write_char_tokenizer(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Adapters in one directory: `lora`, `alora` (invocation "abc"), `alora2` (the same weights
/// with invocation "xy", so a different adapter), and `lora_v2` (the LoRA's weights doubled).
pub fn adapter_dir() -> PathBuf {
    let d = scratch("adapters");
    copy_dir(&fixtures().join("lora"), &d.join("lora"));
    copy_dir(&fixtures().join("alora"), &d.join("alora"));
    copy_dir(&fixtures().join("alora"), &d.join("alora2"));
    let cfg_path = d.join("alora2/adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let xy: Vec<u32> = ["x", "y"]
        .iter()
        .map(|c| vocab().iter().position(|v| v == c).unwrap() as u32)
        .collect();
    cfg["alora_invocation_tokens"] = serde_json::json!(xy);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    copy_dir(&fixtures().join("lora"), &d.join("lora_v2"));
    let w = d.join("lora_v2/adapter_model.safetensors");
    let t = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let doubled: HashMap<String, candle_core::Tensor> = t
        .into_iter()
        .map(|(k, v)| (k, (v * 2.0).unwrap()))
        .collect();
    candle_core::safetensors::save(&doubled, &w).unwrap();
    d
}

/// Serves `state` on 127.0.0.1 at a free port; returns the base URL.
pub async fn listen(state: &AppState) -> String {
    let listener = alora_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(alora_server::serve(state.clone(), listener));
    url
}

pub struct Server {
    pub url: String,
    pub state: AppState,
    pub adapters: PathBuf,
    pub client: reqwest::Client,
}

pub struct Opts {
    pub engine: EngineConfig,
    pub http: HttpConfig,
    /// A chat template for the model (default: none, so the ChatML fallback).
    pub chat_template: Option<&'static str>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            engine: EngineConfig {
                block_size: 4,
                kv_cache_bytes: 4 << 20,
                max_num_batched_tokens: 64,
                ..Default::default()
            },
            http: HttpConfig {
                max_body_bytes: 64 << 10,
                ..Default::default()
            },
            chat_template: None,
        }
    }
}

/// Starts a server with adapters `lora`, `alora`, `alora2` loaded.
pub async fn start(mut opts: Opts) -> Server {
    let model = tiny_model_dir();
    if let Some(t) = opts.chat_template {
        let cfg = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": t});
        std::fs::write(model.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }
    let adapters = adapter_dir();
    opts.http.adapter_dir.get_or_insert(adapters.clone());
    let start_adapters: Vec<(String, PathBuf)> = ["lora", "alora", "alora2"]
        .iter()
        .map(|n| (n.to_string(), adapters.join(n)))
        .collect();
    let cfg = ServeConfig {
        engine: opts.engine,
        http: opts.http,
        adapters: start_adapters.clone(),
    };
    let state = alora_server::start(cfg, move || {
        LoadedModel::load(&model, &LoadOptions::default())
    });
    let url = listen(&state).await;
    alora_server::wait_ready(&state, &start_adapters)
        .await
        .unwrap();
    Server {
        url,
        state,
        adapters,
        client: reqwest::Client::new(),
    }
}

impl Server {
    /// `POST path` with a JSON body: the raw response.
    pub async fn send(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.send(path, &body).await;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// `POST path` with `stream: true`: the chunks, in order, up to `[DONE]` (which must come).
    pub async fn stream(&self, path: &str, mut body: serde_json::Value) -> Vec<serde_json::Value> {
        use eventsource_stream::Eventsource;
        use futures::StreamExt;
        body["stream"] = true.into();
        let r = self.send(path, &body).await;
        assert_eq!(r.status(), 200);
        let mut events = r.bytes_stream().eventsource();
        let mut chunks = Vec::new();
        while let Some(e) = events.next().await {
            let e = e.unwrap();
            if e.data == "[DONE]" {
                return chunks;
            }
            chunks.push(serde_json::from_str(&e.data).unwrap());
        }
        panic!("the stream ended without [DONE]");
    }

    /// `GET path`: the status and the body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.1;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// KV blocks in use once the engine has settled: a finished chat reply may still be
    /// computing its turn end ahead (one step after its response), so this waits up to 5 s
    /// for the gauge to reach 0 and returns what it last read.
    pub async fn blocks_in_use_settled(&self) -> f64 {
        let mut in_use = f64::NAN;
        for _ in 0..200 {
            in_use = self.metric("alora:kv_blocks_in_use").await;
            if in_use == 0.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        in_use
    }
}

pub fn user(text: &str) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": text}])
}

/// A chat response's first choice's content.
pub fn content(v: &serde_json::Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A response's cached prompt tokens.
pub fn cached(v: &serde_json::Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}
