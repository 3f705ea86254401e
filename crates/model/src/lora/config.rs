//! `adapter_config.json`, typed: the one parser and the one set of rules for PEFT LoRA configs,
//! shared by the server's loader ([`super::LoraAdapter::load`]) and the trainer (which reads a
//! config to resume and writes one PEFT loads).
//!
//! Fields alora computes with are typed; everything else is kept in `rest` (so a written config
//! round-trips) and checked against what would change the result if ignored (DoRA, biases,
//! `modules_to_save`, regex patterns, ...): those are refused, never silently dropped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Module;

/// Why a config cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("adapter_config.json: {0}")]
pub struct PeftConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PeftConfigError> {
    Err(PeftConfigError(msg.into()))
}

/// `target_modules`: PEFT takes a list of module names or one regex string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

/// The fields of PEFT's `LoraConfig` that alora reads (PEFT's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    /// Default rank.
    pub r: usize,
    /// Default alpha; PEFT's default is 8, and every config PEFT writes carries it. A config
    /// without one is read with alpha = r (scaling 1), as alora always has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<TargetModules>,
    /// Per-module rank overrides, by module name or dotted suffix.
    #[serde(default, deserialize_with = "null_as_default")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, by module name or dotted suffix.
    #[serde(default, deserialize_with = "null_as_default")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// PEFT's aLoRA: the invocation sequence as token ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alora_invocation_tokens: Option<Vec<u32>>,
    /// IBM's older aLoRA format: the invocation as a string (needs the tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_string: Option<String>,
    /// Every other field, as read (or as PEFT writes it).
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Fields that change the computation when true; alora implements none of them.
const UNSUPPORTED_FLAGS: [&str; 5] = [
    "use_dora",
    "use_qalora",
    "lora_bias",
    "fan_in_fan_out",
    "use_bdlora",
];
/// Fields that change the computation when non-empty.
const UNSUPPORTED_LISTS: [&str; 3] = [
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
];

impl PeftConfig {
    /// Parses and checks an `adapter_config.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, PeftConfigError> {
        let cfg: PeftConfig =
            serde_json::from_slice(bytes).map_err(|e| PeftConfigError(e.to_string()))?;
        cfg.check_supported()?;
        Ok(cfg)
    }

    /// A LoRA (or, with `invocation_tokens`, aLoRA) config as PEFT writes it for a causal LM,
    /// loadable by `PeftModel.from_pretrained`.
    pub fn new(
        r: usize,
        alpha: f64,
        dropout: f64,
        use_rslora: bool,
        targets: &[Module],
        invocation_tokens: Option<Vec<u32>>,
        base_model: &str,
    ) -> Self {
        let mut names: Vec<String> = targets.iter().map(|m| m.name().to_string()).collect();
        names.sort();
        let rest = serde_json::json!({
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "bias": "none",
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "revision": null,
        });
        let Value::Object(rest) = rest else {
            unreachable!("a JSON object literal")
        };
        PeftConfig {
            peft_type: "LORA".into(),
            r,
            lora_alpha: Some(alpha),
            lora_dropout: dropout,
            use_rslora,
            target_modules: Some(TargetModules::Names(names)),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            alora_invocation_tokens: invocation_tokens,
            invocation_string: None,
            rest,
        }
    }

    /// The JSON PEFT reads.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a PeftConfig serializes")
    }

    /// Refuses what alora would otherwise compute differently from PEFT.
    pub fn check_supported(&self) -> Result<(), PeftConfigError> {
        if self.peft_type != "LORA" {
            return err(format!("peft_type `{}` is not LORA", self.peft_type));
        }
        if self.r == 0 {
            return err("`r` must be positive");
        }
        let field = |k: &str| self.rest.get(k).filter(|v| !v.is_null());
        for k in UNSUPPORTED_FLAGS {
            if field(k).is_some_and(|v| v.as_bool() == Some(true)) {
                return err(format!("`{k}` is not supported"));
            }
        }
        if field("bias").is_some_and(|b| b.as_str() != Some("none")) {
            return err("`bias` other than \"none\" is not supported");
        }
        for k in UNSUPPORTED_LISTS {
            if field(k).is_some_and(|v| v != &Value::Array(vec![])) {
                return err(format!("`{k}` is not supported"));
            }
        }
        let keys = self.rank_pattern.keys().map(|k| ("rank_pattern", k));
        let keys = keys.chain(self.alpha_pattern.keys().map(|k| ("alpha_pattern", k)));
        for (field, key) in keys {
            if key.contains(['*', '(', '[', '\\', '^', '$', '|', '+', '?']) {
                return err(format!(
                    "`{field}` key `{key}` is a regex; only module names are supported"
                ));
            }
        }
        if let Some(t) = &self.alora_invocation_tokens {
            if t.is_empty() {
                return err("alora_invocation_tokens is empty");
            }
        }
        Ok(())
    }

    /// The default alpha (alpha = r when the config has none).
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.r as f64)
    }

    /// Rank of the module with dotted name `full_name` (`model.layers.3.self_attn.q_proj`).
    pub fn rank_of(&self, full_name: &str) -> usize {
        pattern_value(&self.rank_pattern, full_name).unwrap_or(self.r)
    }

    /// Scaling of the module with dotted name `full_name`: alpha / r, or alpha / sqrt(r) with
    /// rsLoRA, each from its pattern when one matches.
    pub fn scaling_of(&self, full_name: &str) -> f64 {
        let r = self.rank_of(full_name) as f64;
        let alpha = pattern_value(&self.alpha_pattern, full_name).unwrap_or(self.alpha());
        scaling(alpha, r, self.use_rslora)
    }

    /// The modules `target_modules` names; a regex or an unknown name is an error.
    pub fn targets(&self) -> Result<Vec<Module>, PeftConfigError> {
        match &self.target_modules {
            Some(TargetModules::Names(names)) => names
                .iter()
                .map(|n| {
                    Module::from_name(n)
                        .ok_or_else(|| PeftConfigError(format!("unsupported target `{n}`")))
                })
                .collect(),
            Some(TargetModules::Regex(s)) => {
                err(format!("target_modules `{s}` as a regex is not supported"))
            }
            None => err("no target_modules"),
        }
    }
}

