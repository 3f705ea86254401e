//! Golden tests against transformers + PEFT (fixtures from `tests/fixtures/make_fixtures.py`):
//! tiny random Llama (GQA, tied, llama3 rope) and Granite (GQA 4:1, the four multipliers)
//! models with aLoRA, LoRA (rank/alpha patterns) and rsLoRA adapters, on inputs with the
//! invocation once, twice, absent, at the start and at the end.
//! Every row and position must be within 1e-4 of PEFT's logits, for a single mixed prefill of
//! all cases and for chunked prefill followed by token-by-token decode through block tables.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alora_cache::BlockId;
use alora_model::testing::max_abs_diff;
use alora_model::{ActiveAdapter, AttentionImpl, CausalLm, KvStore, LoraAdapter, SeqStep};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

const TOL: f32 = 1e-4;
const BS: usize = 4;

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
struct Case {
    name: String,
    adapter: Option<String>,
    input_ids: Vec<u32>,
    s: Option<usize>,
}

struct Fixture {
    model: CausalLm,
    adapters: HashMap<String, Arc<LoraAdapter>>,
    cases: Vec<Case>,
    expected: HashMap<String, Tensor>,
}

fn fixture_dir(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(arch)
}

fn load(arch: &str) -> Fixture {
    let dir = fixture_dir(arch);
    let dev = Device::Cpu;
    let model = CausalLm::load_hf(&dir, DType::F32, &dev).unwrap();
    let mut adapters = HashMap::new();
    for name in ["alora", "lora"] {
        let a = LoraAdapter::load(name, &dir.join(name), model.config(), &dev, None).unwrap();
        adapters.insert(name.to_string(), Arc::new(a));
    }
    let g: Golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let expected = candle_core::safetensors::load(dir.join("golden.safetensors"), &dev).unwrap();
    Fixture {
        model,
        adapters,
        cases: g.cases,
        expected,
    }
}

impl Fixture {
    /// The adapter for a case, with its activation start, checked against PEFT's s.
    fn active(&self, c: &Case) -> Option<ActiveAdapter> {
        let a = self.adapters.get(c.adapter.as_deref()?)?.clone();
        let s = a.activation_start(&c.input_ids);
        if a.invocation_tokens().is_some() {
            assert_eq!(s, c.s, "{}: activation start differs from PEFT's", c.name);
        }
        s.map(|activation_start| ActiveAdapter {
            adapter: a,
            activation_start,
        })
    }

    fn expected(&self, i: usize) -> Tensor {
        self.expected[&format!("case{i}")].clone()
    }
}

/// Disjoint, deliberately scattered block tables: sequence i gets blocks i, i + n, i + 2n, ...
fn tables(lens: &[usize]) -> (Vec<Vec<BlockId>>, usize) {
    let n = lens.len();
    let max_blocks = lens.iter().map(|l| l.div_ceil(BS)).max().unwrap();
    let t = (0..n)
        .map(|i| {
            (0..max_blocks)
                .map(|b| BlockId((b * n + i) as u32))
                .collect()
        })
        .collect();
    (t, n * max_blocks)
}

fn full_prefill(arch: &str, attention: AttentionImpl, block: usize) {
    let mut f = load(arch);
    f.model.set_attention(attention);
    f.model.set_attention_block(block);
    let lens: Vec<usize> = f.cases.iter().map(|c| c.input_ids.len()).collect();
    let (tables, nblocks) = tables(&lens);
    let kv = f.model.new_kv_store(nblocks, BS).unwrap();
    let steps: Vec<SeqStep> = f
        .cases
        .iter()
        .zip(&tables)
        .map(|(c, t)| SeqStep {
            tokens: &c.input_ids,
            start_pos: 0,
            adapter: f.active(c),
            block_table: t,
            all_logits: true,
        })
        .collect();
    let out = f.model.forward(&steps, &kv).unwrap();
    for (i, c) in f.cases.iter().enumerate() {
        let d = max_abs_diff(&out.seq(i).unwrap(), &f.expected(i));
        assert!(d <= TOL, "{arch} {}: max |dlogit| {d}", c.name);
    }
}

/// Every case advances together: a 7-token chunk, a 5-token chunk, then one token per step.
fn chunked_then_decode(arch: &str, attention: AttentionImpl) {
    chunked_then_decode_kv(arch, attention, DType::F32, TOL);
}

