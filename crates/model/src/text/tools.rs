//! Tool calling: the formats chat models write calls in, parsed out of the generated text as it
//! streams ([`ToolCallParser`]), and the schemas that force a call ([`required_schema`]).
//!
//! One parser serves streaming and non-streaming responses ([`parse`] feeds it the whole text),
//! so the two always agree. Formats, as vLLM's parsers of the same names read them:
//! - `hermes` (Hermes 2/3, Qwen 2.5, Granite 4, SmolLM): `<tool_call>{"name": ..,
//!   "arguments": {..}}</tool_call>`, any number, text before them kept as content;
//! - `granite` (Granite 3.x): `<|tool_call|>[{"name": .., "arguments": {..}}, ..]`;
//! - `llama3_json` (Llama 3.1-3.3): the output is `{"name": .., "parameters": {..}}` (optionally
//!   after `<|python_tag|>`), several separated by `;`.
//!
//! A forced call is not written in the model's format: as in vLLM, `tool_choice: "required"`
//! constrains the output to a JSON array of `{"name", "parameters"}` ([`CallMode::Array`]) and a
//! named function to its arguments object ([`CallMode::Named`]). Text that does not parse as a
//! call is content, never an error.

use serde_json::Value;

/// A function the request offers the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The arguments' JSON schema (an empty object schema when the request gave none).
    pub parameters: Value,
}

/// How a model writes tool calls in free text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Granite,
    Llama3Json,
}

impl ToolFormat {
    pub const NAMES: &'static [&'static str] = &["hermes", "granite", "llama3_json"];

    /// vLLM's `--tool-call-parser` names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(ToolFormat::Hermes),
            "granite" => Some(ToolFormat::Granite),
            "llama3_json" => Some(ToolFormat::Llama3Json),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Granite => "granite",
            ToolFormat::Llama3Json => "llama3_json",
        }
    }

    /// The format a chat template teaches, read off its source: `<|tool_call|>` is Granite 3.x,
    /// `<tool_call>` Hermes-style, Llama 3's `"parameters"` JSON or `<|python_tag|>` Llama 3.
    /// `None` for a template that shows no tool-call format.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<|tool_call|>") {
            Some(ToolFormat::Granite)
        } else if template.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if template.contains("<|python_tag|>")
            || (template.contains("\"parameters\"") && template.contains("<|eot_id|>"))
        {
            Some(ToolFormat::Llama3Json)
        } else {
            None
        }
    }
}

/// What the generated text of a request with tools is.
#[derive(Debug, Clone, PartialEq)]
pub enum CallMode {
    /// The model writes content and calls in its own format (`tool_choice: "auto"`).
    Free(ToolFormat),
    /// A JSON array of `{"name", "parameters"}` (`tool_choice: "required"`).
    Array,
    /// The named function's arguments (`tool_choice: {"type": "function", ...}`).
    Named(String),
}

/// The schema of `tool_choice: "required"`: one or more calls (one with `parallel` false), each
/// to one of `tools` with arguments under its schema.
pub fn required_schema(tools: &[Tool], parallel: bool) -> Value {
    let calls: Vec<Value> = tools
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.name]},
                    "parameters": t.parameters,
                },
                "required": ["name", "parameters"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = serde_json::json!({
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": calls},
    });
    if !parallel {
        schema["maxItems"] = 1.into();
    }
    schema
}

/// What the parser found, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolDelta {
    /// Text for `message.content`.
    Content(String),
    /// A call starts: its index among the output's calls and the function's name.
    Call { index: usize, name: String },
    /// More of a call's arguments (a JSON text once all fragments are joined).
    Arguments { index: usize, fragment: String },
}

/// A parsed call: the function's name and its arguments as a JSON string.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// Content and calls of a whole output, folded from the parser's deltas.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedOutput {
    pub content: String,
    pub calls: Vec<ParsedCall>,
}

impl ParsedOutput {
    pub fn apply(&mut self, d: ToolDelta) {
        match d {
            ToolDelta::Content(s) => self.content.push_str(&s),
            ToolDelta::Call { name, .. } => self.calls.push(ParsedCall {
                name,
                arguments: String::new(),
            }),
            ToolDelta::Arguments { index, fragment } => {
                self.calls[index].arguments.push_str(&fragment)
            }
        }
    }
}

