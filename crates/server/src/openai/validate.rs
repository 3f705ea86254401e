//! Wire request -> validated request. Everything a handler checks happens here, once: the body's
//! fields, the model or adapter it names, the prompt's ids with their activation start and cache
//! key (found once by `alora_model::text::prompt`, never searched for again), sampling and length
//! limits. A handler gets a [`Validated`] or the OpenAI error naming the field.

use std::collections::HashMap;
use std::sync::Arc;

use alora_cache::{AdapterKey, RequestKey};
use alora_model::text::prompt::{self, PromptAdapter};
use alora_model::{ChatMessage, LoraAdapter, SamplingParams};
use axum::body::Bytes;
use serde::de::DeserializeOwned;

pub use super::types::HasSampling;

use super::types::*;
use crate::engine::{GenRequest, ModelInfo};
use crate::error::ApiError;
use crate::state::AppState;
use alora_model::grammar::{Constraint, GrammarSpec};
use alora_model::tools::{CallMode, ToolFormat};

pub const MAX_N: i64 = 16;
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most stop strings per request.
pub const MAX_STOP: usize = 16;
/// Most bytes of all stop strings together. Matching is linear in the generated text (KMP per
/// stop string), but each stop string's state lives on the engine thread for every token, so
/// one request's stop list stays small beside everyone else's step.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most `logit_bias` entries (each is applied to every token's logits).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most `stop_token_ids` (each sampled token is checked against them).
pub const MAX_STOP_TOKEN_IDS: usize = 256;
/// Most prompts in one completion request.
pub const MAX_PROMPTS: usize = 64;

/// A request ready for the engine: one [`GenRequest`] per prompt, each submitted `n` times.
pub struct Validated {
    /// The name responses carry: the adapter's, or the served model's.
    pub model_name: String,
    pub prompts: Vec<ValidPrompt>,
    /// The request field the prompts came from (`messages` or `prompt`), for errors.
    pub prompt_field: &'static str,
    /// Choices per prompt.
    pub n: usize,
    /// Top log-probabilities per token, when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// How the output is read for tool calls (chat with tools, `tool_choice` not `none`), and
    /// `parallel_tool_calls`.
    pub tools: Option<(CallMode, bool)>,
}

pub struct ValidPrompt {
    pub request: GenRequest,
    /// Text echoed before the completion (`/v1/completions` with `echo`); empty otherwise.
    pub echo: String,
}

/// Parses a JSON body with the fields `allowed`; others are screened by the leniency policy
/// (`openai::fields`: ignored, or refused by name).
pub fn parse_body<T: DeserializeOwned>(
    state: &AppState,
    body: &Bytes,
    allowed: &[&str],
) -> Result<T, ApiError> {
    from_value(&parse_object(state, body, allowed)?)
}

/// [`parse_body`] for a generation request: its sampling fields are read from the same object
/// on their own, so an error names the field (serde loses the path inside `flatten`).
pub fn parse_generation_body<T: DeserializeOwned + HasSampling>(
    state: &AppState,
    body: &Bytes,
    allowed: &[&str],
) -> Result<T, ApiError> {
    let v = parse_object(state, body, allowed)?;
    let mut req: T = from_value(&v)?;
    *req.sampling_mut() = from_value(&v)?;
    Ok(req)
}

fn parse_object(
    state: &AppState,
    body: &Bytes,
    allowed: &[&str],
) -> Result<serde_json::Value, ApiError> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Malformed JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    }
    super::fields::Policy {
        strict: state.config.reject_unknown_fields,
        ignored: &state.engine.shared().metrics.ignored_fields,
    }
    .apply(&mut v, allowed)?;
    Ok(v)
}

/// Deserializes `v`, naming the offending field in the error: the path serde reports, or the
/// field a "missing field" error names.
fn from_value<T: DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next());
        let param = match (path.as_str(), missing) {
            ("." | "", Some(field)) => field.to_string(),
            ("." | "", None) => "body".to_string(),
            (p, Some(field)) => format!("{p}.{field}"),
            (p, None) => p.to_string(),
        };
        ApiError::invalid(&param, format!("Invalid `{param}`: {inner}"))
    })
}

