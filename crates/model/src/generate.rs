//! Single-sequence generation, for the CLI, tests and fixtures. The server's engine batches
//! many sequences through the same [`CausalLm::forward`]; this is the one-request path.

use std::sync::Arc;

use alora_cache::BlockId;

use crate::batch::{ActiveAdapter, SeqStep};
use crate::error::Result;
use crate::lora::LoraAdapter;
use crate::model::CausalLm;
use crate::sampling::{Sampler, SamplingParams, StopCheck, StopStrings};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Why generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

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

/// Generates from `prompt` with an optional adapter, calling `on_text` with each piece of text
/// as it becomes final.
pub fn generate(
    model: &CausalLm,
    tok: &Tokenizer,
    prompt: &[u32],
    adapter: Option<Arc<LoraAdapter>>,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let total = (prompt.len() + opts.max_tokens).min(model.max_positions());
    let nblocks = total.div_ceil(BLOCK).max(1);
    let kv = model.new_kv_store(nblocks, BLOCK)?;
    let table: Vec<BlockId> = (0..nblocks as u32).map(BlockId).collect();
    let active = adapter.and_then(|a| {
        a.activation_start(prompt)
            .map(|activation_start| ActiveAdapter {
                adapter: a,
                activation_start,
            })
    });
    let mut sampler = Sampler::new(opts.sampling.clone(), prompt);
    let mut decoder = IncrementalDecoder::new(true);
    let mut stops = StopStrings::new(opts.stop.clone());
    let mut ids: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut finish = FinishReason::Length;
    while out.len() < opts.max_tokens && ids.len() < total + 1 {
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
        let is_eos = !opts.ignore_eos && tok.eos_token_ids.contains(&t);
        if is_eos || opts.stop_token_ids.contains(&t) {
            finish = FinishReason::Stop;
            break;
        }
        out.push(t);
        ids.push(t);
        if let Some(piece) = decoder.push(tok, t)? {
            match stops.push(&piece) {
                StopCheck::Continue(s) => on_text(&s),
                StopCheck::Stopped(s) => {
                    on_text(&s);
                    finish = FinishReason::Stop;
                    break;
                }
            }
        }
        if ids.len() >= total {
            break;
        }
    }
    if finish == FinishReason::Length {
        if let Some(rest) = decoder.flush(tok)? {
            let (StopCheck::Continue(s) | StopCheck::Stopped(s)) = stops.push(&rest);
            on_text(&s);
        }
        on_text(&stops.flush());
    }
    Ok(Generation {
        ids: out,
        text: stops.text_so_far().to_string(),
        finish_reason: finish,
    })
}