/// Parses a whole output (what a non-streamed response does).
pub fn parse(mode: &CallMode, parallel: bool, text: &str) -> ParsedOutput {
    let mut p = ToolCallParser::new(mode.clone(), parallel);
    let mut out = ParsedOutput::default();
    for d in p.push(text).into_iter().chain(p.finish()) {
        out.apply(d);
    }
    out
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const GRANITE_OPEN: &str = "<|tool_call|>";
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Content; calls may start (marker formats).
    Text,
    /// After a marker (or at a JSON start): a call's text is being gathered.
    InCall,
    /// Llama 3 / array: before the first non-space character decides what the output is.
    Start,
    /// Llama 3: a call ended; `;` and another may follow.
    AfterCall,
    /// Nothing more is parsed: the rest is content (or, past the last allowed call, dropped).
    Plain,
    /// `parallel` is off and a call was made: the rest is dropped.
    Done,
}

/// Turns generated text, pushed as it arrives, into content and tool-call deltas. Text that
/// might still become a call (a marker's prefix, an unfinished call) is held back until it
/// decides; [`ToolCallParser::finish`] releases what is left (an unfinished or malformed call
/// becomes content). Whitespace between content and a call is dropped.
#[derive(Debug)]
pub struct ToolCallParser {
    mode: CallMode,
    parallel: bool,
    state: State,
    /// Text received and not yet decided.
    buf: String,
    /// Whitespace held at the end of the content (dropped if a call follows).
    pending_space: String,
    calls: usize,
}

impl ToolCallParser {
    pub fn new(mode: CallMode, parallel: bool) -> Self {
        let state = match mode {
            CallMode::Free(ToolFormat::Hermes | ToolFormat::Granite) => State::Text,
            CallMode::Free(ToolFormat::Llama3Json) | CallMode::Array => State::Start,
            CallMode::Named(_) => State::InCall,
        };
        ToolCallParser {
            mode,
            parallel,
            state,
            buf: String::new(),
            pending_space: String::new(),
            calls: 0,
        }
    }

