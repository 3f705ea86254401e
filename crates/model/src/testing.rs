//! Test support shared by the workspace's test suites (server, trainer): a character-level
//! tokenizer for the tiny fixture models, so tests can speak text to a 96-token vocabulary,
//! and the largest absolute difference of two tensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

/// max |a - b| over all elements (f32 tensors of one shape); panics otherwise (tests only).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("max_abs_diff: f32 tensors of one shape")
}

/// The 96 symbols of the tiny fixtures' vocabulary: ids 5, 6, 7 are "a", "b", "c", so the
/// fixture aLoRA's invocation [5, 6, 7] is the text "abc". Ids 1 and 2 are the ChatML markers.
pub fn char_vocab() -> Vec<String> {
    let mut v: Vec<String> = ["<unk>", "<|im_start|>", "<|im_end|>", "\n", " "]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(('a'..='z').map(|c| c.to_string()));
    v.extend(('0'..='9').map(|c| c.to_string()));
    v.extend(".,?!:;'\"-()".chars().map(|c| c.to_string()));
    v.extend(('A'..='Z').map(|c| c.to_string()));
    // JSON's and regexes' punctuation, for structured-output tests.
    v.extend("{}[]_".chars().map(|c| c.to_string()));
    while v.len() < 96 {
        v.push(format!("<x{}>", v.len()));
    }
    v
}

/// Writes `tokenizer.json` (one token per character, the ChatML markers special) and a
/// `tokenizer_config.json` without a chat template (so the ChatML fallback applies) into `dir`.
pub fn write_char_tokenizer(dir: &Path) -> std::io::Result<()> {
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};
    let vocab: HashMap<String, u32> = char_vocab()
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(std::io::Error::other)?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::Regex("(?s).".into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(std::io::Error::other)?,
    ));
    tok.with_decoder(Some(Fuse::new()));
    let _added = tok.add_special_tokens(vec![
        AddedToken::from("<|im_start|>", true),
        AddedToken::from("<|im_end|>", true),
    ]);
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(std::io::Error::other)?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}"#,
    )
}
