//! What the harness sends: sessions of one or more requests. A session runs its steps in order
//! (a later turn carries the answers of the earlier ones); sessions run concurrently.
//!
//! - `random`: one request per session, a prompt of about `input_len` tokens of random words.
//! - `intrinsics`: a conversation of about L tokens (L cycles through the chosen lengths); per
//!   turn a base answer, then one call per intrinsic adapter on the same conversation (the server
//!   appends the invocation), then the next base turn. Served as aLoRA, each intrinsic call
//!   reuses the base turn's KV; served as plain LoRA, it re-prefills the conversation.
//! - `race`: the intrinsics conversations, all of them live at once: N conversations (one
//!   session each) take turns request by request (round robin over the conversations ready
//!   for their next step), so the server holds every conversation's KV while base turns and
//!   intrinsic calls of different conversations interleave (the "aLoRA vs LoRA race").
//! - `mixed`: one request per session, each naming an adapter from a list in turn (`base` for
//!   none), to load a batch that mixes adapters.

use std::path::Path;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Words that are one token each in common BPE vocabularies (with their leading space), so a
/// prompt of n words is close to n tokens. The server's `usage` gives the exact counts.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "year",
    "water",
    "world",
    "day",
    "city",
    "house",
    "river",
    "light",
    "music",
    "book",
    "school",
    "family",
    "story",
    "market",
    "garden",
    "energy",
    "system",
    "history",
    "power",
    "field",
    "paper",
    "road",
    "game",
    "money",
    "letter",
    "island",
    "winter",
    "summer",
    "forest",
    "stone",
    "ship",
    "bridge",
    "train",
    "church",
    "village",
    "table",
    "window",
    "morning",
    "night",
    "small",
    "large",
    "old",
    "new",
    "good",
    "long",
    "great",
    "little",
    "high",
    "different",
    "early",
    "young",
    "important",
    "public",
    "bad",
    "same",
    "able",
    "make",
    "know",
    "take",
    "see",
    "come",
    "think",
    "look",
    "want",
    "give",
    "use",
    "find",
    "tell",
    "ask",
    "work",
    "seem",
    "feel",
    "try",
    "leave",
    "call",
    "open",
    "write",
    "read",
    "build",
    "learn",
    "change",
];

const QUESTIONS: &[&str] = &[
    "Summarize the text above in two sentences.",
    "What is the main topic of this passage?",
    "Which place is mentioned most often, and why?",
    "Write a short title for this text.",
    "List three words that describe the mood of the passage.",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Random,
    Intrinsics,
    Race,
    Mixed,
}

impl Kind {
    /// Conversations with base turns and intrinsic calls (`intrinsics` and `race`).
    pub fn conversational(self) -> bool {
        matches!(self, Kind::Intrinsics | Kind::Race)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Chat,
    Completions,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadConfig {
    pub kind: Kind,
    /// Endpoint for `random` and `mixed` (intrinsics always use chat).
    pub endpoint: Endpoint,
    pub input_len: usize,
    pub output_len: usize,
    /// Conversation lengths (tokens, approximately) for `intrinsics`, used in turn.
    pub conversation_lengths: Vec<usize>,
    /// Base turns per intrinsics conversation.
    pub turns: usize,
    /// Tokens asked of each intrinsic call.
    pub intrinsic_output_len: usize,
    /// `intrinsics`: the adapters called after each base turn. `mixed`: the adapters used in
    /// turn (`base` for the base model).
    pub adapters: Vec<String>,
    pub seed: u64,
}

/// One request of a session.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send `user` as the next user message to the base model; its answer joins the conversation.
    Base { user: String, max_tokens: usize },
    /// Call `adapter` on the conversation as it stands (its answer does not join it).
    Intrinsic { adapter: String, max_tokens: usize },
    /// A one-off request: chat with one user message, or a raw completion prompt.
    Single {
        text: String,
        adapter: Option<String>,
        endpoint: Endpoint,
        max_tokens: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: usize,
    /// Target length in tokens of the prompt or first conversation turn (for grouping results).
    pub length: usize,
    /// Messages the conversation starts from (a system prompt, or turns from a dataset).
    pub prefix: Vec<Value>,
    pub steps: Vec<Step>,
}

/// A source of sessions: generated with a fixed seed, or read from a JSONL file.
pub struct Workload {
    cfg: WorkloadConfig,
    rng: StdRng,
    next_id: usize,
    dataset: Option<Vec<Vec<Value>>>,
}

fn words(rng: &mut StdRng, n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        if i % 12 == 0 {
            if i > 0 {
                s.push_str(". ");
            }
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push(' ');
            s.push_str(w);
        }
    }
    s.push('.');
    s
}

/// Reads a conversations file: one JSON object per line, `{"messages": [...]}` or the seed's
/// `{"messages": {"chat": [...]}}`.
pub fn read_dataset(path: &Path) -> anyhow::Result<Vec<Vec<Value>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let msgs = match &v["messages"] {
            Value::Array(a) => a.clone(),
            Value::Object(o) => match o.get("chat") {
                Some(Value::Array(a)) => a.clone(),
                _ => bail!("{}:{}: messages.chat is not a list", path.display(), i + 1),
            },
            _ => bail!("{}:{}: no messages list", path.display(), i + 1),
        };
        if !msgs.iter().any(|m| m["role"] == "user") {
            bail!("{}:{}: no user message", path.display(), i + 1);
        }
        out.push(msgs);
    }
    if out.is_empty() {
        bail!("{}: no conversations", path.display());
    }
    Ok(out)
}

