//! The result of a run: a summary in the shape of `vllm bench serve` (same line labels, same
//! JSON key names where they exist), split by request kind and by conversation length, with the
//! prefix-cache hit ratio next to the latencies.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::run::{Record, RunOutput};
use crate::stats::Summary;

/// Service-level objectives for goodput, milliseconds (a request is good if it meets all given).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    /// Parses vLLM's `--goodput` form: `ttft:500 tpot:50 e2el:3000` (any subset).
    pub fn parse(items: &[String]) -> anyhow::Result<Slo> {
        let mut s = Slo::default();
        for it in items {
            let (k, v) = it
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--goodput {it}: expected NAME:MILLISECONDS"))?;
            let v: f64 = v
                .parse()
                .map_err(|_| anyhow::anyhow!("--goodput {it}: {v} is not a number"))?;
            match k {
                "ttft" => s.ttft_ms = Some(v),
                "tpot" => s.tpot_ms = Some(v),
                "e2el" => s.e2el_ms = Some(v),
                _ => anyhow::bail!("--goodput {it}: the names are ttft, tpot and e2el"),
            }
        }
        Ok(s)
    }

    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2el_ms.is_some()
    }

    fn met(&self, r: &Record) -> bool {
        r.out.ok
            && self.ttft_ms.is_none_or(|t| r.out.ttft * 1e3 <= t)
            && self
                .tpot_ms
                .is_none_or(|t| r.tpot().unwrap_or(0.0) * 1e3 <= t)
            && self.e2el_ms.is_none_or(|t| r.out.e2e * 1e3 <= t)
    }
}

/// Latency summaries (milliseconds) and token counts over a set of requests.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Group {
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub total_cached_tokens: usize,
    /// cached / prompt tokens over these requests (`None` if the server reports no cached_tokens).
    pub cache_hit_ratio: Option<f64>,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2el_ms: Summary,
}

impl Group {
    pub fn of<'a>(records: impl IntoIterator<Item = &'a Record>) -> Group {
        let mut g = Group::default();
        let (mut ttft, mut tpot, mut itl, mut e2e) = (vec![], vec![], vec![], vec![]);
        let mut reported_cache = false;
        for r in records {
            if !r.out.ok {
                g.failed += 1;
                continue;
            }
            g.completed += 1;
            g.total_input_tokens += r.out.prompt_tokens;
            g.total_output_tokens += r.out.output_tokens;
            if let Some(c) = r.out.cached_tokens {
                reported_cache = true;
                g.total_cached_tokens += c;
            }
            ttft.push(r.out.ttft);
            e2e.push(r.out.e2e);
            itl.extend_from_slice(&r.out.itl);
            if let Some(t) = r.tpot() {
                tpot.push(t);
            }
        }
        g.cache_hit_ratio = (reported_cache && g.total_input_tokens > 0)
            .then(|| g.total_cached_tokens as f64 / g.total_input_tokens as f64);
        g.ttft_ms = Summary::of(&ttft).scaled(1e3);
        g.tpot_ms = Summary::of(&tpot).scaled(1e3);
        g.itl_ms = Summary::of(&itl).scaled(1e3);
        g.e2el_ms = Summary::of(&e2e).scaled(1e3);
        g
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    /// The command line's settings (workload, load, target), for the record.
    pub settings: serde_json::Value,
    pub duration: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub request_goodput: Option<f64>,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub slo: Slo,
    pub all: Group,
    /// By request kind: `base`, `intrinsic:<adapter>`, `single`, `single:<adapter>`.
    pub by_kind: BTreeMap<String, Group>,
    /// Conversational runs (intrinsics, race): `base` turns and `intrinsic`, every adapter call
    /// together.
    #[serde(default)]
    pub by_role: BTreeMap<String, Group>,
    /// Intrinsic calls (or single requests) by the session's target length.
    pub by_length: BTreeMap<usize, Group>,
    /// Prefix cache over the run from /metrics: hits / queries (tokens), when served.
    pub metrics_prefix_cache_hit_ratio: Option<f64>,
    /// Mean milliseconds per request of the server's phase histograms (`run::PHASE_METRICS`)
    /// over the run, when served.
    #[serde(default)]
    pub server_phases_ms: BTreeMap<String, f64>,
    /// The first few distinct errors, with counts.
    pub errors: BTreeMap<String, usize>,
    pub records: Vec<Record>,
}