/// PEFT's scaling rule.
pub fn scaling(alpha: f64, r: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }
}

/// PEFT's pattern lookup (`get_pattern_key`): a key matches a module whose dotted name equals
/// it or ends with `.key`. Regex keys are refused by [`PeftConfig::check_supported`].
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, full_name: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(k, _)| full_name == k.as_str() || full_name.ends_with(&format!(".{k}")))
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<PeftConfig, PeftConfigError> {
        PeftConfig::from_json(v.to_string().as_bytes())
    }

    #[test]
    fn what_peft_writes_round_trips() {
        let c = PeftConfig::new(
            8,
            16.0,
            0.05,
            true,
            &[Module::V, Module::Q],
            Some(vec![5, 6]),
            "m",
        );
        let back = parse(c.to_json()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.targets().unwrap(), vec![Module::Q, Module::V]);
        assert_eq!(
            back.scaling_of("model.layers.0.self_attn.q_proj"),
            16.0 / 8f64.sqrt()
        );
        let j = c.to_json();
        assert_eq!(j["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
        assert_eq!(j["alora_invocation_tokens"], serde_json::json!([5, 6]));
        assert!(PeftConfig::new(8, 8.0, 0.0, false, &[Module::Q], None, "m")
            .to_json()
            .get("alora_invocation_tokens")
            .is_none());
    }

    #[test]
    fn patterns_override_by_name_or_dotted_suffix() {
        let c = parse(serde_json::json!({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 8},
            "alpha_pattern": {"v_proj": 2},
        }))
        .unwrap();
        assert_eq!(c.rank_of("model.layers.0.self_attn.q_proj"), 2);
        assert_eq!(c.rank_of("model.layers.1.mlp.down_proj"), 8);
        assert_eq!(c.rank_of("model.layers.0.mlp.down_proj"), 4);
        // Not a suffix at a dot boundary: `xq_proj` is not `q_proj`.
        assert_eq!(c.rank_of("model.layers.0.self_attn.xq_proj"), 4);
        assert_eq!(c.scaling_of("model.layers.0.self_attn.v_proj"), 0.5);
        assert_eq!(c.scaling_of("model.layers.0.self_attn.q_proj"), 4.0);
        // No alpha: alpha = r.
        let c = parse(serde_json::json!({"peft_type": "LORA", "r": 4})).unwrap();
        assert_eq!(c.scaling_of("q_proj"), 1.0);
    }

    #[test]
    fn what_would_change_the_result_is_refused_by_name() {
        let base = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8});
        let cases = [
            ("peft_type", serde_json::json!("IA3"), "not LORA"),
            ("use_dora", serde_json::json!(true), "use_dora"),
            ("fan_in_fan_out", serde_json::json!(true), "fan_in_fan_out"),
            ("bias", serde_json::json!("all"), "bias"),
            (
                "modules_to_save",
                serde_json::json!(["lm_head"]),
                "modules_to_save",
            ),
            ("rank_pattern", serde_json::json!({"^q.*": 2}), "regex"),
            ("alora_invocation_tokens", serde_json::json!([]), "empty"),
            ("r", serde_json::json!(0), "positive"),
        ];
        for (k, v, want) in cases {
            let mut c = base.clone();
            c[k] = v;
            let e = parse(c).unwrap_err().to_string();
            assert!(e.contains(want), "{k}: {e}");
        }
        // Off, null or empty: fine.
        let mut c = base.clone();
        c["use_dora"] = Value::Bool(false);
        c["modules_to_save"] = Value::Null;
        c["layer_replication"] = serde_json::json!([]);
        c["rank_pattern"] = Value::Null;
        c["bias"] = serde_json::json!("none");
        parse(c).unwrap();
        let mut c = base;
        c["target_modules"] = serde_json::json!("q_proj|v_proj");
        assert!(parse(c).unwrap().targets().unwrap_err().0.contains("regex"));
    }
}
