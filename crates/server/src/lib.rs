//! alora's HTTP server: OpenAI-compatible endpoints with an `adapter` field, in front of a
//! continuous-batching engine that shares KV blocks between base and aLoRA requests.
//!
//! Modules: [`engine`] (the model-owning thread, scheduler, request events), [`openai`]
//! (chat, completions, models; wire types), [`admin`] (tokenize, health, metrics),
//! [`registry`] (adapters by name), [`metrics`], [`routes`], [`error`], [`state`].

pub mod admin;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod registry;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use alora_model::LoadedModel;

pub use engine::{EngineConfig, EngineHandle, LoadState};
pub use state::{AppState, HttpConfig};

/// Everything `alora serve` needs.
pub struct ServeConfig {
    pub engine: EngineConfig,
    pub http: HttpConfig,
    /// Adapters to load at start-up: (name, directory).
    pub adapters: Vec<(String, PathBuf)>,
}

/// Starts the engine (loading the model on its thread) and returns the app state; adapters
/// load once the model is ready.
pub fn start<F>(cfg: ServeConfig, load: F) -> AppState
where
    F: FnOnce() -> alora_model::Result<LoadedModel> + Send + 'static,
{
    let engine = EngineHandle::spawn(cfg.engine, load);
    AppState {
        engine,
        registry: Arc::new(registry::AdapterRegistry::default()),
        config: Arc::new(cfg.http),
        started: Arc::default(),
        draining: Arc::default(),
        prep_permits: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )),
    }
}

/// Waits for the model, then loads the start-up adapters; `/health` turns 200 once both are
/// done. Errors if either fails.
pub async fn wait_ready(state: &AppState, adapters: &[(String, PathBuf)]) -> Result<(), String> {
    loop {
        match state.engine.shared().load_state() {
            LoadState::Ready => break,
            LoadState::Failed(e) => return Err(format!("model failed to load: {e}")),
            LoadState::Stopped(e) => return Err(format!("engine stopped: {e}")),
            LoadState::Loading => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    let info = state.info().map_err(|e| e.message)?;
    for (name, dir) in adapters {
        let (reg, name, dir, info) = (
            state.registry.clone(),
            name.clone(),
            dir.clone(),
            info.clone(),
        );
        tokio::task::spawn_blocking(move || reg.load(&name, &dir, &info))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.message)?;
    }
    state
        .started
        .store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Serves `state` until SIGTERM or SIGINT, then shuts down gracefully: `/health` and new
/// generation requests answer 503 (`shutting_down`), no new connections are accepted, and
/// in-flight requests (streams included) run to their end, for at most
/// `HttpConfig::shutdown_grace`.
///
/// Connections are HTTP/1.1 with a header read timeout (`HttpConfig::header_read_timeout`: a
/// client that sends half a request and stalls is dropped) and at most
/// `HttpConfig::max_connections` at once (more wait in the listen backlog).
pub async fn serve(state: AppState, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    serve_until(state, listener, shutdown_signal()).await
}

/// Sets up an accepted connection's socket. Streamed tokens are small writes: with Nagle's
/// algorithm on, each waits for the ACK of the one before, which the client delays (tens of
/// ms), so tokens arrive in bursts and the first one late (TCP_NODELAY, as asyncio servers
/// like vLLM's uvicorn set it).
fn configure_socket(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY not set: {e}");
    }
}

/// [`serve`] with the shutdown signal given: the graceful shutdown starts when `signal`
/// resolves (embedding applications, tests).
pub async fn serve_until(
    state: AppState,
    listener: tokio::net::TcpListener,
    signal: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let app = routes::router(state.clone());
    let cfg = state.config.clone();
    let permits = Arc::new(tokio::sync::Semaphore::new(
        cfg.max_connections
            .unwrap_or(tokio::sync::Semaphore::MAX_PERMITS)
            .max(1),
    ));
    // Connections watch `closing` to shut down gracefully; each holds a `done` receiver, so
    // `done_tx.closed()` resolves once the last one has ended.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(());
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    tokio::pin!(signal);
    loop {
        let permit = tokio::select! {
            _ = &mut signal => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, _addr) = tokio::select! {
            _ = &mut signal => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        configure_socket(&stream);
        let service = TowerToHyperService::new(app.clone());
        let (mut closing, done) = (closing_rx.clone(), done_rx.clone());
        let header_timeout = cfg.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let _done = done;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection ended: {e}");
                    }
                    return;
                }
                _ = closing.changed() => conn.as_mut().graceful_shutdown(),
            }
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    state
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!("shutdown signal: finishing in-flight requests");
    let _ = closing_tx.send(());
    drop(done_rx);
    let all_done = done_tx.closed();
    match cfg.shutdown_grace {
        Some(g) => {
            if tokio::time::timeout(g, all_done).await.is_err() {
                tracing::warn!("shutdown grace period over; exiting with requests in flight");
            }
        }
        None => all_done.await,
    }
    Ok(())
}

/// SIGINT (ctrl-c) or, on Unix, SIGTERM (what `docker stop` and Kubernetes send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_sockets_send_small_writes_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (stream, _) = accepted.unwrap();
        assert!(!stream.nodelay().unwrap(), "Nagle is on by default");
        super::configure_socket(&stream);
        assert!(stream.nodelay().unwrap());
    }
}
