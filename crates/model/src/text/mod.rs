//! Text in and out, with no tensors: chat templates ([`chat`]), the tokenizer and incremental
//! detokenization ([`tokenizer`]), the one rule that turns a conversation or a prompt into ids
//! for base, LoRA and aLoRA requests ([`prompt`]), sampling ([`sampling`]), and the one output
//! state machine (EOS, stop ids, stop strings, length) that `generate` and the server's engine
//! both run ([`output`]).

pub mod chat;
pub mod grammar;
pub mod output;
pub mod prompt;
pub mod sampling;
pub mod tokenizer;
pub mod tools;