/// [`chunked_then_decode`] with K/V kept as `kv_dtype`, every case within `tol` of PEFT;
/// returns the largest |dlogit| over the cases.
fn chunked_then_decode_kv(arch: &str, attention: AttentionImpl, kv_dtype: DType, tol: f32) -> f32 {
    let mut f = load(arch);
    f.model.set_attention(attention);
    let lens: Vec<usize> = f.cases.iter().map(|c| c.input_ids.len()).collect();
    let (tables, nblocks) = tables(&lens);
    let kv: KvStore = f.model.new_kv_store_as(nblocks, BS, kv_dtype).unwrap();
    let mut done = vec![0usize; f.cases.len()];
    let mut got: Vec<Vec<Tensor>> = vec![vec![]; f.cases.len()];
    let mut step = 0;
    while done.iter().zip(&lens).any(|(d, l)| d < l) {
        let chunk = match step {
            0 => 7,
            1 => 5,
            _ => 1,
        };
        let mut idx = vec![];
        let mut steps = vec![];
        for (i, c) in f.cases.iter().enumerate() {
            if done[i] == lens[i] {
                continue;
            }
            let end = (done[i] + chunk).min(lens[i]);
            idx.push((i, done[i], end));
            steps.push(SeqStep {
                tokens: &c.input_ids[done[i]..end],
                start_pos: done[i],
                adapter: f.active(c),
                block_table: &tables[i][..end.div_ceil(BS)],
                all_logits: true,
            });
        }
        let out = f.model.forward(&steps, &kv).unwrap();
        for (j, (i, _, end)) in idx.into_iter().enumerate() {
            got[i].push(out.seq(j).unwrap());
            done[i] = end;
        }
        step += 1;
    }
    let mut worst = 0f32;
    for (i, c) in f.cases.iter().enumerate() {
        let all = Tensor::cat(&got[i], 0).unwrap();
        let d = max_abs_diff(&all, &f.expected(i));
        assert!(
            d <= tol,
            "{arch} {} (chunked + decode, K/V {kv_dtype:?}): max |dlogit| {d}",
            c.name
        );
        worst = worst.max(d);
    }
    worst
}

/// `--kv-cache-dtype f16 / bf16`: K/V rounded to half precision as they are written, every
/// other value f32. Logits against PEFT's (f32 K/V) on the golden models, base, aLoRA and
/// LoRA cases, through chunked prefill and decode; the figures are the README's.
#[test]
fn half_precision_kv_stays_close_to_peft() {
    for arch in ["llama", "granite"] {
        for (dt, tol) in [(DType::F16, 2e-3), (DType::BF16, 2e-2)] {
            let d = chunked_then_decode_kv(arch, AttentionImpl::Auto, dt, tol);
            eprintln!("{arch}, K/V {dt:?}: max |dlogit| vs PEFT {d:.2e}");
            assert!(d > 0.0, "{arch} {dt:?}: rounding K/V changed nothing?");
        }
    }
}

#[test]
fn llama_full_prefill_matches_peft() {
    full_prefill("llama", AttentionImpl::Auto, 256);
}

#[test]
fn granite_full_prefill_matches_peft() {
    full_prefill("granite", AttentionImpl::Auto, 256);
}

/// The CPU paged kernel on whole prefills (causal queries within a chunk), not only on the
/// decode-like steps `Auto` gives it.
#[test]
fn paged_attention_matches_peft() {
    full_prefill("llama", AttentionImpl::Paged, 256);
    full_prefill("granite", AttentionImpl::Paged, 256);
}

/// The flash kernel (what `Auto` runs for prefill chunks in f32 on AVX2 / AVX-512 CPUs);
/// skipped on CPUs without AVX2. The 50-token cases span two query blocks and two key tiles.
#[test]
fn flash_attention_matches_peft() {
    if !alora_model::model::flash_available(16) {
        eprintln!("skipped: no AVX2 on this CPU");
        return;
    }
    full_prefill("llama", AttentionImpl::Flash, 256);
    full_prefill("granite", AttentionImpl::Flash, 256);
    chunked_then_decode("llama", AttentionImpl::Flash);
    chunked_then_decode("granite", AttentionImpl::Flash);
}

#[test]
fn reference_attention_matches_peft() {
    full_prefill("llama", AttentionImpl::Reference, 256);
    full_prefill("granite", AttentionImpl::Reference, 256);
    // Query blocks of 3 rows: every case spans several causal blocks.
    full_prefill("llama", AttentionImpl::Reference, 3);
    full_prefill("granite", AttentionImpl::Reference, 3);
}

#[test]
fn llama_chunked_prefill_and_decode_match_peft() {
    chunked_then_decode("llama", AttentionImpl::Auto);
}

#[test]
fn granite_chunked_prefill_and_decode_match_peft() {
    chunked_then_decode("granite", AttentionImpl::Auto);
}

