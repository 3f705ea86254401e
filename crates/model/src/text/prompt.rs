//! Conversation or prompt -> token ids for a base, LoRA or aLoRA request: the one rule that the
//! server, `alora generate` and the trainer all use (docs/ALORA.md states it).
//!
//! - Base and LoRA chat: the template with a generation prompt (an assistant turn opened).
//! - aLoRA chat: the template *without* a generation prompt, then the adapter's invocation
//!   tokens, unless the rendered conversation already ends with them (a client that wrote the
//!   invocation itself). The adapter switches on at the invocation's last occurrence.
//! - A prompt given as text or ids is used as is; an aLoRA needs its invocation inside it
//!   (PEFT would silently run the base model; alora refuses instead).

use crate::error::Result;
use crate::text::chat::{ChatMessage, ChatTemplate, RenderArgs};
use crate::text::tokenizer::Tokenizer;

/// What kind of adapter the request runs, as far as building its prompt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptAdapter<'a> {
    /// No adapter.
    Base,
    /// A LoRA: adapts every position.
    Lora,
    /// An aLoRA with these invocation tokens.
    ALora { invocation: &'a [u32] },
}

impl<'a> PromptAdapter<'a> {
    /// From an adapter's invocation tokens (`None` for a plain LoRA), or no adapter.
    pub fn of(adapter: Option<Option<&'a [u32]>>) -> Self {
        match adapter {
            None => PromptAdapter::Base,
            Some(None) => PromptAdapter::Lora,
            Some(Some(invocation)) => PromptAdapter::ALora { invocation },
        }
    }
}

/// A request's prompt ids and where its adapter switches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The first adapted position: `None` for the base model, 0 for a LoRA, the invocation's
    /// start for an aLoRA.
    pub activation_start: Option<usize>,
}

/// The start of the last occurrence of `inv` in `ids` (overlapping matches count), as PEFT's
/// `calculate_alora_offsets`; `None` when it does not occur or `inv` is empty.
pub fn find_activation_start(ids: &[u32], inv: &[u32]) -> Option<usize> {
    if inv.is_empty() || inv.len() > ids.len() {
        return None;
    }
    (0..=ids.len() - inv.len())
        .rev()
        .find(|&i| &ids[i..i + inv.len()] == inv)
}

/// The rendered text and ids of a chat request (the text is returned for opt-in logging).
pub fn chat_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    adapter: PromptAdapter<'_>,
) -> Result<(String, Prompt)> {
    chat_prompt_with(
        template,
        tokenizer,
        messages,
        adapter,
        &ChatOptions::default(),
    )
}

/// A client's say in rendering a conversation (the server's chat fields).
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    /// `None`: the rule above (true, or false for an aLoRA, whose invocation follows the
    /// conversation); `Some`: as the client asked.
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: bool,
    pub documents: Option<serde_json::Value>,
    /// Tool definitions for the template.
    pub tools: Option<serde_json::Value>,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// [`chat_prompt`] with the client's rendering options.
pub fn chat_prompt_with(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    adapter: PromptAdapter<'_>,
    opts: &ChatOptions,
) -> Result<(String, Prompt)> {
    let text = template.render_with(messages, &render_args(adapter, opts))?;
    let ids = tokenizer.encode(&text)?;
    Ok((text, ids_prompt_appending(ids, adapter)))
}

fn render_args(adapter: PromptAdapter<'_>, opts: &ChatOptions) -> RenderArgs {
    let alora = matches!(adapter, PromptAdapter::ALora { .. });
    RenderArgs {
        add_generation_prompt: opts
            .add_generation_prompt
            .unwrap_or(!alora && !opts.continue_final_message),
        continue_final_message: opts.continue_final_message,
        documents: opts.documents.clone(),
        tools: opts.tools.clone(),
        kwargs: opts.kwargs.clone(),
    }
}

/// What a chat template writes after an assistant turn's content when the conversation goes
/// on (ChatML: `<|im_end|>\n`), as text and as the ids it tokenizes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnEnd {
    pub text: String,
    pub ids: Vec<u32>,
}

/// The turn end of the assistant turn that a base or LoRA chat prompt opens (`prompt_text`,
/// as [`chat_prompt_with`] rendered it for `messages` and `opts`; see
/// [`ChatTemplate::turn_end`]). `None` when the prompt opens no assistant turn or the
/// template shows none.
pub fn turn_end(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    opts: &ChatOptions,
    prompt_text: &str,
) -> Option<TurnEnd> {
    let args = render_args(PromptAdapter::Base, opts);
    if !args.add_generation_prompt {
        return None;
    }
    let text = template.turn_end(messages, &args, prompt_text)?;
    let ids = tokenizer.encode(&text).ok()?;
    Some(TurnEnd { text, ids })
}

/// An aLoRA's invocation appended to `ids` unless they already end with it; the activation
/// start of the result (always found for an aLoRA).
pub fn ids_prompt_appending(mut ids: Vec<u32>, adapter: PromptAdapter<'_>) -> Prompt {
    let activation_start = match adapter {
        PromptAdapter::Base => None,
        PromptAdapter::Lora => Some(0),
        PromptAdapter::ALora { invocation } => {
            if !ids.ends_with(invocation) {
                ids.extend_from_slice(invocation);
            }
            Some(ids.len() - invocation.len())
        }
    };
    Prompt {
        ids,
        activation_start,
    }
}

/// A prompt used as given (completions): an aLoRA's activation start is the invocation's last
/// occurrence; `Err(InvocationNotFound)` when it does not occur.
pub fn ids_prompt(
    ids: Vec<u32>,
    adapter: PromptAdapter<'_>,
) -> std::result::Result<Prompt, InvocationNotFound> {
    let activation_start = match adapter {
        PromptAdapter::Base => None,
        PromptAdapter::Lora => Some(0),
        PromptAdapter::ALora { invocation } => {
            Some(find_activation_start(&ids, invocation).ok_or(InvocationNotFound)?)
        }
    };
    Ok(Prompt {
        ids,
        activation_start,
    })
}

/// An aLoRA prompt without its invocation tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationNotFound;

#[cfg(test)]
mod tests {
    use super::*;

    const INV: &[u32] = &[7, 8];

    #[test]
    fn invocation_is_appended_once_and_found_at_its_last_occurrence() {
        let a = PromptAdapter::ALora { invocation: INV };
        let p = ids_prompt_appending(vec![1, 7, 8, 2], a);
        assert_eq!(p.ids, [1, 7, 8, 2, 7, 8]);
        assert_eq!(p.activation_start, Some(4));
        let p = ids_prompt_appending(vec![1, 2, 7, 8], a);
        assert_eq!(p.ids, [1, 2, 7, 8], "already ends with the invocation");
        assert_eq!(p.activation_start, Some(2));
        assert_eq!(
            ids_prompt_appending(vec![1], PromptAdapter::Lora).activation_start,
            Some(0)
        );
        assert_eq!(
            ids_prompt_appending(vec![1], PromptAdapter::Base).activation_start,
            None
        );
    }

    #[test]
    fn given_prompts_need_the_invocation() {
        let a = PromptAdapter::ALora { invocation: INV };
        assert_eq!(
            ids_prompt(vec![7, 8, 1, 7, 8, 3], a)
                .unwrap()
                .activation_start,
            Some(3)
        );
        assert_eq!(ids_prompt(vec![7, 1, 8], a), Err(InvocationNotFound));
        assert_eq!(
            ids_prompt(vec![], PromptAdapter::Lora)
                .unwrap()
                .activation_start,
            Some(0)
        );
    }
}
