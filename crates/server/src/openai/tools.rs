//! Tool calling on `/v1/chat/completions`: the request's `tools`, `tool_choice` and
//! `parallel_tool_calls` checked and turned into what the template renders and how the output
//! is read (`alora_model::tools`); a conversation's `tool_calls` made ready for the template;
//! the ids calls carry in responses.
//!
//! - `tool_choice` absent is `auto` with tools and `none` without, as in OpenAI's API.
//! - `none`: tools are rendered, the output is plain content.
//! - `auto`: the model writes calls in its own format, read by the server's tool-call parser.
//! - `required` / a named function: the output is constrained (structured outputs) to a JSON
//!   array of calls / the function's arguments, as vLLM does; such a request cannot also carry
//!   `response_format` or `structured_outputs`.

use alora_model::grammar::GrammarSpec;
use alora_model::tools::{required_schema, CallMode, Tool, ToolFormat};
use serde_json::{json, Value};

use crate::error::ApiError;

/// The tools part of a validated chat request.
#[derive(Debug, Clone)]
pub struct ToolUse {
    /// The definitions as the template gets them (the client's objects, unchanged).
    pub definitions: Value,
    /// How the output is read; `None` for `tool_choice: "none"`.
    pub mode: Option<CallMode>,
    pub parallel: bool,
    /// The grammar a forced call is generated under.
    pub grammar: Option<GrammarSpec>,
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`; `None` when the request offers
/// no tools. `format` is how this server reads free-text calls.
pub fn tool_use(
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel: Option<bool>,
    format: ToolFormat,
) -> Result<Option<ToolUse>, ApiError> {
    let defs = tools.unwrap_or_default();
    let mut parsed = Vec::with_capacity(defs.len());
    for (i, d) in defs.iter().enumerate() {
        let t = definition(i, d)?;
        if parsed.iter().any(|p: &Tool| p.name == t.name) {
            return Err(ApiError::invalid(
                &format!("tools[{i}].function.name"),
                format!("two tools are named `{}`", t.name),
            ));
        }
        parsed.push(t);
    }
    let parallel = parallel.unwrap_or(true);
    let choice =
        tool_choice.unwrap_or_else(|| json!(if parsed.is_empty() { "none" } else { "auto" }));
    let bad_choice = || {
        ApiError::invalid(
            "tool_choice",
            "`tool_choice` must be `none`, `auto`, `required` or {\"type\": \"function\", \
             \"function\": {\"name\": ...}}",
        )
    };
    let named = |name: &str| -> Result<&Tool, ApiError> {
        parsed.iter().find(|t| t.name == name).ok_or_else(|| {
            ApiError::invalid(
                "tool_choice",
                format!("`tool_choice` names `{name}`, which is not in `tools`"),
            )
        })
    };
    let (mode, grammar) = match &choice {
        Value::String(s) => match s.as_str() {
            "none" => (None, None),
            "auto" => (Some(CallMode::Free(format)), None),
            "required" => (
                Some(CallMode::Array),
                Some(GrammarSpec::JsonSchema(required_schema(&parsed, parallel))),
            ),
            _ => return Err(bad_choice()),
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            // Chat Completions nests the name in `function`; the Responses API puts it beside
            // `type`.
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(bad_choice)?;
            let t = named(name)?;
            (
                Some(CallMode::Named(t.name.clone())),
                Some(GrammarSpec::JsonSchema(t.parameters.clone())),
            )
        }
        _ => return Err(bad_choice()),
    };
    if parsed.is_empty() {
        return match mode {
            None | Some(CallMode::Free(_)) => Ok(None),
            Some(_) => Err(ApiError::invalid(
                "tool_choice",
                format!("`tool_choice` {choice} needs `tools`"),
            )),
        };
    }
    Ok(Some(ToolUse {
        definitions: Value::Array(defs),
        mode,
        parallel,
        grammar,
    }))
}

/// One `tools[i]`: a function with a name and (optionally) a JSON schema for its arguments,
/// which a forced call is generated under.
fn definition(i: usize, d: &Value) -> Result<Tool, ApiError> {
    let at = |f: &str| format!("tools[{i}]{f}");
    match d.get("type").and_then(Value::as_str) {
        Some("function") | None => {}
        Some(t) => {
            return Err(ApiError::invalid(
                &at(".type"),
                format!("only `function` tools are supported, not `{t}`"),
            )
            .with_code("unsupported_parameter"))
        }
    }
    let f = d
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| ApiError::invalid(&at(".function"), "a tool needs a `function` object"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::invalid(&at(".function.name"), "a function needs a `name`"))?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => {
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        }
        Some(Value::Object(p)) => {
            // A forced call's arguments are the declared parameters only (as `strict` asks):
            // a function given keys it does not take fails. A schema that says otherwise keeps
            // its word.
            let mut p = p.clone();
            if p.contains_key("properties") {
                p.entry("additionalProperties").or_insert(false.into());
            }
            Value::Object(p)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                &at(".function.parameters"),
                "`parameters` must be a JSON schema object",
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        parameters,
    })
}

/// An assistant message's `tool_calls` as the template gets them: each call's
/// `function.arguments` JSON string parsed into an object, as vLLM does before rendering.
pub fn conversation_calls(i: usize, calls: Value) -> Result<Option<Vec<Value>>, ApiError> {
    let Value::Array(calls) = calls else {
        return Err(ApiError::invalid(
            &format!("messages[{i}].tool_calls"),
            "`tool_calls` must be a list",
        ));
    };
    if calls.is_empty() {
        return Ok(None);
    }
    calls
        .into_iter()
        .enumerate()
        .map(|(j, mut c)| {
            let at = format!("messages[{i}].tool_calls[{j}].function");
            let f = c
                .get_mut("function")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| ApiError::invalid(&at, "a tool call needs a `function` object"))?;
            if !f.get("name").is_some_and(Value::is_string) {
                return Err(ApiError::invalid(
                    &format!("{at}.name"),
                    "a tool call needs a function `name`",
                ));
            }
            let args = match f.remove("arguments") {
                None | Some(Value::Null) => json!({}),
                Some(Value::String(s)) if s.trim().is_empty() => json!({}),
                Some(Value::String(s)) => serde_json::from_str(&s).map_err(|e| {
                    ApiError::invalid(
                        &format!("{at}.arguments"),
                        format!("`arguments` must be a JSON text: {e}"),
                    )
                })?,
                Some(v) => v,
            };
            f.insert("arguments".into(), args);
            Ok(c)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A tool call's id, OpenAI style (`call_` and 24 alphanumerics).
pub fn call_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &u[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "strict": true,
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    fn param_of(r: Result<Option<ToolUse>, ApiError>) -> String {
        r.unwrap_err().param.unwrap()
    }

    #[test]
    fn choices_map_to_modes() {
        let f = ToolFormat::Hermes;
        let auto = tool_use(Some(vec![weather()]), None, None, f)
            .unwrap()
            .unwrap();
        assert_eq!(auto.mode, Some(CallMode::Free(f)));
        assert!(auto.grammar.is_none() && auto.parallel);
        let none = tool_use(Some(vec![weather()]), Some(json!("none")), None, f)
            .unwrap()
            .unwrap();
        assert_eq!(none.mode, None);
        let req = tool_use(
            Some(vec![weather()]),
            Some(json!("required")),
            Some(false),
            f,
        )
        .unwrap()
        .unwrap();
        assert_eq!(req.mode, Some(CallMode::Array));
        let Some(GrammarSpec::JsonSchema(s)) = req.grammar else {
            panic!()
        };
        assert_eq!(s["maxItems"], 1);
        for choice in [
            json!({"type": "function", "function": {"name": "get_weather"}}),
            json!({"type": "function", "name": "get_weather"}),
        ] {
            let named = tool_use(Some(vec![weather()]), Some(choice), None, f)
                .unwrap()
                .unwrap();
            assert_eq!(named.mode, Some(CallMode::Named("get_weather".into())));
        }
        // No tools: nothing to do, unless a call is demanded.
        assert!(tool_use(Some(vec![]), Some(json!("auto")), None, f)
            .unwrap()
            .is_none());
        assert!(tool_use(None, None, None, f).unwrap().is_none());
        assert_eq!(
            param_of(tool_use(None, Some(json!("required")), None, f)),
            "tool_choice"
        );
    }

    #[test]
    fn bad_definitions_and_choices_name_the_field() {
        let f = ToolFormat::Hermes;
        for (tools, choice, param) in [
            (
                vec![json!({"type": "custom", "custom": {}})],
                None,
                "tools[0].type",
            ),
            (vec![json!({"type": "function"})], None, "tools[0].function"),
            (
                vec![json!({"type": "function", "function": {"name": ""}})],
                None,
                "tools[0].function.name",
            ),
            (
                vec![json!({"type": "function", "function": {"name": "a", "parameters": 3}})],
                None,
                "tools[0].function.parameters",
            ),
            (vec![weather(), weather()], None, "tools[1].function.name"),
            (vec![weather()], Some(json!("sometimes")), "tool_choice"),
            (
                vec![weather()],
                Some(json!({"type": "function", "function": {"name": "other"}})),
                "tool_choice",
            ),
        ] {
            assert_eq!(param_of(tool_use(Some(tools), choice, None, f)), param);
        }
    }

    #[test]
    fn conversation_arguments_become_objects() {
        let calls = json!([{"id": "call_1", "type": "function",
                            "function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        let got = conversation_calls(2, calls).unwrap().unwrap();
        assert_eq!(got[0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(got[0]["id"], "call_1");
        let bad = json!([{"function": {"name": "f", "arguments": "{x"}}]);
        let e = conversation_calls(2, bad).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[2].tool_calls[0].function.arguments")
        );
        assert!(conversation_calls(0, json!([])).unwrap().is_none());
        assert!(call_id().starts_with("call_") && call_id().len() == 29);
    }
}
