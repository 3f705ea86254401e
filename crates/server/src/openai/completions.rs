//! `POST /v1/completions`: raw prompts (text or token ids, one or many). An aLoRA adapter's
//! invocation must occur in each prompt; otherwise 400 `invocation_not_found` (PEFT would
//! silently run the base model).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::common::{respond, submit, token_strings, token_text, Collected, RequestMeta, Wire};
use super::types::*;
use super::validate;
use crate::engine::{Finish, ModelInfo, TokenEvent};
use crate::error::ApiError;
use crate::state::AppState;

pub async fn completions(
    State(state): State<AppState>,
    axum::Extension(meta): axum::Extension<RequestMeta>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (v, info) =
        validate::prepare(&state, body, COMPLETION_FIELDS, validate::completion).await?;
    let rxs = submit(&state, &v, &meta)?;
    // Choices are in prompt order, `n` per prompt.
    let echoes = v
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.echo.clone(), v.n))
        .collect();
    let wire = CompletionWire {
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now_unix(),
        model: v.model_name.clone(),
        logprobs: v.logprobs.is_some(),
        echoes,
        info,
    };
    respond(&state, &v, rxs, wire, meta).await
}

/// The text completion wire format.
struct CompletionWire {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    /// Per choice: the prompt text when `echo` was asked, else empty.
    echoes: Vec<String>,
    info: Arc<ModelInfo>,
}

impl CompletionWire {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<UsageOut>) -> String {
        serde_json::to_string(&self.body(choices, usage)).expect("chunk serializes")
    }

    fn body(&self, choices: Vec<CompletionChoice>, usage: Option<UsageOut>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn text(&self, index: usize, text: String, logprobs: Option<CompletionLogprobs>) -> String {
        let choice = CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: None,
        };
        self.chunk(vec![choice], None)
    }
}

impl Wire for CompletionWire {
    fn opening(&self, _choices: usize) -> Vec<String> {
        // A scored echo (with `logprobs`) comes with its log-probabilities in `prompt`.
        let echoed = self
            .echoes
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.is_empty() && !self.logprobs);
        echoed.map(|(i, e)| self.text(i, e.clone(), None)).collect()
    }

    fn prompt(&self, index: usize, tokens: Vec<TokenEvent>) -> Option<String> {
        let echo = &self.echoes[index];
        let lp = logprobs_of(&self.info, &tokens, echo, 0);
        Some(self.text(index, echo.clone(), Some(lp)))
    }

    fn token(&self, index: usize, t: TokenEvent) -> Option<String> {
        if t.text.is_empty() && !self.logprobs {
            return None;
        }
        let lp = self
            .logprobs
            .then(|| logprobs_of(&self.info, std::slice::from_ref(&t), &t.text, 0));
        Some(self.text(index, t.text, lp))
    }

    fn done(&self, index: usize, text: String, finish: Finish) -> String {
        let choice = CompletionChoice {
            index,
            text,
            logprobs: None,
            finish_reason: Some(finish.as_str()),
        };
        self.chunk(vec![choice], None)
    }

    fn usage(&self, usage: UsageOut) -> String {
        self.chunk(vec![], Some(usage))
    }

    fn response(&self, choices: Vec<Collected>, usage: UsageOut) -> Response {
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let echo = &self.echoes[index];
                let logprobs = self.logprobs.then(|| {
                    let mut lp = logprobs_of(&self.info, &c.prompt, echo, 0);
                    lp.append(logprobs_of(&self.info, &c.tokens, &c.text, echo.len()));
                    lp
                });
                CompletionChoice {
                    index,
                    logprobs,
                    text: format!("{echo}{}", c.text),
                    finish_reason: Some(c.finish.as_str()),
                }
            })
            .collect();
        Json(self.body(choices, Some(usage))).into_response()
    }
}

/// `text`: what the `tokens` join to (`token_strings`): the choice's output, or the echoed
/// prompt for the scored prompt tokens; `offset0` is where `text` starts in the choice's text.
/// A token without a log-probability (the prompt's first) gets `null`s.
fn logprobs_of(
    info: &ModelInfo,
    tokens: &[TokenEvent],
    text: &str,
    offset0: usize,
) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offset = offset0;
    for (t, tok) in tokens.iter().zip(token_strings(tokens, text)) {
        lp.text_offset.push(offset);
        offset += tok.len();
        lp.tokens.push(tok);
        lp.token_logprobs.push(t.logprob);
        lp.top_logprobs.push(t.logprob.map(|_| {
            t.top
                .iter()
                .map(|(id, l)| (token_text(info, *id).0, *l))
                .collect()
        }));
    }
    lp
}
