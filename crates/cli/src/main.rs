//! The `alora` command: `generate` (try a model and adapter from the terminal) and `serve`
//! (the HTTP API), `train` (fine-tune an adapter) and `eval` (score it on held-out data).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use alora_model::text::prompt::{self, PromptAdapter};
use alora_model::{
    generate, ChatMessage, GenerateOptions, LoadOptions, LoadedModel, LoraAdapter, QuantPolicy,
    SamplingParams,
};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod serve;
mod train;

/// Where `scripts/fetch-model.sh` puts the default model.
pub(crate) const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "alora",
    version,
    about = "Activated LoRA inference server and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt or a reply to a chat message, streamed to stdout.
    Generate(GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Fine-tune an aLoRA or LoRA adapter on JSONL conversations (PEFT-format output).
    Train(Box<train::TrainArgs>),
    /// Exact-match accuracy of an adapter (or the base model) on labelled conversations.
    Eval(train::EvalArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// HF model directory or GGUF file.
    #[arg(long, env = "ALORA_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// PEFT LoRA or aLoRA adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Raw prompt text (no chat template), used as given: with an aLoRA it must contain the
    /// invocation, as on /v1/completions.
    #[arg(long, conflicts_with = "chat")]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// GGUF weights in memory: blocks (Q4_0/Q4_1/Q8_0 kept, alora kernel), dense (f32), keep (candle QMatMul), q8_0, q4_0, q4k, q6k.
    #[arg(long, env = "ALORA_WEIGHTS", default_value = "blocks")]
    weights: QuantPolicy,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        // `info` unless RUST_LOG says otherwise (without it, EnvFilter shows errors only, which
        // hid start-up progress and made --log-prompts a no-op).
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in log files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Generate(a) => run_generate(a),
        Command::Serve(a) => serve::run(a),
        Command::Train(a) => train::run_train(*a),
        Command::Eval(a) => train::run_eval(a),
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    if !a.model.exists() {
        bail!(
            "model {} not found; run scripts/fetch-model.sh for the default model or pass --model",
            a.model.display()
        );
    }
    let opts = LoadOptions {
        quant: a.weights,
        ..Default::default()
    };
    let m = LoadedModel::load(&a.model, &opts)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let adapter = match &a.adapter {
        Some(dir) => {
            let tok = m.tokenizer.clone();
            let encode = move |s: &str| tok.encode(s);
            let ad = LoraAdapter::load(
                "cli",
                dir,
                m.model.config(),
                m.model.device(),
                Some(&encode),
            )
            .with_context(|| format!("loading adapter {}", dir.display()))?;
            Some(Arc::new(ad))
        }
        None => None,
    };
    // The server's prompt rules (alora_model::text::prompt): a chat renders with a generation
    // prompt for base and LoRA, without one plus the invocation for an aLoRA (as
    // /v1/chat/completions does); a raw prompt is used as given and must hold an aLoRA's
    // invocation (as /v1/completions requires).
    let kind = PromptAdapter::of(adapter.as_deref().map(|ad| ad.invocation_tokens()));
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), None) => prompt::ids_prompt(m.tokenizer.encode(p)?, kind).map_err(|_| {
            let inv = adapter.as_deref().and_then(|ad| ad.invocation_tokens());
            let text = inv.map(|i| m.tokenizer.decode(i, false).unwrap_or_default());
            anyhow::anyhow!(
                "the prompt does not contain the aLoRA's invocation {:?} (tokens {:?});                  end the prompt with it, or use --chat, which appends it",
                text.unwrap_or_default(),
                inv.unwrap_or_default()
            )
        })?,
        (None, Some(c)) => {
            let msgs = [ChatMessage::new("user", c)];
            prompt::chat_prompt(&m.template, &m.tokenizer, &msgs, kind)?.1
        }
        _ => bail!("pass exactly one of --prompt or --chat"),
    };
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        ..Default::default()
    };
    let gen_opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling,
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    let started = std::time::Instant::now();
    let g = generate(&m.model, &m.tokenizer, &prompt, adapter, &gen_opts, |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    })?;
    let secs = started.elapsed().as_secs_f64();
    writeln!(out)?;
    eprintln!(
        "[{} prompt tokens, {} generated in {:.2}s, finish: {:?}]",
        prompt.ids.len(),
        g.ids.len(),
        secs,
        g.finish_reason
    );
    Ok(())
}
