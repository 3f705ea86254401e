//! Adapter loading: what is refused, and with which message; IBM's `invocation_string`; the
//! digest follows content, not names.

use std::path::{Path, PathBuf};

use alora_model::{AdapterKind, CausalLm, LoraAdapter, ModelConfig};
use candle_core::{DType, Device};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn config() -> ModelConfig {
    CausalLm::load_hf(&fixtures(), DType::F32, &Device::Cpu)
        .unwrap()
        .config()
        .clone()
}

/// A copy of the fixture `alora` adapter with its config edited by `edit`.
fn variant(name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("adapter-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let src = fixtures().join("alora");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        d.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    d
}

fn load(dir: &Path, cfg: &ModelConfig) -> Result<LoraAdapter, String> {
    let enc = |s: &str| Ok(s.bytes().map(|b| b as u32 % 96).collect());
    LoraAdapter::load("t", dir, cfg, &Device::Cpu, Some(&enc)).map_err(|e| e.to_string())
}

#[test]
fn unsupported_adapters_are_refused_by_name() {
    let cfg = config();
    // (edit, words the error must contain)
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "dora",
            Box::new(|c| c["use_dora"] = json!(true)),
            "use_dora",
        ),
        (
            "prefix",
            Box::new(|c| c["peft_type"] = json!("PREFIX_TUNING")),
            "PREFIX_TUNING",
        ),
        ("bias", Box::new(|c| c["bias"] = json!("all")), "bias"),
        (
            "mts",
            Box::new(|c| c["modules_to_save"] = json!(["lm_head"])),
            "modules_to_save",
        ),
        (
            "regex",
            Box::new(|c| c["rank_pattern"] = json!({"layers\\.0.*": 2})),
            "regex",
        ),
        ("rank", Box::new(|c| c["r"] = json!(8)), "expected [8, 64]"),
        (
            "inv_past_vocab",
            Box::new(|c| c["alora_invocation_tokens"] = json!([5, 99_999_999])),
            "vocabulary",
        ),
        (
            "empty_inv",
            Box::new(|c| c["alora_invocation_tokens"] = json!([])),
            "empty",
        ),
    ];
    for (name, edit, words) in cases {
        let err = load(&variant(name, edit), &cfg).unwrap_err();
        assert!(err.contains(words), "{name}: {err}");
    }
    // Weights for a model with fewer layers than the adapter targets.
    let mut small = cfg.clone();
    small.num_layers = 1;
    let err = load(&fixtures().join("alora"), &small).unwrap_err();
    assert!(err.contains("layers"), "{err}");
    // A model whose projections have other shapes.
    let mut wide = cfg.clone();
    wide.hidden_size = 128;
    let err = load(&fixtures().join("alora"), &wide).unwrap_err();
    assert!(err.contains("lora_A"), "{err}");
}

#[test]
fn ibm_invocation_string_is_converted_and_digest_follows_content() {
    let cfg = config();
    let dir = variant("ibm", |c| {
        c.as_object_mut().unwrap().remove("alora_invocation_tokens");
        c["invocation_string"] = json!("<cert>");
    });
    let a = load(&dir, &cfg).unwrap();
    let expect: Vec<u32> = "<cert>".bytes().map(|b| b as u32 % 96).collect();
    assert_eq!(
        a.kind,
        AdapterKind::ALora {
            invocation_tokens: expect
        }
    );
    // Without a tokenizer the conversion cannot happen: refused, never a silent plain LoRA.
    let err = LoraAdapter::load("t", &dir, &cfg, &Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("invocation_string"), "{err}");

    let same = load(&fixtures().join("alora"), &cfg).unwrap();
    let again = load(&fixtures().join("alora"), &cfg).unwrap();
    assert_eq!(same.digest, again.digest, "same files, same digest");
    assert_ne!(same.digest, a.digest, "different config, different digest");
    let plain = load(
        &variant("plain", |c| c["alora_invocation_tokens"] = Value::Null),
        &cfg,
    )
    .unwrap();
    assert_eq!(plain.kind, AdapterKind::Lora);
}

#[test]
fn non_finite_factors_are_refused() {
    let dir = variant("nan", |_| {});
    let w = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    let key = t.keys().find(|k| k.contains("lora_B")).unwrap().clone();
    let b = &t[&key];
    let nan = (b.ones_like().unwrap() * f64::NAN).unwrap();
    t.insert(key, nan);
    candle_core::safetensors::save(&t, &w).unwrap();
    let err = load(&dir, &config()).unwrap_err();
    assert!(err.contains("not finite"), "{err}");
}
