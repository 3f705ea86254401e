//! `alora serve`: flags (each with an env var) -> server configuration -> run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alora_model::tools::ToolFormat;
use alora_model::{LoadOptions, LoadedModel, QuantPolicy};
use alora_server::{EngineConfig, HttpConfig, ServeConfig};
use anyhow::{bail, Context, Result};

use crate::DEFAULT_MODEL;

/// `--tool-call-parser`: `auto` (None) or a format.
#[derive(Debug, Clone, Copy)]
pub struct ToolParserArg(Option<ToolFormat>);

fn parse_tool_parser(s: &str) -> Result<ToolParserArg, String> {
    if s == "auto" {
        return Ok(ToolParserArg(None));
    }
    ToolFormat::from_name(s)
        .map(|f| ToolParserArg(Some(f)))
        .ok_or_else(|| format!("`{s}`: one of auto, {}", ToolFormat::NAMES.join(", ")))
}

/// The demo aLoRA served with the default model (name, path from the repository root):
/// trained by `scripts/train-demo.sh`, see demo/topic-alora/README.md.
const DEMO_ADAPTER: (&str, &str) = ("topic", "demo/topic-alora");

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// HF model directory or GGUF file.
    #[arg(long, env = "ALORA_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// An adapter to serve, NAME=PATH (repeatable; env: comma-separated). Without any, the
    /// default model is served with the repository's demo aLoRA, `topic=demo/topic-alora`.
    #[arg(long = "adapter", env = "ALORA_ADAPTERS", value_delimiter = ',')]
    adapters: Vec<String>,
    /// Do not load the demo aLoRA by default.
    #[arg(long)]
    no_demo_adapter: bool,
    #[arg(long, env = "ALORA_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "ALORA_PORT", default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on the API.
    #[arg(long, env = "ALORA_API_KEY")]
    api_key: Option<String>,
    /// Name the base model is served under (default: the file or directory name).
    #[arg(long, env = "ALORA_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// KV cache budget, e.g. 512MiB, 2GiB, or bytes.
    #[arg(long, env = "ALORA_KV_CACHE_MEMORY", default_value = "1GiB")]
    kv_cache_memory: String,
    /// What the KV cache keeps K and V as: `auto` (the model's dtype: f32 on the CPU, exact
    /// against PEFT), `f32`, `f16` or `bf16` (half the bytes per block and per step; logit
    /// differences in the README).
    #[arg(long, env = "ALORA_KV_CACHE_DTYPE", value_enum, default_value = "auto")]
    kv_cache_dtype: KvCacheDtype,
    /// Tokens per KV block.
    #[arg(long, env = "ALORA_BLOCK_SIZE", default_value_t = 4)]
    block_size: usize,
    #[arg(long, env = "ALORA_MAX_NUM_SEQS", default_value_t = 64)]
    max_num_seqs: usize,
    /// Token budget of one engine step (prefill chunks + decode tokens).
    #[arg(long, env = "ALORA_MAX_NUM_BATCHED_TOKENS", default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Tokens still to compute past which a prompt is a long prefill: long prefills share this
    /// many tokens per step, after decodes and short prefills (an aLoRA call on a cached
    /// conversation), so those never wait behind a long prompt.
    #[arg(long, env = "ALORA_LONG_PREFILL_TOKEN_THRESHOLD", default_value_t = alora_server::engine::DEFAULT_LONG_PREFILL_TOKENS)]
    long_prefill_token_threshold: usize,
    /// Long prefills' chunks run in slices of layers with short steps between them: a new
    /// request gets its step at the next layer boundary, and running decodes get one after
    /// every this many milliseconds of prefill. 0: a chunk rides in one step with the short
    /// work instead (vLLM's chunked prefill).
    #[arg(long, env = "ALORA_PREFILL_SLICE_MS", default_value_t = alora_server::engine::DEFAULT_PREFILL_SLICE_MS)]
    prefill_slice_ms: u64,
    /// Waiting requests beyond which new ones get 429.
    #[arg(long, env = "ALORA_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Waiting prompt tokens beyond which new requests get 429.
    #[arg(long, env = "ALORA_MAX_QUEUE_TOKENS", default_value_t = 1 << 20)]
    max_queue_tokens: usize,
    /// Request body limit in bytes.
    #[arg(long, env = "ALORA_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Per-request time limit in seconds (0: none).
    #[arg(long, env = "ALORA_REQUEST_TIMEOUT", default_value_t = 0)]
    request_timeout: u64,
    /// Seconds a client has to send a request's headers (0: no limit).
    #[arg(long, env = "ALORA_HEADER_READ_TIMEOUT", default_value_t = 30)]
    header_read_timeout: u64,
    /// Seconds a client has, after the headers, to send the whole request body (0: no limit).
    #[arg(long, env = "ALORA_BODY_READ_TIMEOUT", default_value_t = 60)]
    body_read_timeout: u64,
    /// Refuse request fields alora does not know with a 400 instead of ignoring them.
    #[arg(long, env = "ALORA_REJECT_UNKNOWN_FIELDS")]
    reject_unknown_fields: bool,
    /// How tool calls are read from `tool_choice: "auto"` outputs: `auto` (the format the chat
    /// template shows, else `hermes`), `hermes`, `granite` or `llama3_json` (vLLM's names).
    #[arg(long, env = "ALORA_TOOL_CALL_PARSER", default_value = "auto", value_parser = parse_tool_parser)]
    tool_call_parser: ToolParserArg,
    /// Connections served at once; more wait in the listen backlog (0: no limit).
    #[arg(long, env = "ALORA_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// After SIGTERM/SIGINT, seconds in-flight requests may still run before exit (0: no limit).
    #[arg(long, env = "ALORA_SHUTDOWN_GRACE", default_value_t = 30)]
    shutdown_grace: u64,
    /// Enable /v1/load_lora_adapter and /v1/unload_lora_adapter, confined to --adapter-dir.
    #[arg(long, env = "ALORA_ENABLE_ADAPTER_LOADING")]
    enable_adapter_loading: bool,
    #[arg(long, env = "ALORA_ADAPTER_DIR")]
    adapter_dir: Option<PathBuf>,
    /// GGUF weights in memory: blocks (Q4_0/Q4_1/Q8_0 kept, alora kernel), dense (f32), keep (candle QMatMul), q8_0, q4_0, q4k, q6k.
    #[arg(long, env = "ALORA_WEIGHTS", default_value = "blocks")]
    weights: QuantPolicy,
    /// Log prompts and outputs (off by default: prompts are user data).
    #[arg(long, env = "ALORA_LOG_PROMPTS")]
    log_prompts: bool,
    /// Don't compute a finished chat reply's turn end (`<|im_end|>\n`) ahead. By default it is
    /// computed once no request arrives within 50 ms of the reply, so a later call on the
    /// conversation (an intrinsic, the next user turn) finds it cached.
    #[arg(long, env = "ALORA_NO_CLOSE_TURNS")]
    no_close_turns: bool,
    /// The default since it was opt-in (kept so scripts that pass it still start); a later
    /// `--no-close-turns` wins.
    #[arg(long, hide = true, overrides_with = "no_close_turns")]
    close_turns: bool,
}

