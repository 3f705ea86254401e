//! The tool-call parsers on model outputs (`fixtures/tool_outputs.json`): outputs recorded from
//! SmolLM2 (no calls: braces and code stay content) and outputs written in each template's own
//! format (one call, two calls, text then a call, malformed), read whole and streamed a
//! character at a time: the same content and calls either way.

use alora_model::tools::{parse, CallMode, ParsedCall, ParsedOutput, ToolCallParser, ToolFormat};
use serde_json::Value;

#[test]
fn parsers_read_model_outputs_alike_whole_and_streamed() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tool_outputs.json");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut n = 0;
    for case in cases["recorded"]
        .as_array()
        .unwrap()
        .iter()
        .chain(cases["written"].as_array().unwrap())
    {
        let mode = CallMode::Free(ToolFormat::from_name(case["format"].as_str().unwrap()).unwrap());
        let text = case["output"].as_str().unwrap();
        let want = ParsedOutput {
            content: case["content"].as_str().unwrap().to_string(),
            calls: case["calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| ParsedCall {
                    name: c["name"].as_str().unwrap().into(),
                    arguments: c["arguments"].as_str().unwrap().into(),
                })
                .collect(),
        };
        let what = format!(
            "{} / {}",
            case["format"],
            case.get("case").unwrap_or(&case["source"])
        );
        assert_eq!(parse(&mode, true, text), want, "{what}");
        let mut p = ToolCallParser::new(mode, true);
        let mut streamed = ParsedOutput::default();
        let mut deltas = Vec::new();
        for (i, c) in text.char_indices() {
            deltas.extend(p.push(&text[i..i + c.len_utf8()]));
        }
        deltas.extend(p.finish());
        deltas.into_iter().for_each(|d| streamed.apply(d));
        assert_eq!(streamed, want, "{what}, streamed");
        n += 1;
    }
    assert_eq!(n, 16);
}