fn kind_key(r: &Record) -> String {
    match &r.adapter {
        Some(a) => format!("{}:{a}", r.kind),
        None => r.kind.to_string(),
    }
}

impl Report {
    pub fn new(label: String, settings: serde_json::Value, out: RunOutput, slo: Slo) -> Report {
        let rs = &out.records;
        let all = Group::of(rs);
        let mut by_kind: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        let mut by_length: BTreeMap<usize, Vec<&Record>> = BTreeMap::new();
        let mut by_role: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
        let mut errors = BTreeMap::new();
        for r in rs {
            by_kind.entry(kind_key(r)).or_default().push(r);
            if r.kind == "base" || r.kind == "intrinsic" {
                by_role.entry(r.kind.clone()).or_default().push(r);
            }
            if r.kind != "base" {
                by_length.entry(r.length).or_default().push(r);
            }
            if let Some(e) = &r.out.error {
                let n = errors.len();
                if n < 10 || errors.contains_key(e) {
                    *errors.entry(e.clone()).or_insert(0) += 1;
                }
            }
        }
        let d = out.duration.max(1e-9);
        let good = rs.iter().filter(|r| slo.met(r)).count();
        Report {
            label,
            settings,
            duration: out.duration,
            completed: all.completed,
            failed: all.failed,
            total_input_tokens: all.total_input_tokens,
            total_output_tokens: all.total_output_tokens,
            request_throughput: all.completed as f64 / d,
            request_goodput: slo.is_set().then(|| good as f64 / d),
            output_throughput: all.total_output_tokens as f64 / d,
            total_token_throughput: (all.total_input_tokens + all.total_output_tokens) as f64 / d,
            slo,
            by_kind: by_kind
                .into_iter()
                .map(|(k, v)| (k, Group::of(v)))
                .collect(),
            by_length: by_length
                .into_iter()
                .map(|(k, v)| (k, Group::of(v)))
                .collect(),
            by_role: by_role
                .into_iter()
                .map(|(k, v)| (k, Group::of(v)))
                .collect(),
            all,
            metrics_prefix_cache_hit_ratio: out
                .prefix_cache
                .and_then(|(q, h)| (q > 0.0).then(|| h / q)),
            server_phases_ms: out
                .server_phases
                .iter()
                .map(|(k, v)| (k.clone(), v * 1e3))
                .collect(),
            errors,
            records: out.records,
        }
    }

