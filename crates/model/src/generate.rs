//! Single-sequence generation, for the CLI, tests and fixtures. The server's engine batches
//! many sequences through the same [`CausalLm::forward`]; this is the one-request path.

use std::sync::Arc;

use alora_cache::BlockId;

use crate::batch::{ActiveAdapter, SeqStep};
use crate::error::Result;
use crate::lora::LoraAdapter;
use crate::model::CausalLm;
use crate::text::output::{FinishReason, OutputLimits, OutputStream};
use crate::text::prompt::Prompt;
use crate::text::sampling::{Sampler, SamplingParams};
use crate::text::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Prefill chunk size.
    pub chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            chunk: 512,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
}

const BLOCK: usize = 16;

/// Generates from `prompt` (built by [`crate::text::prompt`], which found its activation start)
/// with an optional adapter, calling `on_text` with each piece of text as it becomes final.
pub fn generate(
    model: &CausalLm,
    tok: &Tokenizer,
    prompt: &Prompt,
    adapter: Option<Arc<LoraAdapter>>,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let activation_start = prompt.activation_start;
    let prompt = &prompt.ids[..];
    let total = (prompt.len() + opts.max_tokens).min(model.max_positions());
    let nblocks = total.div_ceil(BLOCK).max(1);
    let kv = model.new_kv_store(nblocks, BLOCK)?;
    let table: Vec<BlockId> = (0..nblocks as u32).map(BlockId).collect();
    let active = adapter
        .zip(activation_start)
        .map(|(adapter, activation_start)| ActiveAdapter {
            adapter,
            activation_start,
        });
    let mut sampler = Sampler::new(opts.sampling.clone(), prompt);
    let limits = OutputLimits {
        max_tokens: opts.max_tokens.min(total.saturating_sub(prompt.len())),
        stop: opts.stop.clone(),
        stop_token_ids: opts.stop_token_ids.clone(),
        ignore_eos: opts.ignore_eos,
        ..Default::default()
    };
    let mut output = OutputStream::new(limits, &tok.eos_token_ids);
    let mut ids: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut finish = FinishReason::Length;
    // A zero limit (no room in the context) samples nothing; otherwise the loop ends on the
    // finish the output stream reports.
    while !output.is_empty_limit() {
        let end = if pos < prompt.len() {
            (pos + opts.chunk).min(prompt.len())
        } else {
            ids.len()
        };
        let step = SeqStep {
            tokens: &ids[pos..end],
            start_pos: pos,
            adapter: active.clone(),
            block_table: &table[..end.div_ceil(BLOCK)],
            all_logits: false,
        };
        let logits = model.forward(&[step], &kv)?;
        pos = end;
        if pos < prompt.len() {
            continue;
        }
        let row = logits.last(0)?.to_vec1::<f32>()?;
        let t = sampler.sample(&row).token;
        let pushed = output.push(tok, t);
        if pushed.appended {
            out.push(t);
            ids.push(t);
        }
        on_text(&pushed.text);
        if let Some(f) = pushed.finish {
            finish = f;
            break;
        }
    }
    on_text(&output.finish(tok));
    Ok(Generation {
        ids: out,
        text: output.text_so_far().to_string(),
        finish_reason: finish,
    })
}
