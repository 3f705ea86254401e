//! The real `alora` binary. `serve`: SIGTERM (what `docker stop` and Kubernetes send) lets an
//! in-flight stream run to its end and the process then exits 0; logs are at `info` by default
//! and hold no prompt text unless `--log-prompts` is given. `generate`: the prompt rules.

#![cfg(unix)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A fresh copy of the tiny model per call: tests run in parallel, and one copying the files
/// while another's process loads them would hand it a half-written file.
fn model_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/llama");
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tiny-model-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures.join(f), d.join(f)).unwrap();
    }
    alora_model::testing::write_char_tokenizer(&d).unwrap();
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Status code of `GET path`, or None if nothing answers.
fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Starts `alora serve` on the tiny model with `extra` flags, stderr to `log`; returns once
/// `/health` is 200.
fn spawn_server(extra: &[&str], log: Stdio) -> (std::process::Child, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_alora"))
        .args(["serve", "--model"])
        .arg(model_dir())
        .args(["--port", &port.to_string(), "--kv-cache-memory", "16MiB"])
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while get_status(port, "/health") != Some(200) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// Sends `body` to `path` and reads the whole response (the connection closes after it).
fn post(port: u16, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn terminate(child: &mut std::process::Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

#[test]
fn sigterm_lets_an_in_flight_stream_finish_then_exits_zero() {
    let (mut child, port) = spawn_server(&["--shutdown-grace", "60"], Stdio::null());
    let body = r#"{"prompt": "ab", "max_tokens": 240, "ignore_eos": true, "stream": true, "temperature": 0}"#;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    // Wait for the first token chunk, so the request is in flight when the signal comes.
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early: {head}"
        );
        head.push_str(&line);
        if line.starts_with("data: {") {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    terminate(&mut child);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(
        !head.contains("[DONE]"),
        "the stream finished before the signal; the test proves nothing"
    );
    assert!(rest.contains(r#""finish_reason":"length""#), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

/// At the default filter the log shows start-up at `info` but no prompt or output text;
/// `--log-prompts` adds the prompt.
#[test]
fn logs_hold_prompts_only_with_log_prompts() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for (flag, shows) in [(None, false), (Some("--log-prompts"), true)] {
        let path = dir.join(format!("serve-log-{}-{shows}.txt", std::process::id()));
        let log = std::fs::File::create(&path).unwrap();
        let (mut child, port) = spawn_server(flag.as_slice(), Stdio::from(log));
        for (endpoint, body) in [
            (
                "/v1/completions",
                r#"{"prompt": "quokka prompt", "max_tokens": 3, "ignore_eos": true}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"messages": [{"role": "user", "content": "quokka chat"}], "max_tokens": 3, "ignore_eos": true}"#,
            ),
        ] {
            let r = post(port, endpoint, body);
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        }
        terminate(&mut child);
        assert!(child.wait().unwrap().success());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("INFO"), "nothing at info: {text}");
        // One access line per generation, with its tokens, and the start-up line.
        assert_eq!(text.matches("completion_tokens=3").count(), 2, "{text}");
        assert!(text.contains("ready on http://"), "{text}");
        assert_eq!(
            text.contains("quokka prompt") && text.contains("quokka chat"),
            shows,
            "{flag:?}: {text}"
        );
        if !shows {
            assert!(
                !text.contains("quokka"),
                "prompt text in the default log: {text}"
            );
        }
    }
}

/// `alora generate --prompt` with an aLoRA follows /v1/completions: a prompt without the
/// invocation is refused (naming it), one holding it runs; `--chat` appends it.
#[test]
fn generate_with_an_alora_follows_the_completions_rule() {
    let adapter =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/llama/alora");
    let model = model_dir();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_alora"))
            .args(["generate", "--max-tokens", "2", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let o = run(&["--prompt", "hello there"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not contain the aLoRA's invocation"),
        "{err}"
    );
    for args in [
        &["--prompt", "hello abc there"][..],
        &["--chat", "hello there"],
    ] {
        let o = run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {err}");
        assert!(err.contains("generated"), "{err}");
    }
}