    /// The human table, `vllm bench serve` style.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "{k:<40} {v:<10}");
        };
        let head = |s: &mut String, t: &str, c: char| {
            let pad = 50usize.saturating_sub(t.chars().count());
            let (l, r) = (pad / 2, pad - pad / 2);
            let c = c.to_string();
            let _ = writeln!(s, "{}{t}{}", c.repeat(l), c.repeat(r));
        };
        head(&mut s, " Serving Benchmark Result ", '=');
        line(&mut s, "Successful requests:", self.completed.to_string());
        if self.failed > 0 {
            line(&mut s, "Failed requests:", self.failed.to_string());
        }
        line(
            &mut s,
            "Benchmark duration (s):",
            format!("{:.2}", self.duration),
        );
        line(
            &mut s,
            "Total input tokens:",
            self.total_input_tokens.to_string(),
        );
        line(
            &mut s,
            "Total generated tokens:",
            self.total_output_tokens.to_string(),
        );
        line(
            &mut s,
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput),
        );
        if let Some(g) = self.request_goodput {
            line(&mut s, "Request goodput (req/s):", format!("{g:.2}"));
        }
        line(
            &mut s,
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_throughput),
        );
        line(
            &mut s,
            "Total Token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput),
        );
        if let Some(r) = self.all.cache_hit_ratio {
            line(
                &mut s,
                "Prompt tokens computed:",
                (self.all.total_input_tokens - self.all.total_cached_tokens).to_string(),
            );
            line(
                &mut s,
                "Prompt tokens cached:",
                self.all.total_cached_tokens.to_string(),
            );
            line(
                &mut s,
                "Prefix cache hit ratio (cached_tokens):",
                format!("{:.2}%", r * 100.0),
            );
        }
        if let Some(r) = self.metrics_prefix_cache_hit_ratio {
            line(
                &mut s,
                "Prefix cache hit ratio (/metrics):",
                format!("{:.2}%", r * 100.0),
            );
        }
        for (name, ms) in &self.server_phases_ms {
            line(
                &mut s,
                &format!(
                    "Server mean {} (ms):",
                    name.split(':').nth(1).unwrap_or(name)
                ),
                format!("{ms:.3}"),
            );
        }
        let lat = |s: &mut String, title: &str, short: &str, m: &Summary| {
            head(s, title, '-');
            line(s, &format!("Mean {short} (ms):"), format!("{:.2}", m.mean));
            line(
                s,
                &format!("Median {short} (ms):"),
                format!("{:.2}", m.median),
            );
            line(s, &format!("P90 {short} (ms):"), format!("{:.2}", m.p90));
            line(s, &format!("P99 {short} (ms):"), format!("{:.2}", m.p99));
        };
        lat(&mut s, "Time to First Token", "TTFT", &self.all.ttft_ms);
        lat(
            &mut s,
            "Time per Output Token (excl. 1st token)",
            "TPOT",
            &self.all.tpot_ms,
        );
        lat(&mut s, "Inter-token Latency", "ITL", &self.all.itl_ms);
        lat(&mut s, "End-to-end Latency", "E2EL", &self.all.e2el_ms);
        if self.by_kind.len() > 1 || self.by_length.len() > 1 {
            head(&mut s, "By request kind", '-');
            let _ = writeln!(
                s,
                "{:<28} {:>5} {:>10} {:>10} {:>10} {:>8}",
                "kind", "n", "TTFT med", "TTFT p90", "E2EL med", "cached"
            );
            // Every adapter call together, when there are calls to more than one adapter.
            let calls = self
                .by_role
                .get("intrinsic")
                .filter(|_| {
                    self.by_kind
                        .keys()
                        .filter(|k| k.starts_with("intrinsic:"))
                        .count()
                        > 1
                })
                .map(|g| ("intrinsic (all adapters)".to_string(), g));
            let rows = self.by_kind.iter().map(|(k, g)| (k.clone(), g));
            for (k, g) in rows.chain(calls) {
                let _ = writeln!(
                    s,
                    "{:<28} {:>5} {:>10.2} {:>10.2} {:>10.2} {:>8}",
                    k,
                    g.completed,
                    g.ttft_ms.median,
                    g.ttft_ms.p90,
                    g.e2el_ms.median,
                    g.cache_hit_ratio
                        .map(|r| format!("{:.1}%", r * 100.0))
                        .unwrap_or_else(|| "n/a".into())
                );
            }
            if self.by_length.len() > 1 {
                head(&mut s, "Non-base requests by length", '-');
                let _ = writeln!(
                    s,
                    "{:<12} {:>5} {:>12} {:>10} {:>10} {:>8}",
                    "length", "n", "prompt tok", "TTFT med", "TTFT p90", "cached"
                );
                for (len, g) in &self.by_length {
                    let _ = writeln!(
                        s,
                        "{:<12} {:>5} {:>12.0} {:>10.2} {:>10.2} {:>8}",
                        len,
                        g.completed,
                        g.total_input_tokens as f64 / g.completed.max(1) as f64,
                        g.ttft_ms.median,
                        g.ttft_ms.p90,
                        g.cache_hit_ratio
                            .map(|r| format!("{:.1}%", r * 100.0))
                            .unwrap_or_else(|| "n/a".into())
                    );
                }
            }
        }
        if !self.errors.is_empty() {
            head(&mut s, "Errors", '-');
            for (e, n) in &self.errors {
                let _ = writeln!(s, "{n:>5}  {e}");
            }
        }
        let _ = writeln!(s, "{}", "=".repeat(50));
        s
    }
}

