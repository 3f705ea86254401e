//! The trainer end to end on the tiny Llama fixture: data encoding and its errors, a run that
//! lowers the loss and writes PEFT files alora loads, resuming from a checkpoint, and the
//! round trip through PEFT (tests/fixtures/roundtrip, checked by make_train_fixtures.py).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use alora_cache::BlockId;
use alora_model::{
    ActiveAdapter, AdapterKind, CausalLm, ChatMessage, LoadOptions, LoadedModel, LoraAdapter,
    Module, SeqStep,
};
use alora_trainer::{AdapterSpec, Encoder, Example, LoraParams, TrainConfig, TrainModel, Trainer};
use candle_core::{DType, Device, Tensor};

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "trainer-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn llama_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/llama")
}

fn roundtrip_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/roundtrip")
}

/// The tiny Llama with a character tokenizer (ChatML fallback template).
fn tiny_model() -> LoadedModel {
    let d = scratch("model");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(llama_dir().join(f), d.join(f)).unwrap();
    }
    alora_model::testing::write_char_tokenizer(&d).unwrap();
    LoadedModel::load(&d, &LoadOptions::default()).unwrap()
}

fn spec(alora: bool) -> AdapterSpec {
    AdapterSpec {
        invocation_tokens: alora.then(|| vec![5, 6, 7]),
        rank: 4,
        alpha: 8.0,
        dropout: 0.05,
        use_rslora: false,
        targets: vec![Module::Q, Module::K, Module::V],
    }
}

fn encoder(m: &LoadedModel, alora: bool) -> Encoder<'_> {
    Encoder {
        template: &m.template,
        tokenizer: &m.tokenizer,
        invocation: vec![5, 6, 7],
        alora,
        eos: Some(2),
        max_len: 200,
    }
}

/// Conversations whose label says whether the user's text has a digit in it.
fn write_data(path: &Path, n: usize, seed: usize) {
    let mut lines = Vec::new();
    for i in 0..n {
        let k = i + seed;
        let digit = k.is_multiple_of(2);
        let user = if digit {
            format!("item {} is here", k % 10)
        } else {
            format!("item {} is here", ["x", "y", "z"][k % 3])
        };
        let label = if digit { "yes" } else { "no" };
        // Both accepted shapes of a line.
        lines.push(if i % 2 == 0 {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "{user}"}}, {{"role": "assistant", "content": "ok"}}, {{"role": "digit", "content": "{label}"}}]}}"#
            )
        } else {
            format!(
                r#"{{"messages": {{"chat": [{{"role": "user", "content": "{user}"}}, {{"role": "assistant", "content": "ok"}}, {{"role": "digit", "content": "{label}"}}]}}}}"#
            )
        });
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn encoding_places_the_invocation_and_masks_the_prompt() {
    let m = tiny_model();
    let conv = vec![
        ChatMessage::new("user", "hi"),
        ChatMessage::new("assistant", "hello"),
        ChatMessage::new("digit", "no"),
    ];
    let ex = encoder(&m, true).encode(&conv).unwrap();
    let prompt = m.template.render(&conv[..2], false).unwrap();
    let n = m.tokenizer.encode(&prompt).unwrap().len();
    assert_eq!((ex.adapter_start, ex.target_start), (n, n + 3));
    assert_eq!(&ex.ids[n..n + 3], &[5, 6, 7]);
    assert_eq!(
        m.tokenizer.decode(&ex.ids[n + 3..], false).unwrap(),
        "no<|im_end|>"
    );
    let lora = encoder(&m, false).encode(&conv).unwrap();
    assert_eq!((lora.adapter_start, lora.target_start), (0, n + 3));

    // A target that contains the invocation would move PEFT's s: refused.
    let bad = vec![
        ChatMessage::new("user", "hi"),
        ChatMessage::new("digit", "abc"),
    ];
    let e = encoder(&m, true).encode(&bad).unwrap_err().to_string();
    assert!(e.contains("target contains the invocation"), "{e}");
}