impl Workload {
    pub fn new(cfg: WorkloadConfig, dataset: Option<Vec<Vec<Value>>>) -> anyhow::Result<Self> {
        if cfg.kind.conversational() && cfg.adapters.is_empty() {
            bail!("the intrinsics and race workloads need at least one --adapter to call");
        }
        if cfg.kind == Kind::Mixed && cfg.adapters.is_empty() {
            bail!("the mixed workload needs --adapter names (use `base` for the base model)");
        }
        if cfg.kind.conversational() && cfg.conversation_lengths.is_empty() {
            bail!("the intrinsics and race workloads need at least one conversation length");
        }
        Ok(Workload {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            next_id: 0,
            dataset,
        })
    }

    pub fn kind(&self) -> Kind {
        self.cfg.kind
    }

    /// The next session; `None` once a dataset is used up (generated workloads never end).
    pub fn next_session(&mut self) -> Option<Session> {
        let id = self.next_id;
        self.next_id += 1;
        let cfg = &self.cfg;
        let rng = &mut self.rng;
        let session = match cfg.kind {
            Kind::Random | Kind::Mixed => {
                let (text, length) = match &self.dataset {
                    Some(d) => {
                        let conv = d.get(id)?;
                        let user = conv.iter().find(|m| m["role"] == "user")?;
                        let t = user["content"].as_str().unwrap_or_default().to_string();
                        let n = t.split_whitespace().count();
                        (t, n)
                    }
                    None => (words(rng, cfg.input_len), cfg.input_len),
                };
                let adapter = match cfg.kind {
                    Kind::Mixed => {
                        let a = &cfg.adapters[id % cfg.adapters.len()];
                        (a != "base").then(|| a.clone())
                    }
                    _ => None,
                };
                Session {
                    id,
                    length,
                    prefix: Vec::new(),
                    steps: vec![Step::Single {
                        text,
                        adapter,
                        endpoint: cfg.endpoint,
                        max_tokens: cfg.output_len,
                    }],
                }
            }
            Kind::Intrinsics | Kind::Race => {
                let mut steps = Vec::new();
                let (prefix, users, length) = match &self.dataset {
                    Some(d) => {
                        let conv = d.get(id)?;
                        // Replay the user turns; the server writes the answers.
                        let users: Vec<String> = conv
                            .iter()
                            .filter(|m| m["role"] == "user")
                            .map(|m| m["content"].as_str().unwrap_or_default().to_string())
                            .collect();
                        let system: Vec<Value> = conv
                            .iter()
                            .filter(|m| m["role"] == "system")
                            .cloned()
                            .collect();
                        let n = users.iter().map(|u| u.split_whitespace().count()).sum();
                        (system, users, n)
                    }
                    None => {
                        let length = cfg.conversation_lengths[id % cfg.conversation_lengths.len()];
                        let q = QUESTIONS[rng.random_range(0..QUESTIONS.len())];
                        let body = words(rng, length.saturating_sub(12).max(1));
                        let mut users = vec![format!("{body}\n\n{q}")];
                        for t in 1..cfg.turns {
                            users.push(QUESTIONS[(id + t) % QUESTIONS.len()].to_string());
                        }
                        (Vec::new(), users, length)
                    }
                };
                for user in users {
                    steps.push(Step::Base {
                        user,
                        max_tokens: cfg.output_len,
                    });
                    for a in &cfg.adapters {
                        steps.push(Step::Intrinsic {
                            adapter: a.clone(),
                            max_tokens: cfg.intrinsic_output_len,
                        });
                    }
                }
                Session {
                    id,
                    length,
                    prefix,
                    steps,
                }
            }
        };
        Some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: Kind) -> WorkloadConfig {
        WorkloadConfig {
            kind,
            endpoint: Endpoint::Chat,
            input_len: 50,
            output_len: 8,
            conversation_lengths: vec![100, 300],
            turns: 2,
            intrinsic_output_len: 2,
            adapters: vec!["a1".into(), "a2".into()],
            seed: 7,
        }
    }

