//! Chat templates: the model's own Jinja template rendered with minijinja (+ pycompat, so
//! Python string methods in HF templates work), as transformers' `apply_chat_template` does.
//!
//! Fallback for a model without a template: ChatML,
//! `<|im_start|>{role}\n{content}<|im_end|>\n` per message, plus `<|im_start|>assistant\n`
//! when a generation prompt is asked for. The README documents it.

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::text::tools::ToolFormat;

pub const CHATML_FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message with text content, and what tool calling adds to it. Fields that are
/// `None` are absent from the template's view (`message.tool_calls is defined` is false), as
/// in the dicts transformers renders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A client's `null` content (beside `tool_calls`) is the empty string here: every
    /// tool-calling template tested treats the two alike.
    #[serde(default)]
    pub content: String,
    /// An assistant turn's calls, `function.arguments` as a JSON object (vLLM parses the
    /// client's string before rendering; templates `tojson` it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// What a template is rendered with besides the messages, as transformers'
/// `apply_chat_template` takes it.
#[derive(Debug, Clone, Default)]
pub struct RenderArgs {
    /// Open an assistant turn at the end.
    pub add_generation_prompt: bool,
    /// Cut the rendering right after the final message's content, so the model continues that
    /// message (transformers' `continue_final_message`; needs `add_generation_prompt` false).
    pub continue_final_message: bool,
    /// `documents` (RAG), as transformers passes them to the template.
    pub documents: Option<serde_json::Value>,
    /// `tools` (OpenAI function definitions), as transformers passes them to the template.
    pub tools: Option<serde_json::Value>,
    /// Extra template variables (`chat_template_kwargs`); they may override `bos_token` and
    /// `eos_token` but not the messages, documents, tools or `add_generation_prompt`.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// A compiled template with the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    pub is_fallback: bool,
    /// The tool-call format the template teaches, if it shows one (`ToolFormat::detect`).
    pub tool_format: Option<ToolFormat>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("is_fallback", &self.is_fallback)
            .finish()
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Days since 1970-01-01 -> (year, month 1-12, day 1-31), proleptic Gregorian (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) -> days since 1970-01-01 (Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `strftime` for the specifiers chat templates use (`%Y %y %m %d %e %B %b %A %a %H
/// %M %S %j %%`), in UTC; others are kept as written.
pub fn strftime(unix_secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = DAYS[(days + 3).rem_euclid(7) as usize];
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

impl ChatTemplate {
    pub fn new(
        template: Option<&str>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ModelError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        // transformers gives templates `strftime_now` (Granite and Llama 3 print today's date).
        env.add_function("strftime_now", |fmt: String| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            strftime(now, &fmt)
        });
        let src = template.unwrap_or(CHATML_FALLBACK).to_string();
        env.add_template_owned("chat", src)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or("").into(),
            eos_token: eos_token.unwrap_or("").into(),
            is_fallback: template.is_none(),
            tool_format: template.and_then(ToolFormat::detect),
        })
    }

    /// Pins `strftime_now` to `unix_secs` (reproducible renderings: tests, fixtures).
    pub fn with_clock(mut self, unix_secs: i64) -> Self {
        self.env
            .add_function("strftime_now", move |fmt: String| strftime(unix_secs, &fmt));
        self
    }

