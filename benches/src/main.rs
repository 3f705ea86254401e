//! `alora-bench run ...` load-tests a server; `alora-bench compare A.json B.json ...` sets runs
//! side by side and plots them. See BENCHMARKS.md for the runs behind every figure.

use std::path::PathBuf;
use std::time::Duration;

use alora_bench::{
    compare_table, plot, race_table, AdapterField, Client, Endpoint, Kind, LoadConfig, Report, Slo,
    Target, Workload, WorkloadConfig,
};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "alora-bench",
    version,
    about = "Load-test an OpenAI-compatible server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drive a server with a workload and report latency, throughput and prefix-cache reuse.
    Run(Box<RunArgs>),
    /// Print runs side by side (median non-base TTFT per length, ratio to the first) and plot them.
    Compare {
        /// Result files written by `run --result-json`; the first is the reference.
        #[arg(required = true, num_args = 1..)]
        results: Vec<PathBuf>,
        /// Write ttft_vs_length.svg, ttft_cdf.svg and e2el_cdf.svg here.
        #[arg(long)]
        plot_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    base_url: String,
    /// Bearer token, if the server wants one.
    #[arg(long, env = "ALORA_API_KEY")]
    api_key: Option<String>,
    /// Base model name; default: the first model the server lists.
    #[arg(long)]
    model: Option<String>,
    /// Where requests name the adapter: `model` (vLLM style), alora's `adapter` field, or
    /// llama-server's `lora` list (adapters named by id or file stem; the harness sets the
    /// server's global scales to 0 so requests without `lora` run the base model).
    #[arg(long, value_enum, default_value = "model")]
    adapter_field: AdapterField,
    #[arg(long, value_enum, default_value = "random")]
    workload: Kind,
    /// Endpoint for the random and mixed workloads.
    #[arg(long, value_enum, default_value = "chat")]
    endpoint: Endpoint,
    /// Random/mixed: prompt length in tokens (approximately; the report has exact counts).
    #[arg(long, default_value_t = 256)]
    input_len: usize,
    /// Tokens to generate per request (base turns, random and mixed requests).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Intrinsics: conversation lengths in tokens, used in turn.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048")]
    conversation_lengths: Vec<usize>,
    /// Intrinsics and race: base turns (rounds) per conversation.
    #[arg(long, default_value_t = 1)]
    turns: usize,
    /// Intrinsics: tokens asked of each adapter call.
    #[arg(long, default_value_t = 4)]
    intrinsic_output_len: usize,
    /// Intrinsics: adapters to call after each base turn. Mixed: adapters to use in turn
    /// (`base` for none). Repeat or separate with commas.
    #[arg(long = "adapter", value_delimiter = ',')]
    adapters: Vec<String>,
    /// Conversations from a JSONL file ({"messages": [...]} or {"messages": {"chat": [...]}})
    /// instead of generated ones.
    #[arg(long)]
    dataset: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Closed loop: sessions in flight (the default, with 1, when no --request-rate is given);
    /// for the race, requests in flight over all its conversations.
    #[arg(long, conflicts_with = "request_rate")]
    concurrency: Option<usize>,
    /// Open loop: sessions (race: conversations) per second, Poisson arrivals (`inf`: all at
    /// once).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Open loop: cap on sessions in flight.
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Sessions to run (a session is one request, or one conversation for intrinsics and
    /// race); 10 when neither this nor --duration is given. The race needs this, not a duration.
    #[arg(long)]
    num_prompts: Option<usize>,
    /// Or: seconds to keep starting sessions.
    #[arg(long)]
    duration: Option<f64>,
    /// Sessions run first and not measured (model warm-up).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// SLOs for goodput, vLLM style: ttft:MS tpot:MS e2el:MS.
    #[arg(long, num_args = 1..)]
    goodput: Vec<String>,
    /// Milliseconds a conversation pauses before each request after its first (a user or an
    /// agent reading the reply; not timed).
    #[arg(long, default_value_t = 0.0)]
    think_time_ms: f64,
    /// Let the model stop at EOS (by default `ignore_eos` fixes the output length, with
    /// `skip_special_tokens: false` so a conversation's text round-trips to its tokens).
    #[arg(long)]
    no_ignore_eos: bool,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// A JSON object merged into every request body, e.g.
    /// '{"response_format": {"type": "json_schema", "json_schema": {...}}}' to measure
    /// structured outputs (vLLM's `bench serve --extra-body`).
    #[arg(long, value_parser = parse_object)]
    extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    /// Name of this run in tables and plots.
    #[arg(long, default_value = "run")]
    label: String,
    #[arg(long)]
    result_json: Option<PathBuf>,
    #[arg(long)]
    plot_dir: Option<PathBuf>,
    #[arg(long)]
    no_progress: bool,
}

fn parse_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("--extra-body must be a JSON object".into()),
        Err(e) => Err(format!("--extra-body is not JSON: {e}")),
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let slo = Slo::parse(&a.goodput)?;
    let mut target = Target {
        base_url: a.base_url.clone(),
        api_key: a.api_key.clone(),
        model: a.model.clone().unwrap_or_default(),
        adapter_field: a.adapter_field,
        ignore_eos: !a.no_ignore_eos,
        timeout: Duration::from_secs_f64(a.timeout),
        extra_body: a.extra_body.clone().unwrap_or_default(),
    };
    if target.model.is_empty() {
        target.model = Client::new(target.clone())?
            .first_model()
            .await
            .with_context(|| format!("asking {} for its models (or pass --model)", a.base_url))?;
    }
    let wl = WorkloadConfig {
        kind: a.workload,
        endpoint: a.endpoint,
        input_len: a.input_len,
        output_len: a.output_len,
        conversation_lengths: a.conversation_lengths.clone(),
        turns: a.turns.max(1),
        intrinsic_output_len: a.intrinsic_output_len,
        adapters: a.adapters.clone(),
        seed: a.seed,
    };
    let dataset = a
        .dataset
        .as_deref()
        .map(alora_bench::workload::read_dataset)
        .transpose()?;
    let load = LoadConfig {
        concurrency: a.concurrency.or(a.request_rate.is_none().then_some(1)),
        request_rate: a.request_rate,
        max_concurrency: a.max_concurrency,
        num_sessions: a.num_prompts.or(a.duration.is_none().then_some(10)),
        duration: a.duration.map(Duration::from_secs_f64),
        progress: !a.no_progress,
        seed: a.seed,
        think_time: Duration::from_secs_f64(a.think_time_ms / 1e3),
    };
    if a.warmup > 0 {
        let mut w = wl.clone();
        w.seed = a.seed.wrapping_add(0x5eed);
        let warm = LoadConfig {
            concurrency: Some(1),
            request_rate: None,
            num_sessions: Some(a.warmup),
            duration: None,
            progress: false,
            ..load.clone()
        };
        let client = Client::connect(target.clone()).await?;
        let out = alora_bench::run(client, Workload::new(w, None)?, &warm).await?;
        if let Some(r) = out.records.iter().find(|r| !r.out.ok) {
            anyhow::bail!(
                "warm-up request failed: {}",
                r.out.error.clone().unwrap_or_default()
            );
        }
    }
    let settings = serde_json::json!({
        "base_url": a.base_url, "model": target.model, "adapter_field": a.adapter_field,
        "ignore_eos": target.ignore_eos, "workload": wl, "load": load,
        "dataset": a.dataset, "warmup": a.warmup,
    });
    let client = Client::connect(target)
        .await
        .with_context(|| format!("preparing {}", a.base_url))?;
    let out = alora_bench::run(client, Workload::new(wl, dataset)?, &load).await?;
    let report = Report::new(a.label, settings, out, slo);
    print!("{}", report.table());
    if let Some(p) = &a.result_json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {p:?}"))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(d) = &a.plot_dir {
        for f in plot::all(std::slice::from_ref(&report), d)? {
            eprintln!("wrote {}", f.display());
        }
    }
    if report.completed == 0 {
        anyhow::bail!("no request succeeded");
    }
    Ok(())
}

fn compare(results: Vec<PathBuf>, plot_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let reports: Vec<Report> = results
        .iter()
        .map(|p| {
            let t = std::fs::read(p).with_context(|| format!("reading {p:?}"))?;
            serde_json::from_slice(&t).with_context(|| format!("{p:?} is not a result file"))
        })
        .collect::<anyhow::Result<_>>()?;
    for r in &reports[1..] {
        print!("{}", compare_table(&reports[0], r));
        print!("{}", race_table(&reports[0], r));
    }
    if let Some(d) = &plot_dir {
        for f in plot::all(&reports, d)? {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(*a).await,
        Cmd::Compare { results, plot_dir } => compare(results, plot_dir),
    }
}
