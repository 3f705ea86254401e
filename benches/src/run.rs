//! The load driver: closed loop (N sessions in flight) or open loop (sessions arrive as a
//! Poisson process), for a number of sessions or a duration.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};

use crate::client::{metric_sum, Client, Outcome};
use crate::workload::{Endpoint, Kind, Session, Step, Workload};

#[derive(Debug, Clone, Serialize)]
pub struct LoadConfig {
    /// Closed loop: this many sessions in flight at all times.
    pub concurrency: Option<usize>,
    /// Open loop: sessions per second (Poisson arrivals); infinity sends them all at once.
    pub request_rate: Option<f64>,
    /// Open loop: at most this many sessions in flight (later arrivals wait).
    pub max_concurrency: Option<usize>,
    /// Stop after this many sessions...
    pub num_sessions: Option<usize>,
    /// ...or stop starting sessions after this long (in-flight ones finish).
    pub duration: Option<Duration>,
    pub progress: bool,
    pub seed: u64,
    /// A pause before each request that follows another in its conversation (a user or an
    /// agent reading the reply), not timed; zero by default.
    pub think_time: Duration,
}

/// One request's measurements, as saved in the JSON result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub session: usize,
    pub step: usize,
    /// The conversation's round: its base turn and the intrinsic calls after it (0 first).
    #[serde(default)]
    pub round: usize,
    /// `base` (a conversation turn), `intrinsic` (an adapter call on the conversation) or
    /// `single` (random and mixed workloads).
    pub kind: String,
    pub adapter: Option<String>,
    /// The session's target length (tokens): the conversation or prompt length it was made for.
    pub length: usize,
    /// Seconds from the start of the run to the request being sent.
    pub start: f64,
    #[serde(flatten)]
    pub out: Outcome,
}

impl Record {
    /// Time per output token after the first, seconds.
    pub fn tpot(&self) -> Option<f64> {
        let o = &self.out;
        (o.ok && o.output_tokens > 1).then(|| (o.e2e - o.ttft) / (o.output_tokens - 1) as f64)
    }
}

pub struct RunOutput {
    pub records: Vec<Record>,
    pub duration: f64,
    /// Prefix-cache counters from /metrics: (queries, hits) over the run, when served.
    pub prefix_cache: Option<(f64, f64)>,
    /// Mean seconds per request of the server's phase histograms over the run, by name
    /// (alora's `alora:request_preprocess_seconds`, vLLM's queue and prefill times), when
    /// served.
    pub server_phases: Vec<(String, f64)>,
}

/// The phase histograms a server may export (alora; vLLM has the last two).
pub const PHASE_METRICS: [&str; 3] = [
    "alora:request_preprocess_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
];

struct Shared {
    client: Client,
    workload: Mutex<Workload>,
    records: Mutex<Vec<Record>>,
    t0: Instant,
    deadline: Option<Instant>,
    remaining: Mutex<Option<usize>>,
    bar: ProgressBar,
    think_time: Duration,
}

impl Shared {
    /// The next session to run, unless the count or the duration is used up.
    fn take(&self) -> Option<Session> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        {
            let mut r = self.remaining.lock().unwrap();
            if let Some(n) = r.as_mut() {
                if *n == 0 {
                    return None;
                }
                *n -= 1;
            }
        }
        self.workload.lock().unwrap().next_session()
    }
}

/// A conversation between its requests: its session, the messages so far and its next step.
struct Live {
    session: Session,
    conv: Vec<Value>,
    next: usize,
    round: usize,
}

impl Live {
    fn new(session: Session) -> Live {
        Live {
            conv: session.prefix.clone(),
            session,
            next: 0,
            round: 0,
        }
    }

    fn done(&self) -> bool {
        self.next >= self.session.steps.len()
    }
}