    /// Renders `messages`; `add_generation_prompt` opens an assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(
            messages,
            &RenderArgs {
                add_generation_prompt,
                ..Default::default()
            },
        )
    }

    /// The text this template puts between an assistant turn's content and the next message
    /// (ChatML: `<|im_end|>\n`), for the assistant turn that `prompt_text` (`messages` rendered
    /// with `args`, a generation prompt among them) opens. Found by rendering the conversation
    /// continued by a placeholder reply, with and without a placeholder user message after it,
    /// and keeping what both put right after the reply. `None` when the template does not
    /// render the reply as `prompt_text` followed by its content (one that rewrites earlier
    /// turns once a reply exists), or puts nothing after it.
    pub fn turn_end(
        &self,
        messages: &[ChatMessage],
        args: &RenderArgs,
        prompt_text: &str,
    ) -> Option<String> {
        // Private Use Area placeholders: no real turn holds them.
        const REPLY: &str = "\u{E000}alora-reply\u{E000}";
        const NEXT: &str = "\u{E000}alora-next\u{E000}";
        let args = RenderArgs {
            add_generation_prompt: false,
            continue_final_message: false,
            ..args.clone()
        };
        let after_reply = |convo: &[ChatMessage]| -> Option<String> {
            let text = self.render_with(convo, &args).ok()?;
            Some(
                text.strip_prefix(prompt_text)?
                    .strip_prefix(REPLY)?
                    .to_string(),
            )
        };
        let mut convo = messages.to_vec();
        convo.push(ChatMessage::new("assistant", REPLY));
        let last = after_reply(&convo)?;
        convo.push(ChatMessage::new("user", NEXT));
        let mut going_on = after_reply(&convo)?;
        going_on.truncate(going_on.find(NEXT)?);
        let common: usize = last
            .chars()
            .zip(going_on.chars())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len_utf8())
            .sum();
        (common > 0).then(|| last[..common].to_string())
    }

    /// Renders `messages` with `args` (documents, template kwargs, continuing the final
    /// message).
    pub fn render_with(&self, messages: &[ChatMessage], args: &RenderArgs) -> Result<String> {
        if args.continue_final_message && args.add_generation_prompt {
            return Err(ModelError::Template(
                "`continue_final_message` and `add_generation_prompt` cannot both be true".into(),
            ));
        }
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let mut ctx: std::collections::BTreeMap<String, minijinja::Value> = args
            .kwargs
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    minijinja::Value::from(minijinja::value::Serde(v)),
                )
            })
            .collect();
        ctx.entry("bos_token".into())
            .or_insert_with(|| self.bos_token.as_str().into());
        ctx.entry("eos_token".into())
            .or_insert_with(|| self.eos_token.as_str().into());
        ctx.insert(
            "messages".into(),
            minijinja::Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            args.add_generation_prompt.into(),
        );
        for (key, v) in [("documents", &args.documents), ("tools", &args.tools)] {
            match v {
                Some(v) => ctx.insert(
                    key.into(),
                    minijinja::Value::from(minijinja::value::Serde(v)),
                ),
                None => ctx.remove(key),
            };
        }
        let text = t
            .render(ctx)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        if !args.continue_final_message {
            return Ok(text);
        }
        // As transformers: cut after the last occurrence of the final message's content (or of
        // its stripped form, which templates that trim show instead).
        let last = messages.last().map(|m| m.content.as_str()).unwrap_or("");
        for needle in [last, last.trim()] {
            if needle.is_empty() {
                continue;
            }
            if let Some(i) = text.rfind(needle) {
                return Ok(text[..i + needle.len()].to_string());
            }
        }
        Err(ModelError::Template(
            "`continue_final_message`: the final message's content does not appear in the \
             rendered conversation"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's template (as in its GGUF) uses `loop.first` and string concatenation.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_like_transformers() {
        let t = ChatTemplate::new(Some(SMOLLM2), None, Some("<|im_end|>")).unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = t.render(&[ChatMessage::new("user", "Hi")], false).unwrap();
        assert!(no_gen.ends_with("Hi<|im_end|>\n"));
    }

    #[test]
    fn documents_kwargs_and_continuing_the_final_message() {
        let tpl = "{% if documents %}{% for d in documents %}[doc {{ d.title }}: {{ d.text }}]{% endfor %}{% endif %}{% if thinking %}<think>{% endif %}{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::new(Some(tpl), Some("<s>"), None).unwrap();
        let msgs = [
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "The answer is"),
        ];
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("thinking".into(), serde_json::json!(true));
        kwargs.insert("bos_token".into(), serde_json::json!("<B>"));
        kwargs.insert("messages".into(), serde_json::json!("ignored"));
        let args = RenderArgs {
            add_generation_prompt: true,
            documents: Some(serde_json::json!([{"title": "t", "text": "x"}])),
            kwargs,
            ..Default::default()
        };
        assert_eq!(
            t.render_with(&msgs, &args).unwrap(),
            "[doc t: x]<think><B><user>Hi</user><assistant>The answer is</assistant><assistant>"
        );
        let cont = RenderArgs {
            continue_final_message: true,
            ..Default::default()
        };
        assert_eq!(
            t.render_with(&msgs, &cont).unwrap(),
            "<s><user>Hi</user><assistant>The answer is"
        );
        let both = RenderArgs {
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        assert!(t.render_with(&msgs, &both).is_err());
    }

    #[test]
    fn strftime_matches_python() {
        // 2026-12-01 09:30:05 UTC, a Tuesday; 2024-02-29 (leap); the epoch.
        assert_eq!(
            strftime(1_796_117_405, "%B %d, %Y|%d %b %Y|%A %a %H:%M:%S %j %y %%"),
            "December 01, 2026|01 Dec 2026|Tuesday Tue 09:30:05 335 26 %"
        );
        assert_eq!(
            strftime(1_709_164_800, "%Y-%m-%d %j %A"),
            "2024-02-29 060 Thursday"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %A"), "1970-01-01 Thursday");
        for days in [-1000i64, 0, 365, 11_016, 20_788, 60_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn pycompat_methods_and_raise_exception() {
        let tpl = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}{{ m.content.strip().upper() }}{% endfor %}";
        let t = ChatTemplate::new(Some(tpl), None, None).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")], false)
                .unwrap(),
            "HI"
        );
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad role"), "{err}");
    }

    #[test]
    fn fallback_is_chatml() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        assert!(t.is_fallback);
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
