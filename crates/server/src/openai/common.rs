//! What the chat and completion handlers share after validation (`validate.rs`): submission,
//! and one responder ([`respond`]) that streams or collects the choices and leaves only the
//! wire format ([`Wire`]) to each endpoint.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::types::{PromptTokensDetails, UsageOut};
use super::validate::Validated;
use crate::engine::{Event, Finish, ModelInfo, TokenEvent, Usage};
use crate::error::ApiError;
use crate::state::AppState;

/// Submits every prompt's `n` choices, in choice order; seeds differ per choice so choices
/// differ. On a refusal the receivers already made are dropped, which cancels them.
pub fn submit(
    state: &AppState,
    v: &Validated,
    meta: &RequestMeta,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    check_queue_bounds(state, v)?;
    let m = &state.engine.shared().metrics;
    m.preprocess.observe(meta.start.elapsed().as_secs_f64());
    let mut out = Vec::with_capacity(v.prompts.len() * v.n);
    for p in &v.prompts {
        for i in 0..v.n {
            let mut r = p.request.clone();
            if let Some(s) = r.sampling.seed {
                r.sampling.seed = Some(s.wrapping_add(i as u64));
            }
            out.push(state.engine.submit(r)?);
        }
    }
    Ok(out)
}

/// A request larger than the waiting-queue bounds could never be queued whole: a 400 naming
/// the bound, not a 429 its client would retry forever. Each choice (prompts x `n`) is one
/// queued request carrying its prompt's tokens.
fn check_queue_bounds(state: &AppState, v: &Validated) -> Result<(), ApiError> {
    let cfg = state.engine.shared().config();
    // Blame `n` when it multiplies what would fit alone, the prompts otherwise.
    let param = |alone: usize, bound: usize| {
        if v.n > 1 && alone <= bound {
            "n"
        } else {
            v.prompt_field
        }
    };
    let choices = v.prompts.len() * v.n;
    if choices > cfg.max_queue_requests {
        return Err(ApiError::invalid(
            param(v.prompts.len(), cfg.max_queue_requests),
            format!(
                "The request has {choices} choices (prompts x n); the server queues at most {} \
                 requests (--max-queue)",
                cfg.max_queue_requests
            ),
        )
        .with_code("queue_limit_exceeded"));
    }
    let alone: usize = v.prompts.iter().map(|p| p.request.prompt.len()).sum();
    let tokens = alone * v.n;
    if tokens > cfg.max_queue_tokens {
        return Err(ApiError::invalid(
            param(alone, cfg.max_queue_tokens),
            format!(
                "The request queues {tokens} prompt tokens (prompts x n); the server queues at \
                 most {} (--max-queue-tokens)",
                cfg.max_queue_tokens
            ),
        )
        .with_code("queue_limit_exceeded"));
    }
    Ok(())
}

/// How one endpoint writes its responses; [`respond`] does the rest, for both endpoints.
pub trait Wire: Send + Sync + 'static {
    /// Stream payloads before any token (chat: the role deltas; completions: echoes).
    fn opening(&self, choices: usize) -> Vec<String>;
    /// The stream payload of the scored prompt (`Event::Prompt`), if it has one to send.
    fn prompt(&self, _choice: usize, _tokens: Vec<TokenEvent>) -> Option<String> {
        None
    }
    /// The stream payload of a token, if it has one to send.
    fn token(&self, choice: usize, t: TokenEvent) -> Option<String>;
    /// The stream payload that ends a choice: held-back text and the finish reason.
    fn done(&self, choice: usize, text: String, finish: Finish) -> String;
    /// The final stream payload with the usage (`stream_options.include_usage`).
    fn usage(&self, usage: UsageOut) -> String;
    /// The whole (non-streamed) response.
    fn response(&self, choices: Vec<Collected>, usage: UsageOut) -> Response;
}