    #[test]
    fn same_seed_same_sessions() {
        let mut a = Workload::new(cfg(Kind::Intrinsics), None).unwrap();
        let mut b = Workload::new(cfg(Kind::Intrinsics), None).unwrap();
        for _ in 0..4 {
            let (x, y) = (a.next_session().unwrap(), b.next_session().unwrap());
            assert_eq!(format!("{:?}", x.steps), format!("{:?}", y.steps));
        }
    }

    #[test]
    fn intrinsics_shape() {
        let mut w = Workload::new(cfg(Kind::Intrinsics), None).unwrap();
        let s0 = w.next_session().unwrap();
        let s1 = w.next_session().unwrap();
        assert_eq!((s0.length, s1.length), (100, 300));
        // base, a1, a2, base, a1, a2
        let kinds: Vec<String> = s0
            .steps
            .iter()
            .map(|s| match s {
                Step::Base { .. } => "base".to_string(),
                Step::Intrinsic { adapter, .. } => adapter.clone(),
                Step::Single { .. } => "single".to_string(),
            })
            .collect();
        assert_eq!(kinds, ["base", "a1", "a2", "base", "a1", "a2"]);
        let Step::Base { user, .. } = &s1.steps[0] else {
            panic!()
        };
        let n = user.split_whitespace().count();
        assert!((280..=300).contains(&n), "{n} words");
    }

    #[test]
    fn mixed_cycles_adapters() {
        let mut c = cfg(Kind::Mixed);
        c.adapters = vec!["base".into(), "x".into()];
        let mut w = Workload::new(c, None).unwrap();
        let ad: Vec<Option<String>> = (0..4)
            .map(|_| match &w.next_session().unwrap().steps[0] {
                Step::Single { adapter, .. } => adapter.clone(),
                _ => panic!(),
            })
            .collect();
        assert_eq!(ad, [None, Some("x".into()), None, Some("x".into())]);
    }

    #[test]
    fn dataset_both_formats_and_errors() {
        let dir = std::env::temp_dir().join(format!("alora-bench-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(
            &p,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi there\"}]}\n\n\
             {\"messages\": {\"chat\": [{\"role\": \"system\", \"content\": \"s\"}, \
             {\"role\": \"user\", \"content\": \"one two three\"}]}}\n",
        )
        .unwrap();
        let d = read_dataset(&p).unwrap();
        assert_eq!(d.len(), 2);
        let mut w = Workload::new(cfg(Kind::Intrinsics), Some(d)).unwrap();
        let s = w.next_session().unwrap();
        assert_eq!(s.length, 2);
        let s = w.next_session().unwrap();
        assert_eq!((s.length, s.prefix.len()), (3, 1));
        assert!(w.next_session().is_none());
        std::fs::write(&p, "{\"messages\": 3}\n").unwrap();
        let e = read_dataset(&p).unwrap_err().to_string();
        assert!(e.contains(":1:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
