//! Writes the demo intrinsic's data: conversations whose last assistant answer is about one of
//! four topics, labelled by a final `topic` turn. The user's question never names the topic, so
//! the label is a property of the answer.
//!
//!     cargo run -p alora-trainer --example make_topic_data -- demo/topic [seed]
//!
//! writes train.jsonl (400), val.jsonl (80) and test.jsonl (160) into the directory. Train and
//! validation answers use the first six predicates of each topic; test answers use only the
//! last two, which training never saw, so test accuracy measures more than recall.

use std::fmt::Write;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

const QUESTIONS: &[&str] = &[
    "Tell me something interesting.",
    "What happened today?",
    "Can you share a short fact?",
    "Say something in one or two sentences.",
    "What is on your mind?",
    "Give me a quick update.",
    "Tell me a little story.",
    "What did you read about recently?",
];

struct Topic {
    name: &'static str,
    subjects: &'static [&'static str],
    predicates: &'static [&'static str],
}

const TOPICS: &[Topic] = &[
    Topic {
        name: "sports",
        subjects: &[
            "The striker",
            "Our team",
            "The marathon runner",
            "The coach",
            "The goalkeeper",
            "The tennis player",
            "The home side",
            "The cyclist",
        ],
        predicates: &[
            "scored twice in the final minutes",
            "trained hard before the championship",
            "won the match after extra time",
            "broke the record on the last lap",
            "was sent off for a late tackle",
            "lifted the trophy in front of the fans",
            "lost the semi-final on penalties",
            "signed a new contract with the club",
        ],
    },
    Topic {
        name: "food",
        subjects: &[
            "The chef",
            "My grandmother",
            "The bakery",
            "The new restaurant",
            "The soup",
            "The street vendor",
            "Our kitchen",
            "The recipe",
        ],
        predicates: &[
            "uses fresh basil and garlic",
            "bakes bread with a crisp crust",
            "serves noodles in a spicy broth",
            "needs two cups of flour and an egg",
            "tastes better with a little lemon",
            "slow-roasts the vegetables for hours",
            "makes the best chocolate cake in town",
            "fries the dumplings until golden",
        ],
    },
    Topic {
        name: "weather",
        subjects: &[
            "The forecast",
            "A cold front",
            "The storm",
            "This morning",
            "The coast",
            "The valley",
            "The wind",
            "The afternoon",
        ],
        predicates: &[
            "brings heavy rain and thunder tonight",
            "will keep temperatures below freezing",
            "left snow on the mountain roads",
            "was foggy until the sun broke through",
            "expects strong gusts and high waves",
            "turned humid with scattered showers",
            "calls for clear skies and a light breeze",
            "dropped hail on the fields",
        ],
    },
    Topic {
        name: "science",
        subjects: &[
            "The telescope",
            "A new study",
            "The chemists",
            "The physicist",
            "The lab",
            "The probe",
            "Researchers",
            "The experiment",
        ],
        predicates: &[
            "measured the light from a distant galaxy",
            "found that the enzyme speeds up the reaction",
            "observed particles colliding at high energy",
            "sequenced the genome of a rare plant",
            "confirmed the hypothesis with new data",
            "detected water ice beneath the surface",
            "published results on quantum entanglement",
            "cooled the sample close to absolute zero",
        ],
    },
];

fn line(rng: &mut StdRng, topic: &Topic, held_out: bool) -> String {
    let q = QUESTIONS.choose(rng).unwrap();
    let mut a = String::new();
    let n = rng.random_range(1..=2);
    for i in 0..n {
        let s = topic.subjects.choose(rng).unwrap();
        let (seen, unseen) = topic.predicates.split_at(6);
        let p = if held_out { unseen } else { seen }.choose(rng).unwrap();
        if i > 0 {
            a.push(' ');
        }
        let _ = write!(a, "{s} {p}.");
    }
    serde_json::json!({"messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a},
        {"role": "topic", "content": topic.name},
    ]})
    .to_string()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| "demo/topic".into()));
    let seed: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(7);
    std::fs::create_dir_all(&dir)?;
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, n) in [("train", 400), ("val", 80), ("test", 160)] {
        let mut out = String::new();
        for _ in 0..n {
            let t = TOPICS.choose(&mut rng).unwrap();
            out.push_str(&line(&mut rng, t, name == "test"));
            out.push('\n');
        }
        std::fs::write(dir.join(format!("{name}.jsonl")), out)?;
    }
    eprintln!("wrote {}/{{train,val,test}}.jsonl", dir.display());
    Ok(())
}