/// Streams (SSE) or collects the request's choices and writes them with `wire`.
pub async fn respond<W: Wire>(
    state: &AppState,
    v: &Validated,
    rxs: Vec<UnboundedReceiver<Event>>,
    wire: W,
    meta: RequestMeta,
) -> Result<Response, ApiError> {
    let n = v.n;
    if !v.stream {
        let results = collect_all(state, rxs).await?;
        let usages: Vec<Usage> = results.iter().map(|c| c.usage).collect();
        let usage = usage_out(&usages, n);
        meta.log_generation(&v.model_name, &usage, false);
        let mut r = wire.response(results, usage);
        r.extensions_mut().insert(LoggedByResponder);
        return Ok(r);
    }
    let wire = Arc::new(wire);
    let first = wire.opening(rxs.len());
    let (w1, w2, with_usage) = (wire.clone(), wire, v.include_usage);
    let model = v.model_name.clone();
    let st = state.clone();
    let body = spawn_stream(
        rxs,
        state.config.request_timeout,
        move || st.dropped_request(),
        move |i, ev| match ev {
            Event::Prompt(p) => w1.prompt(i, p).into_iter().collect(),
            Event::Token(t) => w1.token(i, t).into_iter().collect(),
            Event::Done { text, finish, .. } => vec![w1.done(i, text, finish)],
            Event::Error(e) => vec![ApiError::from(e).body_json()],
        },
        move |usages| {
            let usage = usage_out(usages, n);
            meta.log_generation(&model, &usage, true);
            match with_usage {
                true => vec![w2.usage(usage)],
                false => vec![],
            }
        },
    );
    let mut r = sse(stream::iter(first).chain(body)).into_response();
    r.extensions_mut().insert(LoggedByResponder);
    Ok(r)
}

/// A request's id (`x-request-id`, given or made) and arrival, for the access log.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    pub id: String,
    pub start: std::time::Instant,
}

/// Marks a response whose access-log line the responder writes (with tokens, at the end of
/// the generation), so the access-log middleware does not write another.
#[derive(Clone, Copy, Debug)]
pub struct LoggedByResponder;

impl RequestMeta {
    /// The access-log line of a generation: never prompt or output text.
    fn log_generation(&self, model: &str, usage: &UsageOut, stream: bool) {
        tracing::info!(
            target: "alora::access",
            request_id = %self.id,
            status = 200,
            model = %model,
            stream,
            prompt_tokens = usage.prompt_tokens,
            cached_tokens = usage.prompt_tokens_details.cached_tokens,
            completion_tokens = usage.completion_tokens,
            latency_ms = self.start.elapsed().as_millis() as u64,
            "generation"
        );
    }
}

/// One finished choice.
pub struct Collected {
    /// The scored prompt, when asked (`Event::Prompt`); else empty.
    pub prompt: Vec<TokenEvent>,
    pub text: String,
    pub tokens: Vec<TokenEvent>,
    pub finish: Finish,
    pub usage: Usage,
}

/// One choice's events until its end; `None` if the stream ended without one (the engine
/// dropped the request).
async fn collect(mut rx: UnboundedReceiver<Event>) -> Option<Result<Collected, ApiError>> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut prompt = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Prompt(p) => prompt = p,
            Event::Token(t) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Event::Done {
                text: rest,
                finish,
                usage,
            } => {
                text.push_str(&rest);
                return Some(Ok(Collected {
                    prompt,
                    text,
                    tokens,
                    finish,
                    usage,
                }));
            }
            Event::Error(e) => return Some(Err(e.into())),
        }
    }
    None
}

