//! Chat rendering parity with transformers: for SmolLM2's own template and real Granite 3.3 /
//! 4.0, Llama 3.2 and Qwen 2.5 templates, alora's rendering of a set of conversations (with and
//! without a system message, multi-turn, with documents, with template kwargs, without a
//! generation prompt, continuing the final message) equals transformers' `apply_chat_template`
//! text (`fixtures/make_template_golden.py`, `strftime_now` pinned to 2026-12-01).

use std::path::PathBuf;

use alora_model::{ChatMessage, ChatTemplate, RenderArgs};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn renderings_match_transformers() {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("template_golden.json")).unwrap(),
    )
    .unwrap();
    // 2026-12-01 09:30:00 UTC, as the fixture script pins it.
    let pinned = 1_796_117_400;
    let (bos, eos) = (
        golden["bos_token"].as_str().unwrap(),
        golden["eos_token"].as_str().unwrap(),
    );
    let mut compared = 0;
    for (name, t) in golden["templates"].as_object().unwrap() {
        let src = t["source"].as_str().unwrap();
        let src = match src.strip_prefix("templates/") {
            Some(f) => std::fs::read_to_string(fixtures().join("templates").join(f)).unwrap(),
            None => src.to_string(),
        };
        let tpl = ChatTemplate::new(Some(&src), Some(bos), Some(eos))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .with_clock(pinned);
        for case in t["cases"].as_array().unwrap() {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let args = RenderArgs {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(true),
                continue_final_message: case["continue_final_message"].as_bool().unwrap_or(false),
                documents: case.get("documents").cloned(),
                kwargs: case["kwargs"].as_object().cloned().unwrap_or_default(),
            };
            let got = tpl
                .render_with(&messages, &args)
                .unwrap_or_else(|e| panic!("{name} / {}: {e}", case["name"]));
            assert_eq!(
                got,
                case["text"].as_str().unwrap(),
                "{name} / {}",
                case["name"]
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 35);
}