/// K and V at positions < s are bit-identical between an aLoRA run and a base run on the same
/// tokens; at positions >= s they differ (so the comparison can fail).
#[test]
fn kv_before_activation_is_bit_identical_to_base() {
    for arch in ["llama", "granite"] {
        let f = load(arch);
        let c = f.cases.iter().find(|c| c.name == "alora/long").unwrap();
        let s = c.s.unwrap();
        let table: Vec<BlockId> = (0..c.input_ids.len().div_ceil(BS))
            .map(|b| BlockId(b as u32))
            .collect();
        let run = |adapter: Option<ActiveAdapter>| {
            let kv = f.model.new_kv_store(table.len(), BS).unwrap();
            let step = SeqStep {
                tokens: &c.input_ids,
                start_pos: 0,
                adapter,
                block_table: &table,
                all_logits: false,
            };
            f.model.forward(&[step], &kv).unwrap();
            kv
        };
        let base = run(None);
        let adapted = run(f.active(c));
        let cfg = f.model.config();
        for layer in 0..cfg.num_layers {
            let before: Vec<u32> = (0..s as u32).collect();
            let after: Vec<u32> = (s as u32..c.input_ids.len() as u32).collect();
            let (kb, vb) = base.read_slots(layer, &before).unwrap();
            let (ka, va) = adapted.read_slots(layer, &before).unwrap();
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&kb), bits(&ka), "{arch} layer {layer}: K before s");
            assert_eq!(bits(&vb), bits(&va), "{arch} layer {layer}: V before s");
            let (kb2, _) = base.read_slots(layer, &after).unwrap();
            let (ka2, _) = adapted.read_slots(layer, &after).unwrap();
            assert!(
                max_abs_diff(&kb2, &ka2) > 1e-3,
                "{arch} layer {layer}: K after s must be adapted"
            );
        }
    }
}

/// A step run in slices of one layer ([`CausalLm::begin`] / `advance` / `finish`), with whole
/// steps of other sequences on the same store between the slices, gives bit for bit the logits
/// of the same step run whole, and both groups stay within PEFT's logits.
#[test]
fn sliced_step_with_steps_between_matches_whole_step() {
    for arch in ["llama", "granite"] {
        let f = load(arch);
        let lens: Vec<usize> = f.cases.iter().map(|c| c.input_ids.len()).collect();
        let (tables, nblocks) = tables(&lens);
        let steps = |range: std::ops::Range<usize>| -> Vec<SeqStep> {
            range
                .map(|i| SeqStep {
                    tokens: &f.cases[i].input_ids,
                    start_pos: 0,
                    adapter: f.active(&f.cases[i]),
                    block_table: &tables[i],
                    all_logits: true,
                })
                .collect()
        };
        let n = f.cases.len();
        let half = n / 2;
        let whole = {
            let kv = f.model.new_kv_store(nblocks, BS).unwrap();
            f.model.forward(&steps(0..half), &kv).unwrap()
        };

        let kv = f.model.new_kv_store(nblocks, BS).unwrap();
        let mut step = f.model.begin(&steps(0..half), &kv).unwrap();
        let mut between = Vec::new();
        let mut slices = 0;
        loop {
            slices += 1;
            let first = step.layers_done();
            let done = f.model.advance(&mut step, &kv, &mut |l| l > first).unwrap();
            if done {
                break;
            }
            // Another step, on the other sequences, between two layers of this one.
            let i = half + between.len() % (n - half);
            between.push((i, f.model.forward(&steps(i..i + 1), &kv).unwrap()));
        }
        assert_eq!(
            slices,
            f.model.config().num_layers,
            "{arch}: one layer a slice"
        );
        assert!(!between.is_empty());
        let sliced = f.model.finish(step).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(sliced.rows, whole.rows);
        assert_eq!(
            bits(&sliced.logits),
            bits(&whole.logits),
            "{arch}: sliced step differs from the whole one"
        );
        for i in 0..half {
            let d = max_abs_diff(&sliced.seq(i).unwrap(), &f.expected(i));
            assert!(
                d <= TOL,
                "{arch} {} (sliced): max |dlogit| {d}",
                f.cases[i].name
            );
        }
        for (i, out) in &between {
            let d = max_abs_diff(&out.seq(0).unwrap(), &f.expected(*i));
            assert!(
                d <= TOL,
                "{arch} {} (between): max |dlogit| {d}",
                f.cases[*i].name
            );
        }
    }
}

/// A step cannot be finished before its layers have run.
#[test]
fn sliced_step_cannot_finish_early() {
    let f = load("llama");
    let c = &f.cases[0];
    let table: Vec<BlockId> = (0..c.input_ids.len().div_ceil(BS))
        .map(|b| BlockId(b as u32))
        .collect();
    let kv = f.model.new_kv_store(table.len(), BS).unwrap();
    let step = SeqStep {
        tokens: &c.input_ids,
        start_pos: 0,
        adapter: None,
        block_table: &table,
        all_logits: false,
    };
    let mut s = f.model.begin(&[step], &kv).unwrap();
    assert!(!f.model.advance(&mut s, &kv, &mut |_| true).unwrap());
    assert_eq!(s.layers_done(), 0);
    assert!(!f.model.advance(&mut s, &kv, &mut |l| l > 0).unwrap());
    assert_eq!(s.layers_done(), 1);
    assert!(f.model.finish(s).is_err());
}