/// Training and serving build the same ids for the same conversation: the trainer's prompt
/// part and activation start are what the server's chat handler gets from the one prompt
/// rule (`alora_model::text::prompt::chat_prompt`) for that aLoRA.
#[test]
fn training_and_serving_build_the_same_prompt() {
    use alora_model::text::prompt::{chat_prompt, PromptAdapter};
    let m = tiny_model();
    for conv in [
        vec![
            ChatMessage::new("user", "hi"),
            ChatMessage::new("digit", "no"),
        ],
        vec![
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", "2 cats"),
            ChatMessage::new("assistant", "yes"),
            ChatMessage::new("digit", "yes"),
        ],
    ] {
        let ex = encoder(&m, true).encode(&conv).unwrap();
        let kind = PromptAdapter::ALora {
            invocation: &[5, 6, 7],
        };
        let (_, served) =
            chat_prompt(&m.template, &m.tokenizer, &conv[..conv.len() - 1], kind).unwrap();
        assert_eq!(served.ids, &ex.ids[..ex.target_start]);
        assert_eq!(served.activation_start, Some(ex.adapter_start));
    }
}

#[test]
fn a_bad_line_is_named_or_skipped_and_counted() {
    let m = tiny_model();
    let d = scratch("data");
    let p = d.join("train.jsonl");
    write_data(&p, 4, 0);
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str("{\"messages\": [{\"role\": \"user\"}]}\nnot json\n");
    std::fs::write(&p, text).unwrap();
    let e = format!("{:#}", encoder(&m, true).read(&p, false).unwrap_err());
    assert!(e.contains("train.jsonl:5:"), "{e}");
    let (ex, skipped) = encoder(&m, true).read(&p, true).unwrap();
    assert_eq!((ex.len(), skipped), (4, 2));
    let mut long = encoder(&m, true);
    long.max_len = 10;
    let e = format!("{:#}", long.read(&p, false).unwrap_err());
    assert!(e.contains(":1:") && e.contains("over --max-len 10"), "{e}");
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 2,
        grad_accum: 2,
        lr: 5e-2,
        warmup_ratio: 0.1,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        eval_steps: 2,
        seed: 5,
    }
}

fn weights(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn trainer<'a>(tm: &'a TrainModel, out: &Path, cfg: TrainConfig) -> Trainer<'a> {
    Trainer {
        model: tm,
        params: LoraParams::init(spec(true), tm.config(), 9, &Device::Cpu).unwrap(),
        cfg,
        base_model: "tiny-llama".into(),
        out: out.to_path_buf(),
        progress: false,
        stop_after: None,
    }
}

#[test]
fn training_lowers_the_loss_writes_peft_files_and_resumes_exactly() {
    let m = tiny_model();
    let tm = TrainModel::new(&m.model).unwrap();
    let d = scratch("run");
    write_data(&d.join("train.jsonl"), 16, 0);
    write_data(&d.join("val.jsonl"), 4, 100);
    let enc = encoder(&m, true);
    let (train, _) = enc.read(&d.join("train.jsonl"), false).unwrap();
    let (val, _) = enc.read(&d.join("val.jsonl"), false).unwrap();

    let out = d.join("a");
    let before =
        alora_trainer::eval_loss(&tm, &trainer(&tm, &out, config(3)).params, &val).unwrap();
    let res = trainer(&tm, &out, config(3))
        .run(&train, &val, false)
        .unwrap();
    assert_eq!(res.steps, 12);
    let best = res.best_val.unwrap();
    assert!(best < before * 0.9, "validation loss {before} -> {best}");
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 12);
    assert_eq!(log.lines().filter(|l| l.contains("val_loss")).count(), 6);

    // PEFT's layout, loadable by alora as an aLoRA with the invocation ids.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["alora_invocation_tokens"], serde_json::json!([5, 6, 7]));
    assert_eq!(cfg["peft_type"], "LORA");
    let a = LoraAdapter::load("t", &out, m.model.config(), &Device::Cpu, None).unwrap();
    assert_eq!(
        a.kind,
        AdapterKind::ALora {
            invocation_tokens: vec![5, 6, 7]
        }
    );

    // Every A and B moved away from its initial value (B starts at zero).
    let init = trainer(&tm, &out, config(3)).params;
    let last = weights(&out.join("last"));
    for (name, v) in init.named() {
        assert!(
            max_abs_diff(&last[&name], v.as_tensor()) > 1e-6,
            "{name} never changed"
        );
    }

    // Interrupted after 4 steps (checkpoint at step 4), then resumed: the same final weights.
    let out2 = d.join("b");
    let mut t = trainer(&tm, &out2, config(3));
    t.stop_after = Some(5);
    assert_eq!(t.run(&train, &val, false).unwrap().steps, 5);
    let mut t = trainer(&tm, &out2, config(3));
    let r = t.run(&train, &val, true).unwrap();
    assert_eq!(r.steps, 12);
    let resumed = weights(&out2.join("last"));
    for (k, v) in &last {
        assert!(
            max_abs_diff(v, &resumed[k]) < 1e-6,
            "{k} differs after resuming"
        );
    }
    // Resuming with other settings is refused.
    let e = trainer(&tm, &out2, config(4))
        .run(&train, &val, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other settings"), "{e}");
}