/// The base model (None) or an adapter, from `adapter`, else from `model`.
pub fn resolve_adapter(
    state: &AppState,
    info: &ModelInfo,
    model: Option<&str>,
    adapter: Option<&str>,
) -> Result<(Option<Arc<LoraAdapter>>, String), ApiError> {
    if let Some(name) = adapter {
        let a = state
            .registry
            .get(name)
            .ok_or_else(|| ApiError::model_not_found("adapter", name))?;
        return Ok((Some(a), name.to_string()));
    }
    match model {
        None | Some("") => Ok((None, state.served_name(info))),
        // The served name only: after `--served-model-name` the file name is no model id.
        Some(m) if m == state.served_name(info) => Ok((None, m.to_string())),
        Some(m) => match state.registry.get(m) {
            Some(a) => Ok((Some(a), m.to_string())),
            None => Err(ApiError::model_not_found("model", m)),
        },
    }
}

/// Parses `body` and validates it with `validate` (`chat` or `completion`) on the blocking
/// pool ([`AppState::prepare`]), never on an async worker; returns the model info it used.
pub async fn prepare<R, F>(
    state: &AppState,
    body: Bytes,
    fields: &'static [&'static str],
    validate: F,
) -> Result<(Validated, Arc<ModelInfo>), ApiError>
where
    R: DeserializeOwned + HasSampling,
    F: FnOnce(&AppState, &ModelInfo, R) -> Result<Validated, ApiError> + Send + 'static,
{
    let st = state.clone();
    state
        .prepare(move || {
            let req: R = parse_generation_body(&st, &body, fields)?;
            let info = st.info()?;
            Ok((validate(&st, &info, req)?, info))
        })
        .await
}

