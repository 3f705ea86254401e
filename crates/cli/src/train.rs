//! `alora train` (fine-tune an aLoRA or LoRA adapter) and `alora eval` (held-out accuracy of
//! an intrinsic). Defaults are the seed's recipe (docs/ALORA.md, "Training defaults").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use alora_model::{LoadOptions, LoadedModel, LoraAdapter, Module, QuantPolicy};
use alora_trainer::{AdapterSpec, Encoder, Example, LoraParams, TrainConfig, TrainModel, Trainer};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterType {
    Alora,
    Lora,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// HF model directory or GGUF file (GGUF weights are dequantized to f32 for training).
    #[arg(long, env = "ALORA_MODEL", default_value = crate::DEFAULT_MODEL)]
    model: PathBuf,
    /// Training conversations, JSONL: {"messages": [...]} or {"messages": {"chat": [...]}};
    /// the last turn is the target.
    #[arg(long)]
    data: PathBuf,
    /// Validation conversations (same format).
    #[arg(long, conflicts_with = "val_fraction")]
    val: Option<PathBuf>,
    /// Or: hold out this fraction of --data for validation.
    #[arg(long)]
    val_fraction: Option<f64>,
    #[arg(long, value_enum, default_value = "alora")]
    adapter_type: AdapterType,
    /// The invocation string put between the conversation and the target (required for aLoRA;
    /// for LoRA it is the separator, if given).
    #[arg(long)]
    invocation: Option<String>,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// Scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    #[arg(long)]
    rslora: bool,
    /// Projections to adapt, among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj")]
    targets: Vec<String>,
    #[arg(long, default_value_t = 6e-5)]
    lr: f64,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 8)]
    grad_accum: usize,
    /// Fraction of optimizer steps of linear warmup (then linear decay to 0).
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Longest example in tokens (longer lines are errors, or skipped with --skip-bad).
    #[arg(long, default_value_t = 4096)]
    max_len: usize,
    /// Validate and checkpoint every N optimizer steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    eval_steps: usize,
    /// Output directory: the best adapter, last/, checkpoint/, train_log.jsonl.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Start from this PEFT adapter's weights instead of PEFT's initialisation.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Continue from out/checkpoint.
    #[arg(long)]
    resume: bool,
    /// Leave out bad lines (counted) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    #[arg(long)]
    no_progress: bool,
    /// After training, report exact-match accuracy of the best adapter on this labelled set.
    #[arg(long)]
    test: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long, env = "ALORA_MODEL", default_value = crate::DEFAULT_MODEL)]
    model: PathBuf,
    /// The adapter to evaluate; without it, the base model (give --invocation then).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Invocation string for the base model, or for a LoRA adapter.
    #[arg(long)]
    invocation: Option<String>,
    /// Labelled conversations (JSONL, the last turn is the label).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 4096)]
    max_len: usize,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn load_model(path: &Path) -> Result<LoadedModel> {
    if !path.exists() {
        bail!(
            "model {} not found; run scripts/fetch-model.sh for the default model or pass --model",
            path.display()
        );
    }
    let opts = LoadOptions {
        quant: QuantPolicy::Dequantize,
        ..Default::default()
    };
    LoadedModel::load(path, &opts).with_context(|| format!("loading {}", path.display()))
}

fn eos(m: &LoadedModel) -> Option<u32> {
    m.tokenizer
        .eos_token
        .as_deref()
        .and_then(|e| m.tokenizer.token_to_id(e))
        .or_else(|| m.tokenizer.eos_token_ids.first().copied())
}

