//! The trainer against the reference: the training forward reproduces the model crate's PEFT
//! golden logits, and one batch's loss and every LoRA gradient match PEFT + torch
//! (tests/fixtures/make_train_fixtures.py) within 1e-4 relative.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use alora_model::CausalLm;
use alora_trainer::{batch_gradients, AdapterUse, Example, LoraParams, TrainModel};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn train_model(arch: &str) -> TrainModel {
    let m = CausalLm::load_hf(&models().join(arch), DType::F32, &Device::Cpu).unwrap();
    TrainModel::new(&m).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[derive(Deserialize)]
struct GoldenCase {
    name: String,
    adapter: Option<String>,
    input_ids: Vec<u32>,
    s: Option<usize>,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<GoldenCase>,
}

/// Every golden case (base, LoRA, aLoRA with the invocation once, twice, absent) through the
/// training forward in one chunk, and for aLoRA also split at s as training runs it.
#[test]
fn training_forward_matches_peft_logits() {
    for arch in ["llama", "granite"] {
        let dir = models().join(arch);
        let model = train_model(arch);
        let dev = Device::Cpu;
        let params: HashMap<&str, LoraParams> = ["alora", "lora"]
            .into_iter()
            .filter_map(|n| {
                // The llama LoRA fixture uses rank/alpha patterns, which the trainer refuses.
                LoraParams::load(&dir.join(n), model.config(), &dev)
                    .ok()
                    .map(|p| (n, p))
            })
            .collect();
        assert!(
            params.contains_key("alora"),
            "{arch}: alora fixture must load"
        );
        let g: Golden =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let expected =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &dev).unwrap();
        let mut checked = 0;
        for (i, c) in g.cases.iter().enumerate() {
            let want = &expected[&format!("case{i}")];
            let ids = &c.input_ids;
            let got = match c.adapter.as_deref().and_then(|a| params.get(a)) {
                _ if c.adapter.is_none() => {
                    let (h, _) = model.forward(ids, None, None).unwrap();
                    model.logits(&h).unwrap()
                }
                None => continue,
                Some(p) if p.spec.invocation_tokens.is_none() => {
                    let ad = AdapterUse::all_rows(p, ids.len(), &dev).unwrap();
                    model
                        .logits(&model.forward(ids, None, Some(&ad)).unwrap().0)
                        .unwrap()
                }
                Some(p) => match c.s {
                    None => model
                        .logits(&model.forward(ids, None, None).unwrap().0)
                        .unwrap(),
                    Some(s) => {
                        // One chunk with the row mask...
                        let ad = AdapterUse::from_position(p, 0, ids.len(), s, &dev).unwrap();
                        let full = model
                            .logits(&model.forward(ids, None, Some(&ad)).unwrap().0)
                            .unwrap();
                        let d = max_abs(&(&full - want).unwrap());
                        assert!(d <= 1e-4, "{arch}/{}: one chunk off by {d}", c.name);
                        // ...and split at s: base prefix, adapted suffix.
                        let ad = AdapterUse::all_rows(p, ids.len() - s, &dev).unwrap();
                        let h = if s > 0 {
                            let (hp, past) = model.forward(&ids[..s], None, None).unwrap();
                            let (hs, _) = model.forward(&ids[s..], Some(&past), Some(&ad)).unwrap();
                            Tensor::cat(&[&hp, &hs], 0).unwrap()
                        } else {
                            model.forward(ids, None, Some(&ad)).unwrap().0
                        };
                        model.logits(&h).unwrap()
                    }
                },
            };
            let d = max_abs(&(&got - want).unwrap());
            assert!(d <= 1e-4, "{arch}/{}: max |dlogit| {d}", c.name);
            checked += 1;
        }
        assert!(checked >= 5, "{arch}: only {checked} cases checked");
    }
}

#[derive(Deserialize)]
struct ParityCase {
    model: String,
    adapter: String,
    examples: Vec<ExampleJson>,
    loss: f64,
}

#[derive(Deserialize)]
struct ExampleJson {
    ids: Vec<u32>,
    adapter_start: usize,
    target_start: usize,
}

/// From the same adapter weights, on the same batch, dropout off: the loss and the gradient of
/// every A and B equal PEFT's within 1e-4 relative (to the largest |reference gradient| of that
/// tensor), and every one of them is non-zero.
#[test]
fn first_step_loss_and_gradients_match_peft() {
    let meta: HashMap<String, ParityCase> =
        serde_json::from_str(&std::fs::read_to_string(here().join("parity.json")).unwrap())
            .unwrap();
    assert_eq!(meta.len(), 3);
    for (case, c) in &meta {
        let model = train_model(&c.model);
        let dev = Device::Cpu;
        let params = LoraParams::load(
            &models().join(&c.model).join(&c.adapter),
            model.config(),
            &dev,
        )
        .unwrap();
        let exs: Vec<Example> = c
            .examples
            .iter()
            .map(|e| Example {
                ids: e.ids.clone(),
                adapter_start: e.adapter_start,
                target_start: e.target_start,
            })
            .collect();
        let refs: Vec<&Example> = exs.iter().collect();
        let (loss, grads) = batch_gradients(&model, &params, &refs, None).unwrap();
        assert!(
            ((loss - c.loss) / c.loss).abs() <= 1e-4,
            "{case}: loss {loss} vs PEFT {}",
            c.loss
        );
        let want =
            candle_core::safetensors::load(here().join(format!("parity_{case}.safetensors")), &dev)
                .unwrap();
        let named = params.named();
        assert_eq!(named.len(), want.len(), "{case}: parameter count");
        for ((name, _), g) in named.iter().zip(&grads) {
            let w = want
                .get(name)
                .unwrap_or_else(|| panic!("{case}: PEFT has no {name}"));
            let scale = max_abs(w);
            assert!(
                scale > 0.0 && max_abs(g) > 0.0,
                "{case}: {name} has a zero gradient"
            );
            let d = max_abs(&(g - w).unwrap());
            assert!(
                d <= 1e-4 * scale,
                "{case}: {name} off by {d} (scale {scale})"
            );
        }
    }
}
