//! The leniency policy for request bodies (README, "Request fields"), applied before a body is
//! deserialized:
//!
//! - `null` for an optional field means absent (at the top level, in messages, content parts
//!   and `stream_options`).
//! - A field alora does not know, at any of those levels, is accepted and ignored: counted in
//!   `alora:ignored_request_fields_total{field=...}` and logged at warn once per name.
//! - A field that would change the output and is not implemented is refused with a 400 naming
//!   it (`unsupported_parameter`), never silently ignored; its no-op values (`tools: []` on
//!   completions,
//!   `response_format: {"type": "text"}`, `tool_choice: "none"`, `min_tokens: 0`, ...) are
//!   accepted.
//! - `--reject-unknown-fields` restores the strict behaviour: every field outside the
//!   endpoint's implemented set is a 400.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::metrics::FieldLabel;

/// Distinct field names the metric and the warn-once log keep apart; past them, `other`
/// (client-chosen names must not grow the label set without bound).
const MAX_DISTINCT: usize = 128;
/// Longest field name kept in a label or log line.
const MAX_NAME: usize = 64;

/// Ignored fields: the counter family and the names already warned about.
#[derive(Default)]
pub struct IgnoredFields {
    pub counter: Family<FieldLabel, Counter>,
    seen: Mutex<HashSet<String>>,
}

impl IgnoredFields {
    fn record(&self, name: &str) {
        let mut name: String = name.chars().take(MAX_NAME).collect();
        {
            let mut seen = self.seen.lock().expect("ignored-fields lock");
            if !seen.contains(&name) {
                if seen.len() >= MAX_DISTINCT {
                    name = "other".into();
                } else {
                    tracing::warn!(field = %name, "ignoring a request field alora does not use");
                    seen.insert(name.clone());
                }
            }
        }
        self.counter
            .get_or_create(&FieldLabel { field: name.into() })
            .inc();
    }
}

/// How a request's fields are screened.
pub struct Policy<'a> {
    pub strict: bool,
    pub ignored: &'a IgnoredFields,
}

/// Why a field outside the implemented set is refused, if it is: it would change the output.
/// `None`: the value is a no-op (or the field does not change the output), so it is ignored.
fn refusal(key: &str, v: &Value) -> Option<String> {
    let is = |x: &str| v.as_str() == Some(x);
    let empty = || v.as_array().is_some_and(|a| a.is_empty());
    match key {
        "guided_json"
        | "guided_regex"
        | "guided_choice"
        | "guided_grammar"
        | "guided_json_object"
        | "guided_decoding_backend"
        | "guided_whitespace_pattern" => Some(format!(
            "`{key}` was removed from vLLM; use `structured_outputs` (`json`, `regex`, \
             `choice`, `grammar`) or `response_format`"
        )),
        "tools" | "functions" if empty() => None,
        "tools" => Some("`tools` are served on /v1/chat/completions".into()),
        "functions" => {
            Some("`functions` is OpenAI's deprecated form of `tools`; send `tools`".into())
        }
        "tool_choice" | "function_call" if is("none") || is("auto") => None,
        "tool_choice" => Some(format!(
            "`tool_choice` {v} needs `tools` on /v1/chat/completions"
        )),
        "function_call" => Some(format!(
            "`function_call` {v} is OpenAI's deprecated form of `tool_choice`; send `tool_choice`"
        )),
        "echo" | "use_beam_search" | "return_tokens_as_token_ids" if v == &Value::Bool(false) => {
            None
        }
        "spaces_between_special_tokens" if v == &Value::Bool(true) => None,
        "length_penalty" if v.as_f64() == Some(1.0) => None,
        "allowed_token_ids" | "bad_words" | "logits_processors" if empty() => None,
        "modalities" if v.as_array().is_some_and(|a| a.iter().all(|m| m == "text")) => None,
        "echo"
        | "use_beam_search"
        | "return_tokens_as_token_ids"
        | "spaces_between_special_tokens"
        | "length_penalty"
        | "allowed_token_ids"
        | "bad_words"
        | "logits_processors"
        | "modalities"
        | "audio"
        | "web_search_options"
        | "prompt_logprobs"
        | "truncate_prompt_tokens"
        | "chat_template"
        | "mm_processor_kwargs"
        | "vllm_xargs"
        | "priority_tokens" => Some(format!(
            "`{key}` would change the output and alora does not implement it"
        )),
        _ => None,
    }
}

fn unsupported(param: &str, message: String) -> ApiError {
    ApiError::invalid(param, message).with_code("unsupported_parameter")
}