    /// Calls so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        if let CallMode::Named(name) = &self.mode {
            if self.calls == 0 {
                out.push(ToolDelta::Call {
                    index: 0,
                    name: name.clone(),
                });
                self.calls = 1;
            }
            if !text.is_empty() {
                out.push(ToolDelta::Arguments {
                    index: 0,
                    fragment: text.to_string(),
                });
            }
            return out;
        }
        self.buf.push_str(text);
        self.advance(&mut out, false);
        out
    }

    /// The end of the output: what was held back, as calls or content.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        if let CallMode::Named(_) = self.mode {
            return self.push("");
        }
        self.advance(&mut out, true);
        if !self.buf.is_empty() && self.state != State::Done {
            let rest = std::mem::take(&mut self.buf);
            self.content(&mut out, &rest);
        }
        if self.calls == 0 && !self.pending_space.is_empty() {
            out.push(ToolDelta::Content(std::mem::take(&mut self.pending_space)));
        }
        self.buf.clear();
        out
    }

    /// Content, with trailing whitespace held until something other than a call follows.
    fn content(&mut self, out: &mut Vec<ToolDelta>, s: &str) {
        if s.is_empty() {
            return;
        }
        let body = s.trim_end();
        if body.is_empty() {
            self.pending_space.push_str(s);
        } else {
            let mut text = std::mem::take(&mut self.pending_space);
            text.push_str(body);
            out.push(ToolDelta::Content(text));
            self.pending_space = s[body.len()..].to_string();
        }
    }

    fn call(&mut self, out: &mut Vec<ToolDelta>, name: String, arguments: String) {
        self.pending_space.clear();
        let index = self.calls;
        out.push(ToolDelta::Call { index, name });
        out.push(ToolDelta::Arguments {
            index,
            fragment: arguments,
        });
        self.calls += 1;
        if !self.parallel {
            self.state = State::Done;
        }
    }

    fn advance(&mut self, out: &mut Vec<ToolDelta>, end: bool) {
        loop {
            let before = (self.state, self.buf.len());
            match (self.state, self.mode.clone()) {
                (State::Done, _) => {
                    self.buf.clear();
                    return;
                }
                (State::Plain, _) => {
                    let rest = std::mem::take(&mut self.buf);
                    if self.calls > 0 && rest.trim().is_empty() {
                        return;
                    }
                    self.content(out, &rest);
                    return;
                }
                (State::Text, CallMode::Free(f)) => {
                    let marker = if f == ToolFormat::Granite {
                        GRANITE_OPEN
                    } else {
                        HERMES_OPEN
                    };
                    match self.buf.find(marker) {
                        Some(i) => {
                            let before = self.buf[..i].to_string();
                            self.content(out, &before);
                            self.buf.drain(..i);
                            self.state = State::InCall;
                        }
                        None => {
                            let keep = if end {
                                0
                            } else {
                                held_prefix(&self.buf, marker)
                            };
                            let cut = self.buf.len() - keep;
                            let text: String = self.buf.drain(..cut).collect();
                            self.content(out, &text);
                            return;
                        }
                    }
                }
                (State::InCall, CallMode::Free(ToolFormat::Hermes)) => {
                    let body = &self.buf[HERMES_OPEN.len()..];
                    let (json_end, consumed) = match body.find(HERMES_CLOSE) {
                        Some(j) => (j, HERMES_OPEN.len() + j + HERMES_CLOSE.len()),
                        // A model may end at EOS without the closing tag.
                        None if end => (body.len(), self.buf.len()),
                        None => return,
                    };
                    match call_of(body[..json_end].trim(), &["arguments", "parameters"]) {
                        Some((name, args)) => {
                            self.buf.drain(..consumed);
                            self.call(out, name, args);
                            if self.state != State::Done {
                                self.state = State::Text;
                            }
                        }
                        None => {
                            let text: String = self.buf.drain(..consumed).collect();
                            self.content(out, &text);
                            self.state = State::Text;
                        }
                    }
                }
                (State::InCall, CallMode::Free(ToolFormat::Granite)) => {
                    let body = &self.buf[GRANITE_OPEN.len()..];
                    let lead = body.len() - body.trim_start().len();
                    let start = GRANITE_OPEN.len() + lead;
                    match json_value_end(&self.buf[start..]) {
                        Scan::Complete(n) => {
                            let calls = calls_of(&self.buf[start..start + n], &["arguments"]);
                            match calls {
                                Some(calls) => {
                                    self.buf.drain(..start + n);
                                    for (name, args) in calls {
                                        if self.state == State::Done {
                                            break;
                                        }
                                        self.call(out, name, args);
                                    }
                                    if self.state != State::Done {
                                        self.state = State::Text;
                                    }
                                }
                                None => self.state = State::Plain,
                            }
                        }
                        Scan::Incomplete if !end => return,
                        Scan::Incomplete | Scan::Invalid => self.state = State::Plain,
                    }
                }
                (State::Start, _) => {
                    let t = self.buf.trim_start();
                    if !end && PYTHON_TAG.starts_with(t) {
                        return; // undecided (nothing yet, or a prefix of the tag)
                    }
                    let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t).trim_start();
                    if !end && t.is_empty() {
                        return;
                    }
                    let open = if self.mode == CallMode::Array {
                        '['
                    } else {
                        '{'
                    };
                    if t.starts_with(open) {
                        let skip = self.buf.len() - t.len();
                        self.buf.drain(..skip);
                        self.state = State::InCall;
                    } else {
                        self.state = State::Plain;
                    }
                }
                (State::InCall, CallMode::Free(ToolFormat::Llama3Json)) => {
                    match json_value_end(&self.buf) {
                        Scan::Complete(n) => {
                            match call_of(&self.buf[..n], &["parameters", "arguments"]) {
                                Some((name, args)) => {
                                    self.buf.drain(..n);
                                    self.call(out, name, args);
                                    if self.state != State::Done {
                                        self.state = State::AfterCall;
                                    }
                                }
                                None => self.state = State::Plain,
                            }
                        }
                        Scan::Incomplete if !end => return,
                        Scan::Incomplete | Scan::Invalid => self.state = State::Plain,
                    }
                }
                (State::AfterCall, _) => {
                    // `; {...}` continues; anything else ends the calls.
                    let t = self.buf.trim_start();
                    if t.is_empty() && !end {
                        return;
                    }
                    match t.strip_prefix(';').map(str::trim_start) {
                        Some("") if !end => return,
                        Some(rest) if rest.starts_with('{') => {
                            let skip = self.buf.len() - rest.len();
                            self.buf.drain(..skip);
                            self.state = State::InCall;
                        }
                        _ => self.state = State::Plain,
                    }
                }
                (State::InCall, CallMode::Array) => {
                    // `[` then calls separated by `,` and a closing `]`, each emitted when
                    // its object closes.
                    let t = self.buf.trim_start();
                    let t = t
                        .strip_prefix('[')
                        .or_else(|| t.strip_prefix(','))
                        .unwrap_or(t)
                        .trim_start();
                    if t.starts_with(']') {
                        let skip = self.buf.len() - t.len() + 1;
                        self.buf.drain(..skip);
                        self.state = State::Plain;
                        continue;
                    }
                    if t.is_empty() {
                        if end {
                            self.state = State::Plain;
                            continue;
                        }
                        return;
                    }
                    let skip = self.buf.len() - t.len();
                    match json_value_end(t) {
                        Scan::Complete(n) => match call_of(&t[..n], &["parameters", "arguments"]) {
                            Some((name, args)) => {
                                self.buf.drain(..skip + n);
                                self.call(out, name, args);
                            }
                            None => self.state = State::Plain,
                        },
                        Scan::Incomplete if !end => return,
                        Scan::Incomplete | Scan::Invalid => self.state = State::Plain,
                    }
                }
                (State::Text | State::InCall, _) => {
                    // Text only exists for marker formats; Named never comes here.
                    self.state = State::Plain;
                }
            }
            if (self.state, self.buf.len()) == before {
                return;
            }
        }
    }
}

