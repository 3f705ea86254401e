//! Held-out evaluation of an intrinsic: greedy generation after the invocation, compared with
//! the target turn (exact match after trimming), next to the majority-class baseline.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::Result;
use alora_model::{generate, GenerateOptions, LoadedModel, LoraAdapter, Prompt};
use serde::Serialize;

use crate::data::Example;

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub examples: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// The most common label and the accuracy of always answering it.
    pub majority_label: String,
    pub majority_accuracy: f64,
    /// (label, prediction) -> count.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
}

/// The label of an example: its target tokens decoded, special tokens (EOS) dropped, trimmed.
pub fn label(m: &LoadedModel, ex: &Example) -> Result<String> {
    Ok(m.tokenizer
        .decode(&ex.ids[ex.target_start..], true)?
        .trim()
        .to_string())
}

/// Runs every example's prompt (context + invocation) through greedy generation with
/// `adapter` (None: the base model) and scores exact matches.
pub fn exact_match(
    m: &LoadedModel,
    adapter: Option<Arc<LoraAdapter>>,
    examples: &[Example],
) -> Result<EvalReport> {
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut correct = 0;
    for ex in examples {
        let truth = label(m, ex)?;
        let opts = GenerateOptions {
            max_tokens: ex.target_tokens() + 4,
            ..Default::default()
        };
        // The example's own activation start (its invocation was placed by the prompt rule).
        let prompt = Prompt {
            ids: ex.ids[..ex.target_start].to_vec(),
            activation_start: adapter.as_ref().map(|_| ex.adapter_start),
        };
        let g = generate(
            &m.model,
            &m.tokenizer,
            &prompt,
            adapter.clone(),
            &opts,
            |_| {},
        )?;
        let pred = m.tokenizer.decode(&g.ids, true)?.trim().to_string();
        if pred == truth {
            correct += 1;
        }
        *counts.entry(truth.clone()).or_default() += 1;
        *confusion.entry(truth).or_default().entry(pred).or_default() += 1;
    }
    let n = examples.len().max(1);
    let (majority_label, majority) = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(l, c)| (l.clone(), *c))
        .unwrap_or_default();
    Ok(EvalReport {
        examples: examples.len(),
        correct,
        accuracy: correct as f64 / n as f64,
        majority_label,
        majority_accuracy: majority as f64 / n as f64,
        confusion,
    })
}
