//! The training loop: per-example loss and gradients, accumulation over an effective batch,
//! clipping, AdamW with a linear schedule, validation, best-so-far saving and checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{data, files, io_err, json_err, Result};
use candle_core::{Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::forward::{AdapterUse, TrainModel};
use crate::optim::{clip_grad_norm, linear_schedule, AdamW, AdamWConfig};
use crate::params::LoraParams;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    /// Fraction of the optimizer steps spent warming up.
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Validate (and checkpoint) every this many optimizer steps; 0: only at the end.
    pub eval_steps: usize,
    pub seed: u64,
}

/// The summed cross-entropy over `ex`'s target tokens (a scalar in the graph of `params`) and
/// the number of target tokens. `dropout_seed` turns on the adapter's dropout.
pub fn example_loss(
    model: &TrainModel,
    params: &LoraParams,
    ex: &Example,
    dropout_seed: Option<u64>,
) -> Result<(Tensor, usize)> {
    let dev = model.device();
    let s = ex.adapter_start;
    if ex.target_start <= s || ex.target_start > ex.ids.len() {
        return Err(data("example has no target after the adapter start"));
    }
    // The prefix before s runs the base model only: no adapter, no graph.
    let past = if s > 0 {
        Some(model.forward(&ex.ids[..s], None, None)?.1.detach())
    } else {
        None
    };
    let suffix = &ex.ids[s..];
    let mut ad = AdapterUse::all_rows(params, suffix.len(), dev)?;
    if let Some(seed) = dropout_seed {
        ad = ad.with_dropout(params.spec.dropout, seed);
    }
    let (h, _) = model.forward(suffix, past.as_ref(), Some(&ad))?;
    // The hidden state at position j - 1 predicts token j.
    let n = ex.target_tokens();
    let rows = h.narrow(0, ex.target_start - 1 - s, n)?;
    let logits = model.logits(&rows)?;
    let targets = Tensor::new(&ex.ids[ex.target_start..], dev)?;
    let loss = (candle_nn::loss::cross_entropy(&logits, &targets)? * n as f64)?;
    Ok((loss, n))
}

/// Mean loss over the target tokens of `examples` and the gradient of that mean for every
/// parameter (in [`LoraParams::named`] order). What one optimizer step sees.
pub fn batch_gradients(
    model: &TrainModel,
    params: &LoraParams,
    examples: &[&Example],
    dropout_seed: Option<u64>,
) -> Result<(f64, Vec<Tensor>)> {
    let vars: Vec<&Var> = params.named().into_iter().map(|(_, v)| v).collect();
    let total: usize = examples.iter().map(|e| e.target_tokens()).sum();
    let mut acc: Vec<Tensor> = vars
        .iter()
        .map(|v| v.zeros_like())
        .collect::<candle_core::Result<_>>()?;
    let mut loss_sum = 0.0;
    for (i, ex) in examples.iter().enumerate() {
        let seed =
            dropout_seed.map(|s| s.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i as u64));
        let (loss, _) = example_loss(model, params, ex, seed)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let grads = (loss / total as f64)?.backward()?;
        for (a, v) in acc.iter_mut().zip(&vars) {
            if let Some(g) = grads.get(v) {
                *a = (&*a + g)?;
            }
        }
    }
    Ok((loss_sum / total as f64, acc))
}

/// Mean loss over the target tokens of `examples`, no dropout, no gradients kept.
pub fn eval_loss(model: &TrainModel, params: &LoraParams, examples: &[Example]) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0);
    for ex in examples {
        let (l, k) = example_loss(model, params, ex, None)?;
        sum += l.to_scalar::<f32>()? as f64;
        n += k;
    }
    Ok(sum / n.max(1) as f64)
}

/// What a checkpoint remembers besides the weights and moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// Optimizer steps completed.
    step: u64,
    best_val: Option<f64>,
    config: TrainConfig,
    train_examples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps: u64,
    /// Training loss of the last step this call ran (`None` if it ran none: already done).
    pub last_loss: Option<f64>,
    pub best_val: Option<f64>,
    pub seconds: f64,
}

pub struct Trainer<'a> {
    pub model: &'a TrainModel,
    pub params: LoraParams,
    pub cfg: TrainConfig,
    /// `base_model_name_or_path` written into the adapter config.
    pub base_model: String,
    /// Output directory: the best adapter (the last one without validation data) at the top,
    /// `last/` (the final weights) and `checkpoint/` (to resume).
    pub out: PathBuf,
    pub progress: bool,
    /// Stop after this many optimizer steps in this call, as if interrupted (tests; the last
    /// checkpoint is what a resumed run starts from).
    pub stop_after: Option<u64>,
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(v).map_err(json_err(path))?;
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