/// The length of the longest end of `s` that begins `marker` (held back: it may become one).
fn held_prefix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && marker.starts_with(&s[s.len() - k..]))
        .unwrap_or(0)
}

/// One call object: `name` and the first of `keys` present as its arguments (an object, or a
/// string holding JSON as some models write it).
fn call_of(text: &str, keys: &[&str]) -> Option<(String, String)> {
    call_from(&serde_json::from_str(text).ok()?, keys)
}

fn call_from(v: &Value, keys: &[&str]) -> Option<(String, String)> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let args = keys.iter().find_map(|k| o.get(*k));
    let args = match args {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => return None,
    };
    Some((name, args))
}

/// Calls from a JSON array of call objects (or one object).
fn calls_of(text: &str, keys: &[&str]) -> Option<Vec<(String, String)>> {
    match serde_json::from_str(text).ok()? {
        Value::Array(items) => items.iter().map(|v| call_from(v, keys)).collect(),
        v @ Value::Object(_) => Some(vec![call_from(&v, keys)?]),
        _ => None,
    }
}

#[derive(Debug, PartialEq)]
enum Scan {
    /// A JSON object or array ends after this many bytes.
    Complete(usize),
    /// It has not ended yet.
    Incomplete,
    /// It is not an object or array.
    Invalid,
}