/// `POST /v1/chat/completions`.
pub fn chat(
    state: &AppState,
    info: &ModelInfo,
    req: ChatCompletionRequest,
) -> Result<Validated, ApiError> {
    let kwargs = req.chat_template_kwargs.unwrap_or_default();
    // IBM's libraries name the adapter in the template kwargs; like `adapter` otherwise.
    let adapter_name = match kwargs.get("adapter_name") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs.adapter_name",
                "`chat_template_kwargs.adapter_name` must be a string",
            ))
        }
    };
    if let (Some(a), Some(b)) = (req.adapter.as_deref(), adapter_name) {
        if a != b {
            return Err(ApiError::invalid(
                "chat_template_kwargs.adapter_name",
                format!("`adapter` is `{a}` but `chat_template_kwargs.adapter_name` is `{b}`"),
            ));
        }
    }
    let (adapter, model_name) = match adapter_name {
        Some(name) if req.adapter.is_none() => {
            resolve_adapter(state, info, req.model.as_deref(), Some(name)).map_err(|e| {
                ApiError {
                    param: Some("chat_template_kwargs.adapter_name".into()),
                    ..e
                }
            })?
        }
        _ => resolve_adapter(state, info, req.model.as_deref(), req.adapter.as_deref())?,
    };
    let messages = messages(req.messages)?;
    let format = state
        .config
        .tool_call_parser
        .or(info.template.tool_format)
        .unwrap_or(ToolFormat::Hermes);
    let tools =
        super::tools::tool_use(req.tools, req.tool_choice, req.parallel_tool_calls, format)?;
    let opts = prompt::ChatOptions {
        add_generation_prompt: req.add_generation_prompt,
        continue_final_message: req.continue_final_message.unwrap_or(false),
        documents: req.documents.map(serde_json::Value::Array),
        tools: tools.as_ref().map(|t| t.definitions.clone()),
        kwargs,
    };
    // The one prompt rule (alora_model::text::prompt): template, invocation, activation start.
    let kind = PromptAdapter::of(adapter.as_deref().map(|a| a.invocation_tokens()));
    let (text, prompt) =
        prompt::chat_prompt_with(&info.template, &info.tokenizer, &messages, kind, &opts).map_err(
            |e| match e {
                e @ alora_model::ModelError::Template(_) => {
                    let param = if opts.continue_final_message {
                        "continue_final_message"
                    } else {
                        "messages"
                    };
                    ApiError::invalid(param, e.to_string())
                }
                e => ApiError::internal(e.to_string()),
            },
        )?;
    if state.config.log_prompts {
        tracing::info!(prompt = %text, "chat prompt");
    }
    // A base or LoRA reply that the client may send back: the engine can compute the
    // template's turn end ahead when it finishes. Not for an aLoRA (an intrinsic's answer is
    // not continued) nor with tools (a call comes back as `tool_calls`, rendered otherwise).
    let turn_end = match (kind, &tools) {
        (PromptAdapter::Base | PromptAdapter::Lora, None) if state.config.close_turns => {
            prompt::turn_end(&info.template, &info.tokenizer, &messages, &opts, &text).map(Arc::new)
        }
        _ => None,
    };
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ))
        }
        (false, None) => None,
        (true, k) => Some(top_logprobs("top_logprobs", k.unwrap_or(0))?),
    };
    let mut gen = sampling(&req.sampling, logprobs, info.config.vocab_size)?;
    let spec = structured_spec(req.response_format, req.structured_outputs)?;
    // A forced call is generated under its own grammar.
    let forced = tools.as_ref().and_then(|t| t.grammar.clone());
    let spec = match (forced, spec) {
        (Some(_), Some((_, param))) => {
            return Err(ApiError::invalid(
                param,
                format!("`{param}` cannot be combined with a `tool_choice` that forces a call"),
            ))
        }
        (Some(g), None) => Some((g, "tool_choice")),
        (None, spec) => spec,
    };
    gen.constraint = compile(info, spec, &gen)?;
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let limit = req.max_completion_tokens.or(req.max_tokens);
    let max_tokens = lengths(
        ("messages", prompt.ids.len()),
        (param, limit),
        info.max_model_len,
        1,
    )?;
    gen.check_min_tokens(max_tokens, param)?;
    let mut request = gen.request(prompt, adapter, max_tokens, req.cache_salt);
    request.turn_end = turn_end;
    Ok(Validated {
        model_name,
        prompts: vec![ValidPrompt {
            request,
            echo: String::new(),
        }],
        prompt_field: "messages",
        n: gen.n,
        logprobs,
        stream: req.stream,
        include_usage: include_usage(&req.stream_options),
        tools: tools.and_then(|t| t.mode.map(|m| (m, t.parallel))),
    })
}

/// `POST /v1/completions`: prompts are used as given; an aLoRA's invocation must be in each.
pub fn completion(
    state: &AppState,
    info: &ModelInfo,
    req: CompletionRequest,
) -> Result<Validated, ApiError> {
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
        resolve_adapter(state, info, req.model.as_deref(), req.adapter.as_deref())?;
    let texts = prompts(req.prompt, info)?;
    if texts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "`prompt` may hold at most {MAX_PROMPTS} prompts, got {}",
                texts.len()
            ),
        ));
    }
    let logprobs = req
        .logprobs
        .map(|k| top_logprobs("logprobs", k))
        .transpose()?;
    let mut gen = sampling(&req.sampling, logprobs, info.config.vocab_size)?;
    gen.constraint = compile(
        info,
        structured_spec(req.response_format, req.structured_outputs)?,
        &gen,
    )?;
    let kind = PromptAdapter::of(adapter.as_deref().map(|a| a.invocation_tokens()));
    let mut prompts = Vec::with_capacity(texts.len());
    for (i, (ids, text)) in texts.into_iter().enumerate() {
        let p = prompt::ids_prompt(ids, kind).map_err(|prompt::InvocationNotFound| {
            let inv = adapter.as_deref().and_then(|a| a.invocation_tokens());
            ApiError::invalid(
                "prompt",
                format!(
                    "prompt {i} does not contain the invocation tokens {:?} of aLoRA adapter \
                     `{model_name}`",
                    inv.unwrap_or_default()
                ),
            )
            .with_code("invocation_not_found")
        })?;
        if state.config.log_prompts {
            tracing::info!(prompt = %text, "completion prompt");
        }
        let max_tokens = lengths(
            ("prompt", p.ids.len()),
            ("max_tokens", req.max_tokens),
            info.max_model_len,
            if req.echo { 0 } else { 1 },
        )?;
        gen.check_min_tokens(max_tokens, "max_tokens")?;
        let mut request = gen.request(p, adapter.clone(), max_tokens, req.cache_salt.clone());
        // `echo` with `logprobs`: the prompt tokens are scored too (the first has none).
        request.prompt_logprobs = logprobs.filter(|_| req.echo);
        let echo = if req.echo { text } else { String::new() };
        prompts.push(ValidPrompt { request, echo });
    }
    Ok(Validated {
        model_name,
        prompts,
        prompt_field: "prompt",
        n: gen.n,
        logprobs,
        stream: req.stream,
        include_usage: include_usage(&req.stream_options),
        tools: None,
    })
}