impl Policy<'_> {
    /// Screens the object `obj` (named `at` in errors and metrics, "" at the top level):
    /// nulls dropped, unknown fields ignored or refused, by the rules above.
    fn screen(
        &self,
        obj: &mut Map<String, Value>,
        at: &str,
        known: &[&str],
    ) -> Result<(), ApiError> {
        obj.retain(|_, v| !v.is_null());
        let outside: Vec<String> = obj
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in outside {
            let name = format!("{at}{k}");
            if let Some(why) = refusal(&k, &obj[&k]) {
                return Err(unsupported(&name, why));
            }
            if self.strict {
                return Err(unsupported(
                    &name,
                    format!("Unsupported parameter `{name}`: alora does not implement it"),
                ));
            }
            obj.remove(&k);
            self.ignored.record(&name);
        }
        Ok(())
    }

    /// Screens a request body: the top level against `known`, then messages, their content
    /// parts and `stream_options` against theirs.
    pub fn apply(&self, body: &mut Value, known: &[&str]) -> Result<(), ApiError> {
        let Some(obj) = body.as_object_mut() else {
            return Ok(()); // the parser refuses non-objects
        };
        self.screen(obj, "", known)?;
        if let Some(Value::Object(so)) = obj.get_mut("stream_options") {
            self.screen(so, "stream_options.", STREAM_OPTIONS_FIELDS)?;
        }
        if let Some(Value::Array(msgs)) = obj.get_mut("messages") {
            for m in msgs.iter_mut() {
                let Value::Object(m) = m else { continue };
                self.screen(m, "messages[].", MESSAGE_FIELDS)?;
                if let Some(Value::Array(parts)) = m.get_mut("content") {
                    for p in parts.iter_mut() {
                        if let Value::Object(p) = p {
                            self.screen(p, "messages[].content[].", CONTENT_PART_FIELDS)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Fields of a chat message alora reads.
pub const MESSAGE_FIELDS: &[&str] = &["role", "content", "name", "tool_calls", "tool_call_id"];
/// Fields of a content part alora reads (any part type is parsed; only text is served).
pub const CONTENT_PART_FIELDS: &[&str] = &["type", "text", "image_url", "input_audio", "file"];
/// Fields of `stream_options` alora reads.
pub const STREAM_OPTIONS_FIELDS: &[&str] = &["include_usage", "continuous_usage_stats"];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(strict: bool, mut body: Value) -> (Result<(), ApiError>, Value, IgnoredFields) {
        let ignored = IgnoredFields::default();
        let r = Policy {
            strict,
            ignored: &ignored,
        }
        .apply(
            &mut body,
            &["messages", "stream", "stream_options", "max_tokens"],
        );
        (r, body, ignored)
    }

    #[test]
    fn nulls_are_absent_and_unknown_fields_ignored_and_counted() {
        let (r, body, ignored) = run(
            false,
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}], "weight": 1}],
                   "stream": null, "store": true, "metadata": {"a": 1}, "tools": null,
                   "tools_extra": null, "response_format": {"type": "text"}, "tool_choice": "none",
                   "stream_options": {"include_usage": true, "other": 1}}),
        );
        assert!(r.is_ok());
        assert_eq!(
            body,
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                   "stream_options": {"include_usage": true}})
        );
        let seen = ignored.seen.lock().unwrap().clone();
        let want: HashSet<String> = [
            "store",
            "metadata",
            "response_format",
            "tool_choice",
            "messages[].weight",
            "messages[].content[].cache_control",
            "stream_options.other",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn output_changing_fields_are_refused_by_name() {
        for (body, param) in [
            (json!({"guided_regex": "a+"}), "guided_regex"),
            (json!({"guided_json": {}}), "guided_json"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
        ] {
            let (r, _, _) = run(false, body.clone());
            let e = r.unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert_eq!(e.code, Some("unsupported_parameter"), "{body}");
        }
    }

    #[test]
    fn strict_mode_refuses_every_unknown_field_and_the_label_set_is_bounded() {
        let (r, _, _) = run(true, json!({"store": true}));
        assert_eq!(r.unwrap_err().param.as_deref(), Some("store"));
        let (r, _, _) = run(true, json!({"store": null}));
        assert!(r.is_ok(), "null is absent in strict mode too");
        let ignored = IgnoredFields::default();
        for i in 0..(MAX_DISTINCT + 10) {
            ignored.record(&format!("f{i}"));
        }
        assert_eq!(ignored.seen.lock().unwrap().len(), MAX_DISTINCT);
        let other = ignored.counter.get_or_create(&FieldLabel {
            field: "other".to_string().into(),
        });
        assert_eq!(other.get(), 10);
    }
}