impl Trainer<'_> {
    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    /// Trains on `train`, validating on `val`. With `resume`, continues from `out/checkpoint`.
    pub fn run(&mut self, train: &[Example], val: &[Example], resume: bool) -> Result<Outcome> {
        let cfg = self.cfg.clone();
        let window = (cfg.batch_size * cfg.grad_accum).max(1);
        let per_epoch = train.len().div_ceil(window) as u64;
        let total = per_epoch * cfg.epochs as u64;
        let warmup = (cfg.warmup_ratio * total as f64).ceil() as u64;
        let names: Vec<String> = self.params.named().into_iter().map(|(n, _)| n).collect();
        let mut opt = {
            let vars: Vec<&Var> = self.params.named().into_iter().map(|(_, v)| v).collect();
            AdamW::new(
                AdamWConfig {
                    weight_decay: cfg.weight_decay,
                    ..Default::default()
                },
                &vars,
            )?
        };
        std::fs::create_dir_all(&self.out).map_err(io_err(&self.out))?;
        let mut state = State {
            step: 0,
            best_val: None,
            config: cfg.clone(),
            train_examples: train.len(),
        };
        if resume {
            let ck = self.checkpoint_dir();
            let state_path = ck.join("trainer_state.json");
            let bytes = std::fs::read(&state_path)
                .map_err(|e| files(format!("no checkpoint to resume in {ck:?}: {e}")))?;
            let s: State = serde_json::from_slice(&bytes).map_err(json_err(&state_path))?;
            if s.config != cfg || s.train_examples != train.len() {
                return Err(files(format!(
                    "{ck:?} was made with other settings or data; start afresh without --resume"
                )));
            }
            self.params = LoraParams::load(&ck, self.model.config(), self.model.device())?;
            opt.load(&names, &ck.join("optimizer.safetensors"), s.step)?;
            state = s;
        }
        let bar = if self.progress {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_position(state.step);
            b
        } else {
            ProgressBar::hidden()
        };
        let log_path = self.out.join("train_log.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let t0 = Instant::now();
        let mut last_loss = None;
        let mut order: Option<(u64, Vec<usize>)> = None;
        let mut ran = 0u64;
        while state.step < total {
            if self.stop_after.is_some_and(|n| ran >= n) {
                bar.finish_and_clear();
                return Ok(Outcome {
                    steps: state.step,
                    last_loss,
                    best_val: state.best_val,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
            ran += 1;
            let step = state.step;
            let epoch = step / per_epoch;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut o: Vec<usize> = (0..train.len()).collect();
                o.shuffle(&mut StdRng::seed_from_u64(cfg.seed.wrapping_add(epoch)));
                order = Some((epoch, o));
            }
            let o = &order.as_ref().expect("set above").1;
            let k = (step % per_epoch) as usize;
            let batch: Vec<&Example> = o[k * window..((k + 1) * window).min(o.len())]
                .iter()
                .map(|&i| &train[i])
                .collect();
            let ts = Instant::now();
            let (loss, mut grads) = batch_gradients(
                self.model,
                &self.params,
                &batch,
                Some(cfg.seed ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            )?;
            let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
            let lr = linear_schedule(step, warmup, total, cfg.lr);
            {
                let vars: Vec<&Var> = self.params.named().into_iter().map(|(_, v)| v).collect();
                opt.step(&vars, &grads, lr)?;
            }
            state.step += 1;
            last_loss = Some(loss);
            let tokens: usize = batch.iter().map(|e| e.ids.len()).sum();
            let mut line = LogLine {
                step: state.step,
                epoch: state.step as f64 / per_epoch as f64,
                loss,
                lr,
                grad_norm,
                tokens_per_s: tokens as f64 / ts.elapsed().as_secs_f64(),
                val_loss: None,
            };
            let at_eval = (cfg.eval_steps > 0 && state.step.is_multiple_of(cfg.eval_steps as u64))
                || state.step == total;
            if at_eval {
                if !val.is_empty() {
                    let v = eval_loss(self.model, &self.params, val)?;
                    line.val_loss = Some(v);
                    if state.best_val.is_none_or(|b| v < b) {
                        state.best_val = Some(v);
                        self.params.save(&self.out, &self.base_model)?;
                    }
                }
                let ck = self.checkpoint_dir();
                self.params.save(&ck, &self.base_model)?;
                opt.save(&names, &ck.join("optimizer.safetensors"))?;
                write_json(&ck.join("trainer_state.json"), &state)?;
            }
            use std::io::Write;
            let json = serde_json::to_string(&line).map_err(json_err(&log_path))?;
            writeln!(log, "{json}").map_err(io_err(&log_path))?;
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.0} tok/s{}",
                line.tokens_per_s,
                state
                    .best_val
                    .map(|v| format!(" best val {v:.4}"))
                    .unwrap_or_default()
            ));
            bar.set_position(state.step);
        }
        bar.finish_and_clear();
        self.params.save(&self.out.join("last"), &self.base_model)?;
        if val.is_empty() {
            self.params.save(&self.out, &self.base_model)?;
        }
        Ok(Outcome {
            steps: state.step,
            last_loss,
            best_val: state.best_val,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}
