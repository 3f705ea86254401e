//! Chat templates: the model's own Jinja template rendered with minijinja (+ pycompat, so
//! Python string methods in HF templates work), as transformers' `apply_chat_template` does.
//!
//! Fallback for a model without a template: ChatML,
//! `<|im_start|>{role}\n{content}<|im_end|>\n` per message, plus `<|im_start|>assistant\n`
//! when a generation prompt is asked for. The README documents it.

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

pub const CHATML_FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message with text content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
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
    /// Extra template variables (`chat_template_kwargs`); they may override `bos_token` and
    /// `eos_token` but not the messages, documents or `add_generation_prompt`.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// A compiled template with the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    pub is_fallback: bool,
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
        let src = template.unwrap_or(CHATML_FALLBACK).to_string();
        env.add_template_owned("chat", src)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or("").into(),
            eos_token: eos_token.unwrap_or("").into(),
            is_fallback: template.is_none(),
        })
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
        match &args.documents {
            Some(d) => ctx.insert(
                "documents".into(),
                minijinja::Value::from(minijinja::value::Serde(d)),
            ),
            None => ctx.remove("documents"),
        };
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