/// The cache key of a prompt: which adapter computes which positions, and the salt.
fn cache_key(
    adapter: Option<&LoraAdapter>,
    activation_start: Option<usize>,
    cache_salt: Option<String>,
) -> RequestKey {
    let adapter = match (adapter, activation_start) {
        (Some(a), Some(s)) if a.invocation_tokens().is_some() => AdapterKey::ALora {
            digest: a.digest,
            activation_start: s,
        },
        (Some(a), Some(_)) => AdapterKey::Lora(a.digest),
        // No adapter, or an aLoRA that does not switch on: base-model KV.
        _ => AdapterKey::Base,
    };
    RequestKey {
        adapter,
        cache_salt,
    }
}

/// Chat messages as text, checked (roles, text-only content).
pub fn messages(msgs: Option<Vec<ChatMessageIn>>) -> Result<Vec<ChatMessage>, ApiError> {
    let msgs = msgs
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a non-empty list"))?;
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => s.push_str(&t),
                            (k, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!(
                                        "only text content is supported (content part type `{k}`)"
                                    ),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            if m.role.is_empty() {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    "`role` must not be empty",
                ));
            }
            let tool_calls = match m.tool_calls {
                Some(calls) => super::tools::conversation_calls(i, calls)?,
                None => None,
            };
            Ok(ChatMessage {
                role: m.role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id,
                name: m.name,
            })
        })
        .collect()
}

/// The prompts of a completion request as (ids, text).
fn prompts(p: Option<Prompt>, info: &ModelInfo) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let vocab = info.config.vocab_size;
    let ids = |v: Vec<i64>| -> Result<(Vec<u32>, String), ApiError> {
        if let Some(bad) = v.iter().find(|t| **t < 0 || **t as usize >= vocab) {
            return Err(ApiError::invalid(
                "prompt",
                format!("token id {bad} is not in [0, {vocab})"),
            ));
        }
        let ids: Vec<u32> = v.into_iter().map(|t| t as u32).collect();
        let text = info.tokenizer.decode(&ids, false).unwrap_or_default();
        Ok((ids, text))
    };
    let text = |s: String| -> Result<(Vec<u32>, String), ApiError> {
        let ids = info
            .tokenizer
            .encode(&s)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok((ids, s))
    };
    let out = match p.ok_or_else(|| ApiError::invalid("prompt", "`prompt` is required"))? {
        Prompt::Text(s) => vec![text(s)?],
        Prompt::Texts(v) => v.into_iter().map(text).collect::<Result<_, _>>()?,
        Prompt::Ids(v) => vec![ids(v)?],
        Prompt::IdLists(v) => v.into_iter().map(ids).collect::<Result<_, _>>()?,
    };
    if out.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    Ok(out)
}

