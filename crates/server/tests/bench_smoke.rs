//! The load-testing harness (benches/, crate alora-bench) run against the tiny model served
//! in-process: a few requests of every workload, so the harness cannot rot. Full runs are in
//! BENCHMARKS.md, not here.

mod common;

use std::time::Duration;

use alora_bench::{
    AdapterField, Client, Endpoint, Kind, LoadConfig, Report, RunOutput, Slo, Target, Workload,
    WorkloadConfig,
};

async fn target(url: &str, field: AdapterField) -> Target {
    let mut t = Target {
        base_url: url.to_string(),
        api_key: None,
        model: String::new(),
        adapter_field: field,
        ignore_eos: true,
        timeout: Duration::from_secs(120),
        extra_body: Default::default(),
    };
    t.model = Client::new(t.clone()).unwrap().first_model().await.unwrap();
    t
}

fn workload(kind: Kind, adapters: &[&str]) -> WorkloadConfig {
    WorkloadConfig {
        kind,
        endpoint: Endpoint::Chat,
        input_len: 6,
        output_len: 5,
        conversation_lengths: vec![6, 10],
        turns: 2,
        intrinsic_output_len: 2,
        adapters: adapters.iter().map(|s| s.to_string()).collect(),
        seed: 3,
    }
}

fn closed(n: usize, sessions: usize) -> LoadConfig {
    LoadConfig {
        concurrency: Some(n),
        request_rate: None,
        max_concurrency: None,
        num_sessions: Some(sessions),
        duration: None,
        progress: false,
        seed: 1,
        think_time: Duration::ZERO,
    }
}