/// Two conversational runs (the race) side by side: wall time, TTFT percentiles of intrinsic
/// calls and of base turns, prompt tokens computed and cached, and `b / a` for each.
/// Empty unless both runs made intrinsic calls.
pub fn race_table(a: &Report, b: &Report) -> String {
    let mut s = String::new();
    let (Some(ai), Some(bi)) = (a.by_role.get("intrinsic"), b.by_role.get("intrinsic")) else {
        return s;
    };
    let empty = Group::default();
    let (ab, bb) = (
        a.by_role.get("base").unwrap_or(&empty),
        b.by_role.get("base").unwrap_or(&empty),
    );
    let (wa, wb) = (a.label.len().max(12), b.label.len().max(12));
    let _ = writeln!(
        s,
        "{:<30} {:>wa$} {:>wb$} {:>8}",
        "race", a.label, b.label, "b / a"
    );
    let mut row = |name: &str, x: f64, y: f64, prec: usize| {
        let _ = writeln!(
            s,
            "{name:<30} {x:>wa$.prec$} {y:>wb$.prec$} {:>7.2}x",
            y / x
        );
    };
    let computed = |r: &Report| (r.all.total_input_tokens - r.all.total_cached_tokens) as f64;
    row("wall time (s)", a.duration, b.duration, 2);
    row(
        "requests completed",
        a.completed as f64,
        b.completed as f64,
        0,
    );
    row(
        "intrinsic TTFT median (ms)",
        ai.ttft_ms.median,
        bi.ttft_ms.median,
        1,
    );
    row("intrinsic TTFT p90 (ms)", ai.ttft_ms.p90, bi.ttft_ms.p90, 1);
    row("intrinsic TTFT p99 (ms)", ai.ttft_ms.p99, bi.ttft_ms.p99, 1);
    row(
        "base TTFT median (ms)",
        ab.ttft_ms.median,
        bb.ttft_ms.median,
        1,
    );
    row("base TTFT p90 (ms)", ab.ttft_ms.p90, bb.ttft_ms.p90, 1);
    row("prompt tokens computed", computed(a), computed(b), 0);
    row(
        "prompt tokens cached",
        a.all.total_cached_tokens as f64,
        b.all.total_cached_tokens as f64,
        0,
    );
    s
}

/// Median non-base TTFT per length of two runs and their ratio (`slow / fast`): the aLoRA
/// reuse claim, run against the same adapter served as a plain LoRA.
pub fn compare_table(fast: &Report, slow: &Report) -> String {
    let mut s = String::new();
    let (fa, sl) = (
        format!("{} TTFT ms", fast.label),
        format!("{} TTFT ms", slow.label),
    );
    let (wf, ws) = (fa.len().max(12), sl.len().max(12));
    let _ = writeln!(
        s,
        "{:<10} {:>12} {fa:>wf$} {sl:>ws$} {:>10}",
        "length", "prompt tok", "ratio"
    );
    for (len, f) in &fast.by_length {
        let Some(g) = slow.by_length.get(len) else {
            continue;
        };
        let prompt = f.total_input_tokens as f64 / f.completed.max(1) as f64;
        let _ = writeln!(
            s,
            "{:<10} {:>12.0} {:>wf$.2} {:>ws$.2} {:>9.1}x",
            len,
            prompt,
            f.ttft_ms.median,
            g.ttft_ms.median,
            g.ttft_ms.median / f.ttft_ms.median
        );
    }
    s
}