/// Sends the conversation's next request and records it; false if it failed (a conversation
/// cannot go on without the failed turn's answer).
async fn run_step(sh: &Shared, live: &mut Live) -> bool {
    let i = live.next;
    if i > 0 && !sh.think_time.is_zero() {
        tokio::time::sleep(sh.think_time).await;
    }
    let s = &live.session;
    let conv = &mut live.conv;
    let start = sh.t0.elapsed().as_secs_f64();
    let (kind, adapter, out) = match &s.steps[i] {
        Step::Base { user, max_tokens } => {
            if i > 0 {
                live.round += 1;
            }
            conv.push(json!({"role": "user", "content": user}));
            let out = sh.client.chat(conv, None, *max_tokens).await;
            conv.push(json!({"role": "assistant", "content": out.text}));
            ("base", None, out)
        }
        Step::Intrinsic {
            adapter,
            max_tokens,
        } => {
            let out = sh.client.intrinsic(conv, adapter, *max_tokens).await;
            ("intrinsic", Some(adapter.clone()), out)
        }
        Step::Single {
            text,
            adapter,
            endpoint,
            max_tokens,
        } => {
            let out = match endpoint {
                Endpoint::Chat => {
                    let m = [json!({"role": "user", "content": text})];
                    sh.client.chat(&m, adapter.as_deref(), *max_tokens).await
                }
                Endpoint::Completions => {
                    sh.client
                        .completion(text, adapter.as_deref(), *max_tokens)
                        .await
                }
            };
            ("single", adapter.clone(), out)
        }
    };
    let ok = out.ok;
    let rec = Record {
        session: s.id,
        step: i,
        round: live.round,
        kind: kind.to_string(),
        adapter,
        length: s.length,
        start,
        out,
    };
    let n = {
        let mut r = sh.records.lock().unwrap();
        r.push(rec);
        r.len()
    };
    sh.bar.set_message(format!("{n} requests"));
    live.next = if ok { i + 1 } else { s.steps.len() };
    ok
}

/// Runs a session's steps back to back.
async fn run_session(sh: &Shared, s: Session) {
    let mut live = Live::new(s);
    while !live.done() {
        run_step(sh, &mut live).await;
    }
    sh.bar.inc(1);
}

/// The race's queue: conversations ready for their next request, oldest first.
struct Ready {
    queue: Mutex<VecDeque<Live>>,
    /// Conversations not finished (queued, in flight, or yet to arrive).
    unfinished: AtomicUsize,
    changed: Notify,
}

/// A race worker: takes the conversation at the front, sends its next request, and puts it at
/// the back, until every conversation is finished.
async fn race_worker(sh: &Shared, ready: &Ready) {
    loop {
        let changed = ready.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let next = ready.queue.lock().unwrap().pop_front();
        match next {
            Some(mut live) => {
                run_step(sh, &mut live).await;
                if live.done() {
                    sh.bar.inc(1);
                    ready.unfinished.fetch_sub(1, Ordering::SeqCst);
                } else {
                    ready.queue.lock().unwrap().push_back(live);
                }
                ready.changed.notify_waiters();
            }
            None if ready.unfinished.load(Ordering::SeqCst) == 0 => return,
            None => changed.await,
        }
    }
}

