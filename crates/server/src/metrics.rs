//! Prometheus metrics, under vLLM's names where vLLM has one (so routers and dashboards built
//! for vLLM read them), plus alora's own. Counters get `_total` appended on export.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value escaped as the Prometheus text format requires (`\\`, `\"`, `\n`):
/// prometheus-client writes `String` values raw, so a client-chosen adapter name could
/// otherwise end the label and forge lines in the scrape.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LabelValue(pub String);

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        LabelValue(s)
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabel {
    pub adapter: LabelValue,
}

/// A request field name (`alora:ignored_request_fields`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FieldLabel {
    pub field: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoraInfoLabels {
    pub running_lora_adapters: LabelValue,
    pub waiting_lora_adapters: LabelValue,
    pub max_lora: String,
}

pub struct Metrics {
    registry: Registry,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub kv_cache_usage_perc: Gauge<f64, AtomicU64>,
    pub kv_blocks_in_use: Gauge,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub adapter_tokens_from_base_blocks: Counter,
    /// Turn-end tokens computed ahead after finished chat replies.
    pub turn_end_tokens: Counter,
    /// Long prefills' steps run in slices of layers (`EngineConfig::prefill_slice`).
    pub sliced_prefill_steps: Counter,
    /// Times such a step stopped between layers so that short work could run.
    pub sliced_prefill_yields: Counter,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub num_preemptions: Counter,
    pub ttft: Histogram,
    /// HTTP arrival to the engine: body, validation, chat template, tokenization.
    pub preprocess: Histogram,
    /// Engine arrival to first admission (vLLM's queue time).
    pub queue_time: Histogram,
    /// First admission to the first token (vLLM's prefill time).
    pub prefill_time: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub lora_requests_info: Family<LoraInfoLabels, Gauge>,
    pub adapter_requests: Family<AdapterLabel, Counter>,
    pub rejected_requests: Counter,
    pub step_retries: Counter,
    pub step_failed_requests: Counter,
    pub ignored_fields: crate::openai::fields::IgnoredFields,
}

/// For what takes well under a millisecond when idle (preprocessing, queueing).
fn short_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0,
    ]
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            num_requests_running: Gauge::default(),
            num_requests_waiting: Gauge::default(),
            kv_cache_usage_perc: Gauge::default(),
            kv_blocks_in_use: Gauge::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            adapter_tokens_from_base_blocks: Counter::default(),
            turn_end_tokens: Counter::default(),
            sliced_prefill_steps: Counter::default(),
            sliced_prefill_yields: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            num_preemptions: Counter::default(),
            ttft: Histogram::new(latency_buckets()),
            preprocess: Histogram::new(short_buckets()),
            queue_time: Histogram::new(short_buckets()),
            prefill_time: Histogram::new(latency_buckets()),
            itl: Histogram::new(latency_buckets()),
            e2e: Histogram::new(latency_buckets()),
            lora_requests_info: Family::default(),
            adapter_requests: Family::default(),
            rejected_requests: Counter::default(),
            step_retries: Counter::default(),
            step_failed_requests: Counter::default(),
            ignored_fields: Default::default(),
            registry: Registry::default(),
        };
        r.register(
            "vllm:num_requests_running",
            "Requests in the running batch",
            m.num_requests_running.clone(),
        );
        r.register(
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled",
            m.num_requests_waiting.clone(),
        );
        r.register(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV blocks in use (1 = full)",
            m.kv_cache_usage_perc.clone(),
        );
        r.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queries.clone(),
        );
        r.register(
            "vllm:prefix_cache_hits",
            "Prompt tokens served from the prefix cache",
            m.prefix_cache_hits.clone(),
        );
        r.register(
            "vllm:prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        r.register(
            "vllm:generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "vllm:num_preemptions",
            "Sequences preempted (recomputed later)",
            m.num_preemptions.clone(),
        );
        r.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token",
            m.ttft.clone(),
        );
        r.register(
            "vllm:request_queue_time_seconds",
            "Time from arrival at the engine to first admission",
            m.queue_time.clone(),
        );
        r.register(
            "vllm:request_prefill_time_seconds",
            "Time from first admission to the first token",
            m.prefill_time.clone(),
        );
        r.register(
            "alora:request_preprocess_seconds",
            "Time from HTTP arrival to the engine (body, validation, chat template, tokenization)",
            m.preprocess.clone(),
        );
        r.register(
            "vllm:inter_token_latency_seconds",
            "Time between tokens",
            m.itl.clone(),
        );
        r.register(
            "vllm:e2e_request_latency_seconds",
            "Request latency",
            m.e2e.clone(),
        );
        r.register(
            "vllm:lora_requests_info",
            "Running and waiting adapters",
            m.lora_requests_info.clone(),
        );
        r.register(
            "alora:kv_blocks_in_use",
            "KV blocks held by requests",
            m.kv_blocks_in_use.clone(),
        );
        r.register(
            "alora:adapter_tokens_from_base_blocks",
            "Prompt tokens of adapter requests served from base-model KV blocks",
            m.adapter_tokens_from_base_blocks.clone(),
        );
        r.register(
            "alora:turn_end_tokens",
            "Chat template turn-end tokens computed ahead after finished replies",
            m.turn_end_tokens.clone(),
        );
        r.register(
            "alora:sliced_prefill_steps",
            "Long prefills' steps run in slices of layers with short steps between them",
            m.sliced_prefill_steps.clone(),
        );
        r.register(
            "alora:sliced_prefill_yields",
            "Times a sliced prefill step stopped between layers for short work",
            m.sliced_prefill_yields.clone(),
        );
        r.register(
            "alora:adapter_requests",
            "Requests per adapter (base for none)",
            m.adapter_requests.clone(),
        );
        r.register(
            "alora:rejected_requests",
            "Requests refused with 429 (queue full)",
            m.rejected_requests.clone(),
        );
        r.register(
            "alora:step_retries",
            "Batched forwards that failed and were re-run one sequence at a time",
            m.step_retries.clone(),
        );
        r.register(
            "alora:step_failed_requests",
            "Requests failed because their own forward failed",
            m.step_failed_requests.clone(),
        );
        r.register(
            "alora:ignored_request_fields",
            "Request fields accepted and ignored (unknown to alora, or a no-op value), by name",
            m.ignored_fields.counter.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_cannot_forge_lines() {
        let m = Metrics::new();
        let name = "x\"} 1\nfake_metric{a=\"b\\";
        m.adapter_requests
            .get_or_create(&AdapterLabel {
                adapter: name.to_string().into(),
            })
            .inc();
        let out = m.render();
        assert!(!out.lines().any(|l| l.starts_with("fake_metric")), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("alora:adapter_requests_total{"))
            .expect("the counter is exported");
        assert_eq!(
            line,
            r#"alora:adapter_requests_total{adapter="x\"} 1\nfake_metric{a=\"b\\"} 1"#
        );
    }
}
