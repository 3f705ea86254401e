//! Training data: JSONL conversations whose last turn is the target.
//!
//! Text = the serving prompt of the conversation minus its last turn (for an aLoRA:
//! `alora_model::text::prompt::chat_prompt`, the template without a generation prompt and the
//! invocation unless it already ends the rendering; for a LoRA: the template, then the
//! separator if any) + target + EOS, tokenized piece by piece so the invocation's ids appear
//! exactly as the adapter config lists them. Loss is on the target and EOS only; an aLoRA adapts from the invocation's
//! start s (the last occurrence, as PEFT finds it).

use std::path::Path;

use crate::error::{data, io_err, Result};
use alora_model::text::prompt::{self, find_activation_start, PromptAdapter};
use alora_model::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Where the adapter switches on: the invocation's start for aLoRA, 0 for LoRA.
    pub adapter_start: usize,
    /// The first position whose token is a training target (the loss is on
    /// ids[target_start..], predicted from the position before each).
    pub target_start: usize,
}

impl Example {
    pub fn target_tokens(&self) -> usize {
        self.ids.len() - self.target_start
    }
}

/// How raw conversations become examples.
pub struct Encoder<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    /// The invocation string's ids (empty: none, plain LoRA without a separator).
    pub invocation: Vec<u32>,
    /// aLoRA (adapter from the invocation on) or LoRA (adapter everywhere).
    pub alora: bool,
    pub eos: Option<u32>,
    pub max_len: usize,
}

/// A conversation from one JSON line: `{"messages": [...]}` or `{"messages": {"chat": [...]}}`.
pub fn conversation(v: &Value) -> Result<Vec<ChatMessage>> {
    let msgs = match &v["messages"] {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("chat") {
            Some(Value::Array(a)) => a,
            _ => return Err(data("`messages.chat` must be a list")),
        },
        Value::Null => return Err(data("no `messages`")),
        _ => return Err(data("`messages` must be a list or {\"chat\": [...]}")),
    };
    if msgs.len() < 2 {
        return Err(data(
            "a conversation needs at least one turn before the target turn",
        ));
    }
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m["role"]
                .as_str()
                .ok_or_else(|| data(format!("message {i}: no string `role`")))?;
            let content = m["content"]
                .as_str()
                .ok_or_else(|| data(format!("message {i}: no string `content`")))?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

impl Encoder<'_> {
    pub fn encode(&self, conv: &[ChatMessage]) -> Result<Example> {
        let (target, context) = conv
            .split_last()
            .ok_or_else(|| data("empty conversation"))?;
        let (mut ids, prompt_start) = if self.alora {
            // The serving rule (alora_model::text::prompt), so training and serving build the
            // same ids for the same conversation.
            let kind = PromptAdapter::ALora {
                invocation: &self.invocation,
            };
            let p = prompt::chat_prompt(self.template, self.tokenizer, context, kind)?.1;
            let s = p
                .activation_start
                .ok_or_else(|| data("an aLoRA prompt has an activation start"))?;
            (p.ids, s)
        } else {
            // A plain LoRA, with the separator (if any) after the rendered context.
            let mut ids = self
                .tokenizer
                .encode(&self.template.render(context, false)?)?;
            let s = ids.len();
            ids.extend_from_slice(&self.invocation);
            (ids, s)
        };
        let target_start = ids.len();
        ids.extend(self.tokenizer.encode(&target.content)?);
        ids.extend(self.eos);
        if ids.len() == target_start {
            return Err(data("the target turn is empty"));
        }
        if ids.len() > self.max_len {
            return Err(data(format!(
                "{} tokens, over --max-len {}",
                ids.len(),
                self.max_len
            )));
        }
        let adapter_start = if self.alora {
            let s = find_activation_start(&ids, &self.invocation)
                .ok_or_else(|| data("the invocation sequence is not in the tokens"))?;
            if s != prompt_start {
                return Err(data("the target contains the invocation sequence"));
            }
            s
        } else {
            0
        };
        Ok(Example {
            ids,
            adapter_start,
            target_start,
        })
    }

    /// Reads a JSONL file. A bad line is an error naming it, unless `skip_bad`, in which case
    /// it is counted and left out. Returns the examples and the number skipped.
    pub fn read(&self, path: &Path, skip_bad: bool) -> Result<(Vec<Example>, usize)> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let (mut out, mut skipped) = (Vec::new(), 0);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let r = serde_json::from_str::<Value>(line)
                .map_err(|e| data(format!("not JSON: {e}")))
                .and_then(|v| conversation(&v))
                .and_then(|c| self.encode(&c));
            match r {
                Ok(e) => out.push(e),
                Err(_) if skip_bad => skipped += 1,
                Err(e) => return Err(data(format!("{}:{}: {e}", path.display(), i + 1))),
            }
        }
        if out.is_empty() {
            return Err(data(format!("{}: no usable examples", path.display())));
        }
        Ok((out, skipped))
    }
}
