//! `POST /v1/completions`: raw prompts (text or token ids, one or many). An aLoRA adapter's
//! invocation must occur in each prompt; otherwise 400 `invocation_not_found` (PEFT would
//! silently run the base model).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;

use super::common::{
    collect_all, include_usage, parse_body, resolve_adapter, spawn_stream, sse, submit_all,
    token_text, usage_out, validate_lengths, validate_sampling, MAX_TOP_LOGPROBS,
};
use super::types::*;
use crate::engine::{Event, GenRequest, ModelInfo, TokenEvent};
use crate::error::ApiError;
use crate::state::AppState;
use alora_model::text::prompt::{self, PromptAdapter};

fn prompts(p: Option<Prompt>, info: &ModelInfo) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let vocab = info.config.vocab_size;
    let ids = |v: Vec<i64>, at: &str| -> Result<(Vec<u32>, String), ApiError> {
        if let Some(bad) = v.iter().find(|t| **t < 0 || **t as usize >= vocab) {
            return Err(ApiError::invalid(
                at,
                format!("token id {bad} is not in [0, {vocab})"),
            ));
        }
        let ids: Vec<u32> = v.into_iter().map(|t| t as u32).collect();
        let text = info.tokenizer.decode(&ids, false).unwrap_or_default();
        Ok((ids, text))
    };
    let text = |s: String| -> Result<(Vec<u32>, String), ApiError> {
        Ok((
            info.tokenizer
                .encode(&s)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            s,
        ))
    };
    let out = match p.ok_or_else(|| ApiError::invalid("prompt", "`prompt` is required"))? {
        Prompt::Text(s) => vec![text(s)?],
        Prompt::Texts(v) => v.into_iter().map(text).collect::<Result<_, _>>()?,
        Prompt::Ids(v) => vec![ids(v, "prompt")?],
        Prompt::IdLists(v) => v
            .into_iter()
            .map(|x| ids(x, "prompt"))
            .collect::<Result<_, _>>()?,
    };
    if out.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    Ok(out)
}

fn logprobs_of(info: &ModelInfo, tokens: &[TokenEvent], offset0: usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offset = offset0;
    for t in tokens {
        let (tok, _) = token_text(info, t.id);
        lp.text_offset.push(offset);
        offset += t.text.len();
        lp.tokens.push(tok);
        lp.token_logprobs.push(t.logprob.unwrap_or(0.0));
        lp.top_logprobs.push(
            t.top
                .iter()
                .map(|(id, l)| (token_text(info, *id).0, *l))
                .collect(),
        );
    }
    lp
}

pub async fn completions(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body, COMPLETION_FIELDS)?;
    let info = state.info()?;
    if req.suffix.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` other than 1 is not supported",
        ));
    }
    let (adapter, model_name) =
        resolve_adapter(&state, &info, req.model.as_deref(), req.adapter.as_deref())?;
    let prompts = prompts(req.prompt, &info)?;
    // Prompts are used as given; an aLoRA's invocation must be in each (found once here).
    let kind = PromptAdapter::of(adapter.as_deref().map(|a| a.invocation_tokens()));
    let prompts = prompts
        .into_iter()
        .enumerate()
        .map(|(i, (ids, text))| match prompt::ids_prompt(ids, kind) {
            Ok(p) => Ok((p, text)),
            Err(prompt::InvocationNotFound) => Err(ApiError::invalid(
                "prompt",
                format!(
                    "prompt {i} does not contain the invocation tokens {:?} of aLoRA adapter `{model_name}`",
                    adapter.as_deref().and_then(|a| a.invocation_tokens()).unwrap_or_default()
                ),
            )
            .with_code("invocation_not_found")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
            ))
        }
    };
    let gen = validate_sampling(&req.sampling, logprobs, info.config.vocab_size)?;
    let mut rxs = Vec::new();
    let mut echoes = Vec::new();
    for (p, text) in prompts {
        if state.config.log_prompts {
            tracing::info!(prompt = %text, "completion prompt");
        }
        let max_tokens = validate_lengths(
            "max_tokens",
            req.max_tokens,
            p.ids.len(),
            info.max_model_len,
        )?;
        let base = GenRequest {
            prompt: p.ids,
            activation_start: p.activation_start,
            adapter: adapter.clone(),
            sampling: gen.sampling.clone(),
            max_tokens,
            stop: gen.stop.clone(),
            stop_token_ids: gen.stop_token_ids.clone(),
            ignore_eos: gen.ignore_eos,
            cache_salt: req.cache_salt.clone(),
        };
        for _ in 0..gen.n {
            echoes.push(if req.echo {
                text.clone()
            } else {
                String::new()
            });
        }
        rxs.extend(submit_all(&state, base, gen.n)?);
    }
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_unix();
    let n = gen.n;

    if req.stream {
        let chunk = {
            let (id, model) = (id.clone(), model_name.clone());
            move |choices: Vec<CompletionChoice>, usage: Option<UsageOut>| {
                serde_json::to_string(&Completion {
                    id: id.clone(),
                    object: "text_completion",
                    created,
                    model: model.clone(),
                    choices,
                    usage,
                })
                .expect("chunk serializes")
            }
        };
        let first: Vec<String> = echoes
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.is_empty())
            .map(|(i, e)| {
                chunk(
                    vec![CompletionChoice {
                        index: i,
                        text: e.clone(),
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect();
        let with_usage = include_usage(&req.stream_options);
        let (c1, c2, info2) = (chunk.clone(), chunk, info.clone());
        let body = spawn_stream(
            rxs,
            state.config.request_timeout,
            move |i, ev| match ev {
                Event::Token(t) => {
                    if t.text.is_empty() && logprobs.is_none() {
                        return vec![];
                    }
                    let lp = logprobs.map(|_| logprobs_of(&info2, std::slice::from_ref(&t), 0));
                    vec![c1(
                        vec![CompletionChoice {
                            index: i,
                            text: t.text,
                            logprobs: lp,
                            finish_reason: None,
                        }],
                        None,
                    )]
                }
                Event::Done { text, finish, .. } => {
                    vec![c1(
                        vec![CompletionChoice {
                            index: i,
                            text,
                            logprobs: None,
                            finish_reason: Some(finish.as_str()),
                        }],
                        None,
                    )]
                }
                Event::Error(e) => vec![ApiError::from(e).body_json()],
            },
            move |usages| {
                if with_usage {
                    vec![c2(vec![], Some(usage_out(usages, n)))]
                } else {
                    vec![]
                }
            },
        );
        return Ok(sse(futures::stream::iter(first).chain(body)).into_response());
    }

    let results = collect_all(&state, rxs).await?;
    let mut choices = Vec::new();
    let mut usages = Vec::new();
    for (i, c) in results.into_iter().enumerate() {
        let echo = &echoes[i];
        let lp = logprobs.map(|_| logprobs_of(&info, &c.tokens, echo.len()));
        usages.push(c.usage);
        choices.push(CompletionChoice {
            index: i,
            text: format!("{echo}{}", c.text),
            logprobs: lp,
            finish_reason: Some(c.finish.as_str()),
        });
    }
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created,
        model: model_name,
        choices,
        usage: Some(usage_out(&usages, n)),
    })
    .into_response())
}