async fn go(t: &Target, w: WorkloadConfig, l: &LoadConfig) -> RunOutput {
    let out = alora_bench::run(
        Client::new(t.clone()).unwrap(),
        Workload::new(w, None).unwrap(),
        l,
    )
    .await
    .unwrap();
    for r in &out.records {
        assert!(r.out.ok, "request failed: {:?}", r.out.error);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intrinsics_reuse_the_base_turn_as_alora_and_not_as_lora() {
    let s = common::start(common::Opts::default()).await;
    let t = target(&s.url, AdapterField::Model).await;

    // Two conversations, two base turns each, after each turn the aLoRA and a second aLoRA.
    let out = go(
        &t,
        workload(Kind::Intrinsics, &["alora", "alora2"]),
        &closed(2, 2),
    )
    .await;
    assert_eq!(out.records.len(), 2 * 2 * 3);
    let mut intrinsic_calls = 0;
    for r in &out.records {
        assert_eq!(r.out.output_tokens, if r.kind == "base" { 5 } else { 2 });
        assert!(r.out.ttft > 0.0 && r.out.e2e >= r.out.ttft);
        if r.kind == "intrinsic" {
            intrinsic_calls += 1;
            // The base turn this call follows: its prompt's full blocks (size 4) are reused.
            let base = out
                .records
                .iter()
                .filter(|b| b.session == r.session && b.kind == "base" && b.step < r.step)
                .max_by_key(|b| b.step)
                .unwrap();
            let cached = r.out.cached_tokens.expect("alora reports cached_tokens");
            assert!(
                cached >= base.out.prompt_tokens / 4 * 4 && cached < r.out.prompt_tokens,
                "aLoRA call cached {cached} of {}, base prompt {}",
                r.out.prompt_tokens,
                base.out.prompt_tokens
            );
        }
    }
    assert_eq!(intrinsic_calls, 8);
    let prefix = out
        .prefix_cache
        .expect("/metrics has the prefix cache counters");
    assert!(prefix.1 > 0.0 && prefix.1 < prefix.0, "{prefix:?}");
    let alora = Report::new("alora".into(), serde_json::json!({}), out, Slo::default());
    let g = &alora.by_kind["intrinsic:alora"];
    assert_eq!((g.completed, g.failed), (4, 0));
    assert!(g.cache_hit_ratio.unwrap() > 0.5, "{:?}", g.cache_hit_ratio);
    assert_eq!(alora.by_length.len(), 2);
    // The server's phase histograms, as means over the run.
    let mut want = alora_bench::run::PHASE_METRICS.to_vec();
    want.sort();
    let phases: Vec<&str> = alora.server_phases_ms.keys().map(String::as_str).collect();
    assert_eq!(phases, want);
    assert!(alora.server_phases_ms.values().all(|&ms| ms > 0.0));

    // The same conversations with a plain LoRA named in the `adapter` field: the first call
    // on each conversation finds none of the base turn's blocks (at most the chat template's
    // leading tokens both conversations share, 6 here, cached by the other conversation's LoRA
    // call: a block and two rows).
    let t2 = target(&s.url, AdapterField::Adapter).await;
    // With a think time: each request after a conversation's first starts that long after
    // the one before it ended.
    let think = LoadConfig {
        think_time: Duration::from_millis(30),
        ..closed(1, 2)
    };
    let out = go(&t2, workload(Kind::Intrinsics, &["lora"]), &think).await;
    for w in out.records.windows(2) {
        if w[0].session == w[1].session {
            let gap = w[1].start - (w[0].start + w[0].out.e2e);
            assert!(
                gap >= 0.03,
                "{gap} s between steps {} and {}",
                w[0].step,
                w[1].step
            );
        }
    }
    for r in out
        .records
        .iter()
        .filter(|r| r.kind == "intrinsic" && r.step == 1)
    {
        let base = &out.records[out
            .records
            .iter()
            .position(|b| b.session == r.session)
            .unwrap()];
        let cached = r.out.cached_tokens.unwrap();
        assert!(
            cached <= 6 && cached < base.out.prompt_tokens / 4 * 4,
            "LoRA call reused {cached}"
        );
    }
    let slo = Slo::parse(&["ttft:60000".into(), "e2el:60000".into()]).unwrap();
    let lora = Report::new("lora".into(), serde_json::json!({}), out, slo);
    assert_eq!(lora.request_goodput, Some(lora.request_throughput));
    assert!(lora.by_kind["intrinsic:lora"].cache_hit_ratio.unwrap() < g.cache_hit_ratio.unwrap());

    // Report, JSON round trip, comparison and plots.
    let table = alora.table();
    for needle in [
        "Serving Benchmark Result",
        "Median TTFT (ms):",
        "intrinsic:alora2",
        "Prefix cache hit ratio",
        "Server mean request_prefill_time_seconds (ms):",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    let json = serde_json::to_string(&alora).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.records.len(), alora.records.len());
    let cmp = alora_bench::compare_table(&back, &lora);
    assert_eq!(cmp.lines().count(), 3, "{cmp}");
    let dir = common::scratch("plots");
    let files = alora_bench::plot::all(&[back, lora], &dir).unwrap();
    assert_eq!(files.len(), 4, "{files:?}");
    for f in files {
        let svg = std::fs::read_to_string(&f).unwrap();
        assert!(
            svg.starts_with("<svg") && (svg.contains("polyline") || svg.contains("<circle")),
            "{f:?}"
        );
    }
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mixed_workloads_open_and_closed_loop() {
    let s = common::start(common::Opts::default()).await;
    let t = target(&s.url, AdapterField::Model).await;

    // Open loop, all at once, completions endpoint.
    let mut w = workload(Kind::Random, &[]);
    w.endpoint = Endpoint::Completions;
    let open = LoadConfig {
        concurrency: None,
        request_rate: Some(f64::INFINITY),
        max_concurrency: Some(3),
        ..closed(0, 6)
    };
    let out = go(&t, w.clone(), &open).await;
    assert_eq!(out.records.len(), 6);
    let r = Report::new("random".into(), serde_json::json!({}), out, Slo::default());
    assert_eq!(r.total_output_tokens, 6 * 5);
    assert!(r.all.itl_ms.count >= 6 * 4 / 2, "{:?}", r.all.itl_ms);

    // `--extra-body` reaches every request: a structured output that fixes the text.
    let mut ts = t.clone();
    ts.extra_body = serde_json::json!({"structured_outputs": {"regex": "ab"}})
        .as_object()
        .unwrap()
        .clone();
    let out = go(&ts, w, &closed(2, 4)).await;
    assert_eq!(out.records.len(), 4);
    for r in &out.records {
        assert_eq!((r.out.text.as_str(), r.out.output_tokens), ("ab", 2));
    }

    // Poisson arrivals for a duration, mixing the base model and two adapters.
    let mixed = LoadConfig {
        concurrency: None,
        request_rate: Some(20.0),
        num_sessions: None,
        duration: Some(Duration::from_millis(400)),
        ..closed(0, 0)
    };
    let out = go(
        &t,
        workload(Kind::Mixed, &["base", "lora", "alora"]),
        &mixed,
    )
    .await;
    assert!(!out.records.is_empty());
    let r = Report::new("mixed".into(), serde_json::json!({}), out, Slo::default());
    assert!(r.by_kind.contains_key("single"));

    // A failing request is recorded with the server's message, not a panic.
    let out = alora_bench::run(
        Client::new(t.clone()).unwrap(),
        Workload::new(workload(Kind::Mixed, &["no-such-adapter"]), None).unwrap(),
        &closed(1, 1),
    )
    .await
    .unwrap();
    let r = Report::new("bad".into(), serde_json::json!({}), out, Slo::default());
    assert_eq!((r.completed, r.failed), (0, 1));
    let e = r.errors.keys().next().unwrap();
    assert!(
        e.starts_with("HTTP 404") && e.contains("no-such-adapter"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_interleaves_live_conversations() {
    let s = common::start(common::Opts::default()).await;
    let t = target(&s.url, AdapterField::Model).await;

    // Three conversations, two rounds of a base turn and two aLoRA calls, two requests in
    // flight: all three conversations start before any has its second request.
    let mut w = workload(Kind::Race, &["alora", "alora2"]);
    w.conversation_lengths = vec![12];
    let out = go(&t, w.clone(), &closed(2, 3)).await;
    assert_eq!(out.records.len(), 3 * 2 * 3);
    let mut by_start: Vec<_> = out.records.iter().collect();
    by_start.sort_by(|a, b| a.start.total_cmp(&b.start));
    let mut first: Vec<(usize, usize)> =
        by_start[..3].iter().map(|r| (r.session, r.step)).collect();
    first.sort();
    assert_eq!(first, [(0, 0), (1, 0), (2, 0)]);
    for r in &out.records {
        assert_eq!(r.round, r.step / 3, "{r:?}");
        if r.kind == "intrinsic" {
            // Each call finds its conversation's last base turn in the cache, even with the
            // other conversations' requests in between.
            assert!(r.out.cached_tokens.unwrap() > 0, "{r:?}");
        }
    }
    let race = Report::new("race".into(), serde_json::json!({}), out, Slo::default());
    assert_eq!(race.by_role["intrinsic"].completed, 12);
    assert_eq!(race.by_role["base"].completed, 6);
    let table = race.table();
    assert!(table.contains("Prompt tokens computed:"), "{table}");

    // Open loop: conversations arriving as a Poisson process, at most two requests in flight.
    let open = LoadConfig {
        concurrency: None,
        request_rate: Some(50.0),
        max_concurrency: Some(2),
        ..closed(0, 2)
    };
    let out = go(&t, w.clone(), &open).await;
    assert_eq!(out.records.len(), 2 * 2 * 3);
    let other = Report::new("open".into(), serde_json::json!({}), out, Slo::default());
    let cmp = alora_bench::race_table(&race, &other);
    for row in [
        "wall time (s)",
        "intrinsic TTFT p90 (ms)",
        "prompt tokens cached",
    ] {
        assert!(cmp.contains(row), "{row} missing from\n{cmp}");
    }
    // The race counts conversations, not a duration.
    let e = alora_bench::run(
        Client::new(t.clone()).unwrap(),
        Workload::new(w, None).unwrap(),
        &LoadConfig {
            num_sessions: None,
            duration: Some(Duration::from_secs(1)),
            ..closed(1, 0)
        },
    )
    .await
    .err()
    .unwrap();
    assert!(e.to_string().contains("number of conversations"), "{e}");
    assert_eq!(s.blocks_in_use_settled().await, 0.0);
}
