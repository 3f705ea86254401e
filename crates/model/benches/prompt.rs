//! What a chat request costs before the engine sees it: the chat template's rendering and the
//! tokenization of a conversation of about 250 / 2,000 / 4,000 tokens, on the default model's
//! template and tokenizer (SmolLM2-135M-Instruct's GGUF, fetched by scripts/fetch-model.sh),
//! as an aLoRA call renders it (no generation prompt): the tokenizer library on the whole text,
//! and alora's piecewise tokenization when an earlier request rendered the same turns.
//! BENCHMARKS.md has the commands and results.

use std::path::PathBuf;

use alora_model::loader::tokenizer_from_gguf;
use alora_model::{ChatMessage, ChatTemplate};
use candle_core::quantized::gguf_file;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const WORDS: &[&str] = &[
    "the", "of", "and", "river", "light", "music", "book", "school", "family", "story", "market",
    "garden", "energy", "system", "history", "winter", "forest", "bridge", "morning",
];

/// A user turn of about `n` words (one token each), an answer, a question.
fn conversation(n: usize) -> Vec<ChatMessage> {
    let body: Vec<&str> = (0..n)
        .map(|i| WORDS[(i * 7 + i / 3) % WORDS.len()])
        .collect();
    vec![
        ChatMessage::new(
            "user",
            &format!("{}.\n\nSummarize the text above.", body.join(" ")),
        ),
        ChatMessage::new(
            "assistant",
            "The text is about a river, a market and a long winter.",
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} missing: run scripts/fetch-model.sh",
        path.display()
    );
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let tok = tokenizer_from_gguf(&content).unwrap();
    let template = ChatTemplate::new(
        tok.chat_template.as_deref(),
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .unwrap();
    let mut g = c.benchmark_group("prompt");
    for words in [240, 1960, 3960] {
        let msgs = conversation(words);
        let text = template.render(&msgs, false).unwrap();
        let n = tok.encode(&text).unwrap().len();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("render", n), &msgs, |b, m| {
            b.iter(|| template.render(m, false).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("tokenize", n), &text, |b, t| {
            b.iter(|| tok.encode_uncached(t).unwrap())
        });
        // What the next request on the conversation pays: its earlier turns' pieces cached.
        let next = format!("{text}<|im_start|>topic\n");
        tok.encode(&text).unwrap();
        g.bench_with_input(
            BenchmarkId::new("tokenize_next_request", n),
            &next,
            |b, t| b.iter(|| tok.encode(t).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