/// Where the JSON object or array at the start of `s` ends, by bracket depth outside strings
/// (the content itself is checked by `serde_json` afterwards).
fn json_value_end(s: &str) -> Scan {
    let bytes = s.as_bytes();
    if !matches!(bytes.first(), Some(b'{' | b'[')) {
        return if s.is_empty() {
            Scan::Incomplete
        } else {
            Scan::Invalid
        };
    }
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Scan::Complete(i + 1);
                }
            }
            _ => {}
        }
    }
    Scan::Incomplete
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(f: ToolFormat) -> CallMode {
        CallMode::Free(f)
    }

    fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    /// Streamed a character at a time and in one piece, the result is the same.
    fn both(mode: &CallMode, parallel: bool, text: &str) -> ParsedOutput {
        let whole = parse(mode, parallel, text);
        let mut p = ToolCallParser::new(mode.clone(), parallel);
        let mut out = ParsedOutput::default();
        let mut deltas = Vec::new();
        for (i, c) in text.char_indices() {
            deltas.extend(p.push(&text[i..i + c.len_utf8()]));
        }
        deltas.extend(p.finish());
        for d in deltas {
            out.apply(d);
        }
        assert_eq!(out, whole, "streamed vs whole for {text:?}");
        whole
    }

    #[test]
    fn hermes_calls_text_and_malformed() {
        let m = free(ToolFormat::Hermes);
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        assert_eq!(
            both(&m, true, one),
            ParsedOutput {
                content: String::new(),
                calls: vec![call("get_weather", r#"{"city":"Paris"}"#)]
            }
        );
        let two = format!("Let me check.\n{one}\n<tool_call>{{\"name\": \"time\", \"arguments\": {{}}}}</tool_call>");
        let out = both(&m, true, &two);
        assert_eq!(out.content, "Let me check.");
        assert_eq!(
            out.calls,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("time", "{}")
            ]
        );
        // parallel off: the first call only.
        assert_eq!(both(&m, false, &two).calls.len(), 1);
        // No closing tag at EOS still parses.
        let open = "<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1}}";
        assert_eq!(both(&m, true, open).calls, vec![call("a", r#"{"x":1}"#)]);
        // Malformed: kept as content, nothing lost.
        let bad = "Sure <tool_call>{\"name\": oops}</tool_call> done";
        assert_eq!(
            both(&m, true, bad),
            ParsedOutput {
                content: bad.into(),
                calls: vec![]
            }
        );
        let plain = "No tools needed. A < b and <tool_ is not a call. ";
        assert_eq!(both(&m, true, plain).content, plain);
    }

    #[test]
    fn granite_array_after_marker() {
        let m = free(ToolFormat::Granite);
        let text = "<|tool_call|>[{\"name\": \"a\", \"arguments\": {\"q\": \"x]\"}}, {\"name\": \"b\", \"arguments\": {}}]";
        assert_eq!(
            both(&m, true, text).calls,
            vec![call("a", r#"{"q":"x]"}"#), call("b", "{}")]
        );
        let lead = format!("I will call a. {text}");
        assert_eq!(both(&m, true, &lead).content, "I will call a.");
        let bad = "<|tool_call|>[{\"nam\": 1}]";
        assert_eq!(both(&m, true, bad).content, bad);
        let cut = "<|tool_call|>[{\"name\": \"a\", \"argu";
        assert_eq!(both(&m, true, cut).content, cut);
    }

    #[test]
    fn llama3_json_at_start_only() {
        let m = free(ToolFormat::Llama3Json);
        let one = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        assert_eq!(
            both(&m, true, one).calls,
            vec![call("get_weather", r#"{"city":"Paris"}"#)]
        );
        let tagged = format!("<|python_tag|>{one}; {one}");
        assert_eq!(both(&m, true, &tagged).calls.len(), 2);
        let text = "The weather is {\"name\": 1}";
        assert_eq!(both(&m, true, text).content, text);
        let not_call = "{\"answer\": 42}";
        assert_eq!(both(&m, true, not_call).content, not_call);
        assert_eq!(both(&m, true, "  hello ").content, "  hello ");
    }

    #[test]
    fn forced_array_and_named() {
        let text =
            r#"[{"name":"add","parameters":{"a":1,"b":2}},{"name":"neg","parameters":{"x":3}}]"#;
        let out = both(&CallMode::Array, true, text);
        assert_eq!(
            out.calls,
            vec![call("add", r#"{"a":1,"b":2}"#), call("neg", r#"{"x":3}"#)]
        );
        assert_eq!(out.content, "");
        let named = both(&CallMode::Named("add".into()), true, r#"{"a":1,"b":2}"#);
        assert_eq!(named.calls, vec![call("add", r#"{"a":1,"b":2}"#)]);
        // Even an empty output is the named call (with empty arguments).
        assert_eq!(parse(&CallMode::Named("f".into()), true, "").calls.len(), 1);
    }

    #[test]
    fn required_schema_names_each_tool() {
        let tools = [
            Tool {
                name: "a".into(),
                parameters: serde_json::json!({"type": "object"}),
            },
            Tool {
                name: "b".into(),
                parameters: serde_json::json!({"type": "object", "properties": {"x": {"type": "integer"}}}),
            },
        ];
        let s = required_schema(&tools, false);
        assert_eq!(s["maxItems"], 1);
        assert_eq!(s["items"]["anyOf"][1]["properties"]["name"]["enum"][0], "b");
        assert!(required_schema(&tools, true).get("maxItems").is_none());
    }

    #[test]
    fn detects_formats_from_templates() {
        assert_eq!(
            ToolFormat::detect("x <|tool_call|> y <tool_call>"),
            Some(ToolFormat::Granite)
        );
        assert_eq!(
            ToolFormat::detect("<tool_call>\n"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolFormat::detect("<|python_tag|>"),
            Some(ToolFormat::Llama3Json)
        );
        assert_eq!(ToolFormat::detect("{{ messages }}"), None);
        for n in ToolFormat::NAMES {
            assert_eq!(ToolFormat::from_name(n).unwrap().name(), *n);
        }
    }
}