fn top_logprobs(param: &str, k: i64) -> Result<usize, ApiError> {
    if (0..=MAX_TOP_LOGPROBS).contains(&k) {
        Ok(k as usize)
    } else {
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
        ))
    }
}

fn include_usage(o: &Option<StreamOptions>) -> bool {
    o.as_ref().is_some_and(|o| o.include_usage)
}

/// A structured output from `response_format` (OpenAI) or `structured_outputs` (vLLM), with
/// the field it came from: `None` for free text. Errors name the field at fault.
fn structured_spec(
    response_format: Option<serde_json::Value>,
    structured_outputs: Option<serde_json::Value>,
) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    Ok(match (response_format, structured_outputs) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "structured_outputs",
                "give `response_format` or `structured_outputs`, not both",
            ))
        }
        (Some(rf), None) => response_format_spec(&rf)?,
        (None, Some(so)) => Some((structured_outputs_spec(&so)?, "structured_outputs")),
        (None, None) => None,
    })
}

/// The structured output `spec` compiled for the model (`None`: free text); errors name
/// `spec`'s field.
fn compile(
    info: &ModelInfo,
    spec: Option<(GrammarSpec, &'static str)>,
    gen: &Generation,
) -> Result<Option<Constraint>, ApiError> {
    let Some((spec, param)) = spec else {
        return Ok(None);
    };
    // A stop string or id could end the output short of the grammar: refuse the pair rather
    // than return a `stop` output that does not parse.
    if !gen.stop.is_empty() || !gen.stop_token_ids.is_empty() {
        let which = if gen.stop.is_empty() {
            "stop_token_ids"
        } else {
            "stop"
        };
        return Err(ApiError::invalid(
            which,
            format!(
                "`{which}` cannot be combined with structured outputs (it could cut the output \
                 short of its grammar)"
            ),
        ));
    }
    let grammars = info.grammars().map_err(ApiError::internal)?;
    let c = grammars
        .compile(&spec)
        .map_err(|e| ApiError::invalid(param, format!("invalid structured output: {e}")))?;
    Ok(Some(c))
}

/// OpenAI's `response_format`: `None` for `text`.
fn response_format_spec(
    rf: &serde_json::Value,
) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    Ok(match rf["type"].as_str() {
        Some("text") => None,
        Some("json_object") => Some((GrammarSpec::JsonObject, "response_format")),
        Some("json_schema") => {
            let schema = &rf["json_schema"]["schema"];
            if !schema.is_object() && !schema.is_boolean() {
                return Err(ApiError::invalid(
                    "response_format.json_schema.schema",
                    "`response_format.json_schema.schema` must be a JSON schema",
                ));
            }
            Some((
                GrammarSpec::JsonSchema(schema.clone()),
                "response_format.json_schema.schema",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "response_format.type",
                "`response_format.type` must be `text`, `json_object` or `json_schema`",
            ))
        }
    })
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar`,
/// `json_object` (its backend options are accepted and left to llguidance's defaults).
fn structured_outputs_spec(so: &serde_json::Value) -> Result<GrammarSpec, ApiError> {
    use serde_json::Value;
    const OPTIONS: &[&str] = &[
        "disable_fallback",
        "disable_any_whitespace",
        "disable_additional_properties",
        "whitespace_pattern",
    ];
    let Value::Object(so) = so else {
        return Err(ApiError::invalid(
            "structured_outputs",
            "`structured_outputs` must be an object",
        ));
    };
    let set: Vec<(&String, &Value)> = so
        .iter()
        .filter(|(k, v)| {
            !v.is_null() && **v != Value::Bool(false) && !OPTIONS.contains(&k.as_str())
        })
        .collect();
    let [(k, v)] = set.as_slice() else {
        return Err(ApiError::invalid(
            "structured_outputs",
            "`structured_outputs` needs exactly one of `json`, `regex`, `choice`, `grammar`, \
             `json_object`",
        ));
    };
    let param = format!("structured_outputs.{k}");
    let bad = |what: &str| ApiError::invalid(&param, format!("`{param}` must be {what}"));
    Ok(match (k.as_str(), v) {
        ("json", Value::String(s)) => {
            GrammarSpec::JsonSchema(serde_json::from_str(s).map_err(|_| bad("a JSON schema"))?)
        }
        ("json", v) if v.is_object() || v.is_boolean() => GrammarSpec::JsonSchema((*v).clone()),
        ("json", _) => return Err(bad("a JSON schema")),
        ("json_object", Value::Bool(true)) => GrammarSpec::JsonObject,
        ("regex", Value::String(r)) => GrammarSpec::Regex(r.clone()),
        ("regex", _) => return Err(bad("a string")),
        ("choice", Value::Array(c)) => GrammarSpec::Choice(
            c.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| bad("a non-empty list of strings"))?,
        ),
        ("choice", _) => return Err(bad("a non-empty list of strings")),
        ("grammar", Value::String(g)) => GrammarSpec::Lark(g.clone()),
        ("grammar", _) => return Err(bad("a Lark grammar string")),
        _ => {
            return Err(
                ApiError::invalid(&param, format!("`{param}` is not supported"))
                    .with_code("unsupported_parameter"),
            )
        }
    })
}

/// Everything but the prompt of an engine request, validated.
struct Generation {
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    n: usize,
    ignore_eos: bool,
    min_tokens: usize,
    keep_special_tokens: bool,
    include_stop_str: bool,
    /// The compiled structured output, copied into each choice.
    constraint: Option<Constraint>,
}

impl Generation {
    /// `min_tokens` against the output limit the request ends up with (`param`, or the rest
    /// of the context when the client set none).
    fn check_min_tokens(&self, max_tokens: usize, param: &str) -> Result<(), ApiError> {
        if self.min_tokens <= max_tokens {
            return Ok(());
        }
        Err(ApiError::invalid(
            "min_tokens",
            format!(
                "`min_tokens` must be <= `{param}` ({max_tokens}, or what the context leaves), got {}",
                self.min_tokens
            ),
        ))
    }

    fn request(
        &self,
        prompt: prompt::Prompt,
        adapter: Option<Arc<LoraAdapter>>,
        max_tokens: usize,
        cache_salt: Option<String>,
    ) -> GenRequest {
        let cache_key = cache_key(adapter.as_deref(), prompt.activation_start, cache_salt);
        GenRequest {
            prompt: prompt.ids,
            activation_start: prompt.activation_start,
            adapter,
            cache_key,
            sampling: self.sampling.clone(),
            prompt_logprobs: None,
            max_tokens,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
            keep_special_tokens: self.keep_special_tokens,
            include_stop_str: self.include_stop_str,
            constraint: self.constraint.clone(),
            turn_end: None,
        }
    }
}

fn range(param: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be in [{lo}, {hi}], got {v}"),
        ))
    }
}

fn sampling(s: &Sampling, logprobs: Option<usize>, vocab: usize) -> Result<Generation, ApiError> {
    let temperature = range("temperature", s.temperature.unwrap_or(1.0), 0.0, 2.0)?;
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match s.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let min_p = range("min_p", s.min_p.unwrap_or(0.0), 0.0, 1.0)?;
    let presence_penalty = range(
        "presence_penalty",
        s.presence_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
    )?;
    let frequency_penalty = range(
        "frequency_penalty",
        s.frequency_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
    )?;
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be in (0, 10], got {repetition_penalty}"),
        ));
    }
    let mut logit_bias = HashMap::new();
    let bias = s.logit_bias.clone().unwrap_or_default();
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "`logit_bias` may hold at most {MAX_LOGIT_BIAS} entries, got {}",
                bias.len()
            ),
        ));
    }
    for (k, v) in bias {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` key `{k}` is not a token id"),
            )
        })?;
        if id as usize >= vocab {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` token {id} is not below the vocabulary size {vocab}"),
            ));
        }
        logit_bias.insert(id, range("logit_bias", v, -100.0, 100.0)?);
    }
    let n = s.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be in [1, {MAX_N}], got {n}"),
        ));
    }
    let seed = match s.seed {
        Some(x) if x < 0 => {
            return Err(ApiError::invalid(
                "seed",
                format!("`seed` must be >= 0, got {x}"),
            ))
        }
        x => x.map(|x| x as u64),
    };
    let min_tokens = match s.min_tokens.unwrap_or(0) {
        m if m < 0 => {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("`min_tokens` must be >= 0, got {m}"),
            ))
        }
        m => m as usize,
    };
    let stop = s.stop.clone().map(|x| x.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` may hold at most {MAX_STOP} strings, got {}",
                stop.len()
            ),
        ));
    }
    let stop_bytes: usize = stop.iter().map(|x| x.len()).sum();
    if stop_bytes > MAX_STOP_BYTES {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` strings may hold at most {MAX_STOP_BYTES} bytes in all, got {stop_bytes}"
            ),
        ));
    }
    let stop_token_ids = s.stop_token_ids.clone().unwrap_or_default();
    if stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!(
                "`stop_token_ids` may hold at most {MAX_STOP_TOKEN_IDS} ids, got {}",
                stop_token_ids.len()
            ),
        ));
    }
    if let Some(t) = stop_token_ids.iter().find(|t| **t as usize >= vocab) {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!("token {t} is not below the vocabulary size {vocab}"),
        ));
    }
    Ok(Generation {
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            logprobs,
        },
        stop,
        stop_token_ids,
        n: n as usize,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        min_tokens,
        keep_special_tokens: !s.skip_special_tokens.unwrap_or(true),
        include_stop_str: s.include_stop_str_in_output.unwrap_or(false),
        constraint: None,
    })
}

/// The output limit against the context: prompt + limit must fit in `max_model_len`.
/// `prompt` and `limit` are (field name, value), so errors name the field the client sent.
/// `min_tokens`: the least `max_tokens` allowed (0 for a completion with `echo`).
fn lengths(
    (prompt_param, prompt_len): (&str, usize),
    (param, max_tokens): (&str, Option<i64>),
    max_model_len: usize,
    min_tokens: i64,
) -> Result<usize, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid(prompt_param, "The prompt is empty"));
    }
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid(
            prompt_param,
            format!(
                "The prompt has {prompt_len} tokens; the maximum context length is {max_model_len}"
            ),
        )
        .with_code("context_length_exceeded"));
    }
    match max_tokens {
        None => Ok(max_model_len - prompt_len),
        Some(m) if m < min_tokens => Err(ApiError::invalid(
            param,
            match min_tokens {
                0 => format!("`{param}` must be >= 0, got {m}"),
                _ => format!("`{param}` must be >= 1 (0 only with `echo` on /v1/completions), got {m}"),
            },
        )),
        Some(m) if prompt_len + m as usize > max_model_len => Err(ApiError::invalid(
            param,
            format!(
                "`{param}` must be <= {} (prompt {prompt_len} + {param} must not exceed the context length {max_model_len}), got {m}",
                max_model_len - prompt_len
            ),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_the_client_sent() {
        let e = lengths(("prompt", 10), ("max_tokens", None), 10, 1).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = lengths(("messages", 4), ("max_completion_tokens", Some(7)), 10, 1).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        assert_eq!(
            lengths(("prompt", 4), ("max_tokens", None), 10, 1).unwrap(),
            6
        );
        assert_eq!(
            lengths(("prompt", 4), ("max_tokens", Some(6)), 10, 1).unwrap(),
            6
        );
        let e = lengths(("prompt", 4), ("max_tokens", Some(0)), 10, 1).unwrap_err();
        assert!(e.message.contains("only with `echo`"), "{}", e.message);
        assert_eq!(
            lengths(("prompt", 4), ("max_tokens", Some(0)), 10, 0).unwrap(),
            0
        );
    }
}