/// The round-trip fixture: a few steps from PEFT's init on the parity batch.
fn roundtrip_adapter(out: &Path) {
    let m = CausalLm::load_hf(&llama_dir(), DType::F32, &Device::Cpu).unwrap();
    let tm = TrainModel::new(&m).unwrap();
    let parity: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let exs: Vec<Example> = parity["llama_alora"]["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Example {
            ids: serde_json::from_value(e["ids"].clone()).unwrap(),
            adapter_start: e["adapter_start"].as_u64().unwrap() as usize,
            target_start: e["target_start"].as_u64().unwrap() as usize,
        })
        .collect();
    let mut t = Trainer {
        model: &tm,
        params: LoraParams::init(spec(true), tm.config(), 1, &Device::Cpu).unwrap(),
        cfg: TrainConfig {
            epochs: 4,
            batch_size: 1,
            grad_accum: 1,
            lr: 2e-2,
            warmup_ratio: 0.0,
            eval_steps: 0,
            ..config(1)
        },
        base_model: "tiny-llama".into(),
        out: out.to_path_buf(),
        progress: false,
        stop_after: None,
    };
    t.params.spec.dropout = 0.0;
    t.run(&exs, &[], false).unwrap();
}

/// PEFT loaded the adapter this trainer wrote (tests/fixtures/roundtrip/adapter) and computed
/// logits on inputs with the invocation once, twice and absent; alora's inference path gives
/// the same logits within 1e-4. The committed adapter is what the trainer makes today (set
/// ALORA_WRITE_FIXTURES=1 to rewrite it, then rerun make_train_fixtures.py roundtrip).
#[test]
fn roundtrip_through_peft() {
    let dir = roundtrip_dir();
    let fresh = scratch("roundtrip");
    roundtrip_adapter(&fresh);
    if std::env::var_os("ALORA_WRITE_FIXTURES").is_some() {
        let dst = dir.join("adapter");
        std::fs::create_dir_all(&dst).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fresh.join(f), dst.join(f)).unwrap();
        }
        let inputs = serde_json::json!([
            [20, 21, 22, 23, 5, 6, 7, 30, 31],
            [5, 6, 7, 40, 41, 5, 6, 7, 42, 43, 44],
            [50, 51, 52, 53, 54, 55],
            [60, 5, 6, 61, 5, 6, 7]
        ]);
        std::fs::write(dir.join("inputs.json"), inputs.to_string()).unwrap();
    }
    let committed = weights(&dir.join("adapter"));
    let made = weights(&fresh);
    assert_eq!(committed.len(), made.len());
    for (k, v) in &committed {
        assert!(
            max_abs_diff(v, &made[k]) < 1e-5,
            "{k}: the trainer no longer makes this adapter"
        );
    }

    let dev = Device::Cpu;
    let model = CausalLm::load_hf(&llama_dir(), DType::F32, &dev).unwrap();
    let adapter = Arc::new(
        LoraAdapter::load("rt", &dir.join("adapter"), model.config(), &dev, None).unwrap(),
    );
    let inputs: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let want = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &dev).unwrap();
    let kv = model.new_kv_store(inputs.len() * 4, 4).unwrap();
    let tables: Vec<Vec<BlockId>> = (0..inputs.len())
        .map(|i| (0..4).map(|b| BlockId((i * 4 + b) as u32)).collect())
        .collect();
    let steps: Vec<SeqStep> = inputs
        .iter()
        .zip(&tables)
        .map(|(ids, t)| SeqStep {
            tokens: ids,
            start_pos: 0,
            adapter: adapter.activation_start(ids).map(|s| ActiveAdapter {
                adapter: adapter.clone(),
                activation_start: s,
            }),
            block_table: t,
            all_logits: true,
        })
        .collect();
    assert!(steps[2].adapter.is_none() && steps[1].adapter.as_ref().unwrap().activation_start == 5);
    let out = model.forward(&steps, &kv).unwrap();
    for i in 0..inputs.len() {
        let d = max_abs_diff(&out.seq(i).unwrap(), &want[&format!("case{i}")]);
        assert!(d <= 1e-4, "case {i}: alora vs PEFT max |dlogit| {d}");
    }
}