fn read(enc: &Encoder<'_>, path: &Path, skip_bad: bool) -> Result<Vec<Example>> {
    let (ex, skipped) = enc.read(path, skip_bad)?;
    if skipped > 0 {
        eprintln!("{}: skipped {skipped} bad lines", path.display());
    }
    Ok(ex)
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    let targets = a
        .targets
        .iter()
        .map(|t| Module::from_name(t).with_context(|| format!("--targets: unknown module `{t}`")))
        .collect::<Result<Vec<_>>>()?;
    if a.adapter_type == AdapterType::Alora && a.invocation.as_deref().unwrap_or("").is_empty() {
        bail!("--invocation is required for an aLoRA adapter");
    }
    if a.val_fraction.is_some_and(|f| !(0.0..1.0).contains(&f)) {
        bail!("--val-fraction must be in [0, 1)");
    }
    let m = load_model(&a.model)?;
    let invocation = match &a.invocation {
        Some(s) => m.tokenizer.encode(s)?,
        None => Vec::new(),
    };
    let enc = Encoder {
        template: &m.template,
        tokenizer: &m.tokenizer,
        invocation: invocation.clone(),
        alora: a.adapter_type == AdapterType::Alora,
        eos: eos(&m),
        max_len: a.max_len,
    };
    let mut train = read(&enc, &a.data, a.skip_bad)?;
    let val = match (&a.val, a.val_fraction) {
        (Some(p), _) => read(&enc, p, a.skip_bad)?,
        (None, Some(f)) if f > 0.0 => {
            train.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.seed));
            let n = ((train.len() as f64 * f).round() as usize).clamp(1, train.len() - 1);
            train.split_off(train.len() - n)
        }
        _ => Vec::new(),
    };
    let spec = AdapterSpec {
        invocation_tokens: (a.adapter_type == AdapterType::Alora).then(|| invocation.clone()),
        rank: a.rank,
        alpha: a.alpha,
        dropout: a.dropout,
        use_rslora: a.rslora,
        targets,
    };
    let tm = TrainModel::new(&m.model)?;
    let params = match &a.init_from {
        Some(dir) => {
            let p = LoraParams::load(dir, tm.config(), tm.device())?;
            if p.spec.invocation_tokens != spec.invocation_tokens {
                bail!(
                    "--init-from {}: its invocation or type differs",
                    dir.display()
                );
            }
            p
        }
        None => LoraParams::init(spec, tm.config(), a.seed, tm.device())?,
    };
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size.max(1),
        grad_accum: a.grad_accum.max(1),
        lr: a.lr,
        warmup_ratio: a.warmup_ratio,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        eval_steps: a.eval_steps,
        seed: a.seed,
    };
    let target_tokens: usize = train.iter().map(|e| e.target_tokens()).sum();
    eprintln!(
        "{} {}: {} trainable parameters; {} training examples ({} target tokens), {} validation",
        m.name,
        if params.spec.invocation_tokens.is_some() {
            "aLoRA"
        } else {
            "LoRA"
        },
        params.num_params(),
        train.len(),
        target_tokens,
        val.len()
    );
    let mut t = Trainer {
        model: &tm,
        params,
        cfg,
        base_model: m.name.clone(),
        out: a.out.clone(),
        progress: !a.no_progress,
        stop_after: None,
    };
    let r = t.run(&train, &val, a.resume)?;
    eprintln!(
        "{} steps in {:.1}s; {}{}; adapter in {}",
        r.steps,
        r.seconds,
        r.last_loss
            .map(|l| format!("last training loss {l:.4}"))
            .unwrap_or_else(|| "nothing left to train".into()),
        r.best_val
            .map(|v| format!(", best validation loss {v:.4}"))
            .unwrap_or_default(),
        a.out.display()
    );
    if let Some(test) = &a.test {
        drop(t);
        let ad = LoraAdapter::load("trained", &a.out, m.model.config(), m.model.device(), None)?;
        report(&m, Some(Arc::new(ad)), &enc, test, None)?;
    }
    Ok(())
}

fn report(
    m: &LoadedModel,
    adapter: Option<Arc<LoraAdapter>>,
    enc: &Encoder<'_>,
    data: &Path,
    json: Option<&Path>,
) -> Result<()> {
    let ex = read(enc, data, false)?;
    let r = alora_trainer::eval::exact_match(m, adapter, &ex)?;
    println!(
        "{}: accuracy {:.1}% ({}/{}); majority baseline {:.1}% (always \"{}\")",
        data.display(),
        r.accuracy * 100.0,
        r.correct,
        r.examples,
        r.majority_accuracy * 100.0,
        r.majority_label
    );
    for (truth, preds) in &r.confusion {
        let row: Vec<String> = preds.iter().map(|(p, n)| format!("{p:?}: {n}")).collect();
        println!("  {truth:?} -> {}", row.join(", "));
    }
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(())
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let adapter = match &a.adapter {
        Some(dir) => {
            let tok = m.tokenizer.clone();
            let encode = move |s: &str| tok.encode(s);
            Some(Arc::new(
                LoraAdapter::load(
                    "eval",
                    dir,
                    m.model.config(),
                    m.model.device(),
                    Some(&encode),
                )
                .with_context(|| format!("loading adapter {}", dir.display()))?,
            ))
        }
        None => None,
    };
    let invocation = match (
        adapter.as_ref().and_then(|ad| ad.invocation_tokens()),
        &a.invocation,
    ) {
        (Some(t), _) => t.to_vec(),
        (None, Some(s)) => m.tokenizer.encode(s)?,
        (None, None) => Vec::new(),
    };
    let enc = Encoder {
        template: &m.template,
        tokenizer: &m.tokenizer,
        invocation,
        alora: false,
        eos: eos(&m),
        max_len: a.max_len,
    };
    report(&m, adapter, &enc, &a.data, a.json.as_deref())
}