/// Usage of a request's choices, `n` per prompt: each prompt counted once.
pub fn usage_out(usages: &[Usage], n: usize) -> UsageOut {
    let prompts = usages.chunks(n.max(1));
    let prompt: usize = prompts.clone().map(|c| c[0].prompt_tokens).sum();
    let cached: usize = prompts.map(|c| c[0].cached_tokens).sum();
    let completion: usize = usages.iter().map(|u| u.completion_tokens).sum();
    UsageOut {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// Collects every choice, within the server's request timeout.
pub async fn collect_all(
    state: &AppState,
    rxs: Vec<UnboundedReceiver<Event>>,
) -> Result<Vec<Collected>, ApiError> {
    let all = futures::future::join_all(rxs.into_iter().map(collect));
    let results = match state.config.request_timeout {
        Some(t) => tokio::time::timeout(t, all)
            .await
            .map_err(|_| ApiError::timeout())?,
        None => all.await,
    };
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(state.dropped_request())))
        .collect()
}

/// Events of all choices, tagged with the choice index, as they come.
pub fn merged(rxs: Vec<UnboundedReceiver<Event>>) -> impl Stream<Item = (usize, Event)> {
    stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        UnboundedReceiverStream::new(rx)
            .map(move |e| (i, e))
            .boxed()
    }))
}

/// Turns chunk JSON strings into an SSE response ending with `data: [DONE]`.
pub fn sse<S>(chunks: S) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    S: Stream<Item = String> + Send + 'static,
{
    let events = chunks
        .map(|c| Ok(SseEvent::default().data(c)))
        .chain(stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }));
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Token text for logprobs: the tokenizer's piece, bytes for clients that rebuild UTF-8.
pub fn token_text(info: &ModelInfo, id: u32) -> (String, Vec<u8>) {
    let s = info.tokenizer.decode(&[id], false).unwrap_or_default();
    (s, info.token_bytes(id).to_vec())
}

/// The `token` strings of a choice's sampled tokens: each token's share of the output text
/// (what was released when it was sampled; the text held back to the end goes to the last),
/// so they join exactly to `content`, also where a character spans tokens (the first gets "",
/// the one completing it the character) or a stop string was cut. `bytes` carry each token's
/// own bytes.
pub fn token_strings(tokens: &[TokenEvent], content: &str) -> Vec<String> {
    let mut out: Vec<String> = tokens.iter().map(|t| t.text.clone()).collect();
    let released: usize = out.iter().map(String::len).sum();
    if let (Some(last), Some(rest)) = (out.last_mut(), content.get(released..)) {
        last.push_str(rest);
    }
    out
}

/// Runs a request's event streams on a task that turns them into SSE payloads. The task ends
/// (dropping the engine receivers, which cancels the request and frees its blocks) as soon as
/// the client goes away, even while the request is still queued.
pub fn spawn_stream<F, G, D>(
    rxs: Vec<UnboundedReceiver<Event>>,
    timeout: Option<std::time::Duration>,
    dropped: D,
    mut on_event: F,
    finale: G,
) -> impl Stream<Item = String> + Send + 'static
where
    F: FnMut(usize, Event) -> Vec<String> + Send + 'static,
    G: FnOnce(&[Usage]) -> Vec<String> + Send + 'static,
    D: FnOnce() -> ApiError + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let n = rxs.len();
    tokio::spawn(async move {
        let mut events = merged(rxs);
        let mut usages = vec![Usage::default(); n];
        let mut open = n;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        while open > 0 {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    let _ = tx.send(ApiError::timeout().body_json()).await;
                    return;
                }
                e = events.next() => e,
            };
            let Some((i, ev)) = next else { break };
            let is_end = matches!(ev, Event::Done { .. } | Event::Error(_));
            if let Event::Done { usage, .. } = &ev {
                usages[i] = *usage;
            }
            let failed = matches!(ev, Event::Error(_));
            for payload in on_event(i, ev) {
                if tx.send(payload).await.is_err() {
                    return;
                }
            }
            if failed {
                return;
            }
            if is_end {
                open -= 1;
            }
        }
        if open > 0 {
            // A choice's events ended without its end: say so rather than end the stream as
            // if it had finished.
            let _ = tx.send(dropped().body_json()).await;
            return;
        }
        for payload in finale(&usages) {
            if tx.send(payload).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