/// The race: `n` sessions, all live at once, request by request over `workers` workers.
/// Closed loop: every conversation is ready at the start. Open loop (`gap`): conversations
/// arrive as a Poisson process.
async fn race(
    sh: Arc<Shared>,
    n: usize,
    workers: usize,
    gap: Option<(Exp<f64>, u64)>,
) -> anyhow::Result<()> {
    let ready = Arc::new(Ready {
        queue: Mutex::new(VecDeque::new()),
        unfinished: AtomicUsize::new(n),
        changed: Notify::new(),
    });
    let mut sessions = Vec::with_capacity(n);
    while let Some(s) = sh.take() {
        sessions.push(s);
    }
    // A dataset may hold fewer conversations than asked for.
    ready
        .unfinished
        .fetch_sub(n - sessions.len(), Ordering::SeqCst);
    let tasks: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let (sh, ready) = (sh.clone(), ready.clone());
            tokio::spawn(async move { race_worker(&sh, &ready).await })
        })
        .collect();
    let mut rng = gap.map(|(_, seed)| rand::rngs::StdRng::seed_from_u64(seed));
    for s in sessions {
        ready.queue.lock().unwrap().push_back(Live::new(s));
        ready.changed.notify_waiters();
        if let (Some((g, _)), Some(rng)) = (&gap, rng.as_mut()) {
            tokio::time::sleep(Duration::from_secs_f64(g.sample(rng))).await;
        }
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

fn bar(cfg: &LoadConfig) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    // With a session count the bar fills; with a duration it counts up.
    let (b, tmpl) = match cfg.num_sessions {
        Some(n) => (
            ProgressBar::new(n as u64),
            "{elapsed_precise} [{bar:40}] {pos}/{len} sessions, {msg}",
        ),
        None => (
            ProgressBar::no_length(),
            "{elapsed_precise} {spinner} {pos} sessions, {msg}",
        ),
    };
    b.set_style(
        ProgressStyle::with_template(tmpl)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

pub async fn run(
    client: Client,
    workload: Workload,
    cfg: &LoadConfig,
) -> anyhow::Result<RunOutput> {
    if cfg.num_sessions.is_none() && cfg.duration.is_none() {
        anyhow::bail!("give a number of sessions or a duration");
    }
    let race_n = match (workload.kind(), cfg.num_sessions) {
        (Kind::Race, None) => anyhow::bail!("the race workload needs a number of conversations"),
        (Kind::Race, Some(n)) => Some(n),
        _ => None,
    };
    let before = client.metrics().await;
    let t0 = Instant::now();
    let sh = Arc::new(Shared {
        client,
        workload: Mutex::new(workload),
        records: Mutex::new(Vec::new()),
        t0,
        deadline: cfg.duration.map(|d| t0 + d),
        remaining: Mutex::new(cfg.num_sessions),
        bar: bar(cfg),
        think_time: cfg.think_time,
    });
    let arrivals = |rate: f64| -> anyhow::Result<Option<Exp<f64>>> {
        Ok((rate.is_finite() && rate > 0.0)
            .then(|| Exp::new(rate))
            .transpose()?)
    };
    match (cfg.concurrency, cfg.request_rate, race_n) {
        (Some(_), Some(_), _) => {
            anyhow::bail!("choose closed loop (concurrency) or open loop (rate)")
        }
        (None, None, _) => anyhow::bail!("give a concurrency or a request rate"),
        (Some(c), None, Some(n)) => race(sh.clone(), n, c, None).await?,
        (None, Some(rate), Some(n)) => {
            let gap = arrivals(rate)?.map(|g| (g, cfg.seed ^ 0x9e37_79b9));
            race(sh.clone(), n, cfg.max_concurrency.unwrap_or(n), gap).await?
        }
        (Some(n), None, None) => {
            let workers: Vec<_> = (0..n.max(1))
                .map(|_| {
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        while let Some(s) = sh.take() {
                            run_session(&sh, s).await;
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await?;
            }
        }
        (None, Some(rate), None) => {
            let limit = Arc::new(Semaphore::new(
                cfg.max_concurrency.unwrap_or(Semaphore::MAX_PERMITS),
            ));
            let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x9e37_79b9);
            let gap = arrivals(rate)?;
            let mut tasks = Vec::new();
            while let Some(s) = sh.take() {
                let permit = limit.clone().acquire_owned().await?;
                let sh2 = sh.clone();
                tasks.push(tokio::spawn(async move {
                    run_session(&sh2, s).await;
                    drop(permit);
                }));
                if let Some(g) = &gap {
                    tokio::time::sleep(Duration::from_secs_f64(g.sample(&mut rng))).await;
                }
            }
            for t in tasks {
                t.await?;
            }
        }
    }
    let duration = t0.elapsed().as_secs_f64();
    sh.bar.finish_and_clear();
    let after = sh.client.metrics().await;
    let (prefix_cache, server_phases) = match (before, after) {
        (Some(b), Some(a)) => {
            let d = |name: &str| Some(metric_sum(&a, name)? - metric_sum(&b, name)?);
            let phases = PHASE_METRICS
                .iter()
                .filter_map(|m| {
                    let (sum, n) = (d(&format!("{m}_sum"))?, d(&format!("{m}_count"))?);
                    (n > 0.0).then(|| (m.to_string(), sum / n))
                })
                .collect();
            (
                d("vllm:prefix_cache_queries").zip(d("vllm:prefix_cache_hits")),
                phases,
            )
        }
        _ => (None, Vec::new()),
    };
    let mut records = std::mem::take(&mut *sh.records.lock().unwrap());
    records.sort_by_key(|r| (r.session, r.step));
    Ok(RunOutput {
        records,
        duration,
        prefix_cache,
        server_phases,
    })
}