impl ServeArgs {
    /// Turn closing is on unless `--no-close-turns` is the last of the two flags.
    fn closes_turns(&self) -> bool {
        self.close_turns || !self.no_close_turns
    }
}

/// Parses sizes like `512MiB`, `2GiB`, `1.5GB`, `1000000`.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a size"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" | "k" => 1024.0,
        "mb" => 1e6,
        "mib" | "m" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("unknown size unit `{u}` in `{s}`"),
    };
    Ok((n * mult) as usize)
}

pub fn run(a: ServeArgs) -> Result<()> {
    if !a.model.exists() {
        bail!(
            "model {} not found; run scripts/fetch-model.sh for the default model or pass --model",
            a.model.display()
        );
    }
    let mut adapters: Vec<(String, PathBuf)> = a
        .adapters
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split_once('=')
                .map(|(n, p)| (n.to_string(), PathBuf::from(p)))
                .with_context(|| format!("--adapter `{s}` must be NAME=PATH"))
        })
        .collect::<Result<_>>()?;
    if adapters.is_empty() && !a.no_demo_adapter && a.model == Path::new(DEFAULT_MODEL) {
        // The first adapter request of the README works without training anything.
        let demo = Path::new(DEMO_ADAPTER.1);
        if demo.join("adapter_config.json").exists() {
            adapters.push((DEMO_ADAPTER.0.to_string(), demo.to_path_buf()));
        }
    }
    // The base model's id when --served-model-name does not set one: its file name.
    let model_id = a.served_model_name.clone().or_else(|| {
        a.model
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
    });
    let mut names = std::collections::HashSet::new();
    for (n, _) in &adapters {
        if n.is_empty() {
            bail!("--adapter needs a name: NAME=PATH");
        }
        if !names.insert(n.as_str()) {
            bail!("two --adapter flags name `{n}`: each adapter needs its own name");
        }
        if model_id.as_deref() == Some(n.as_str()) {
            bail!("--adapter `{n}` has the name the base model is served under");
        }
    }
    if a.enable_adapter_loading && a.adapter_dir.is_none() {
        bail!("--enable-adapter-loading needs --adapter-dir to confine adapter paths");
    }
    let block_size = a.block_size;
    let cfg = ServeConfig {
        engine: EngineConfig {
            block_size: a.block_size,
            kv_cache_bytes: parse_bytes(&a.kv_cache_memory)?,
            kv_cache_dtype: a.kv_cache_dtype.dtype(),
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            long_prefill_token_threshold: a.long_prefill_token_threshold,
            prefill_slice: (a.prefill_slice_ms > 0)
                .then(|| Duration::from_millis(a.prefill_slice_ms)),
            max_queue_requests: a.max_queue,
            max_queue_tokens: a.max_queue_tokens,
            ..EngineConfig::default()
        },
        http: HttpConfig {
            served_model_name: a.served_model_name.clone(),
            api_key: a.api_key.clone(),
            enable_adapter_loading: a.enable_adapter_loading,
            adapter_dir: a.adapter_dir.clone(),
            max_body_bytes: a.max_body_bytes,
            request_timeout: (a.request_timeout > 0)
                .then(|| Duration::from_secs(a.request_timeout)),
            log_prompts: a.log_prompts,
            shutdown_grace: (a.shutdown_grace > 0).then(|| Duration::from_secs(a.shutdown_grace)),
            header_read_timeout: (a.header_read_timeout > 0)
                .then(|| Duration::from_secs(a.header_read_timeout)),
            body_read_timeout: (a.body_read_timeout > 0)
                .then(|| Duration::from_secs(a.body_read_timeout)),
            max_connections: (a.max_connections > 0).then_some(a.max_connections),
            reject_unknown_fields: a.reject_unknown_fields,
            tool_call_parser: a.tool_call_parser.0,
            close_turns: a.closes_turns(),
        },
        adapters: adapters.clone(),
    };
    // A host name (`localhost`) resolves; the first address is used.
    let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&(a.host.as_str(), a.port))
        .with_context(|| format!("bad --host `{}`", a.host))?
        .next()
        .with_context(|| format!("--host `{}` resolves to no address", a.host))?;
    let model_path = a.model.clone();
    let opts = LoadOptions {
        quant: a.weights,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = alora_server::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(
            "listening on http://{addr} (model loading; /health answers 503 until ready)"
        );
        let state = alora_server::start(cfg, move || LoadedModel::load(&model_path, &opts));
        let server = tokio::spawn(alora_server::serve(state.clone(), listener));
        if let Err(e) = alora_server::wait_ready(&state, &adapters).await {
            bail!(e);
        }
        let info = state.info().map_err(|e| anyhow::anyhow!(e.message))?;
        let names: Vec<&str> = adapters.iter().map(|(n, _)| n.as_str()).collect();
        tracing::info!(
            "ready on http://{addr}: model `{}`, adapters [{}], {} KV blocks of {} tokens ({:?})",
            state.served_name(&info),
            names.join(", "),
            info.num_blocks,
            block_size,
            info.kv_cache_dtype,
        );
        server.await??;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_bytes, ServeArgs};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn turn_closing_is_on_unless_the_last_flag_turns_it_off() {
        let closes = |args: &[&str]| {
            let argv = std::iter::once("alora").chain(args.iter().copied());
            Cli::try_parse_from(argv).unwrap().serve.closes_turns()
        };
        assert!(closes(&[]));
        assert!(closes(&["--close-turns"]));
        assert!(!closes(&["--no-close-turns"]));
        assert!(!closes(&["--close-turns", "--no-close-turns"]));
        assert!(closes(&["--no-close-turns", "--close-turns"]));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("12 parsecs").is_err());
    }
}

/// `--kv-cache-dtype` (vLLM's flag; its fp8 forms are not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KvCacheDtype {
    Auto,
    F32,
    F16,
    Bf16,
}

impl KvCacheDtype {
    fn dtype(self) -> Option<candle_core::DType> {
        match self {
            KvCacheDtype::Auto => None,
            KvCacheDtype::F32 => Some(candle_core::DType::F32),
            KvCacheDtype::F16 => Some(candle_core::DType::F16),
            KvCacheDtype::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}
