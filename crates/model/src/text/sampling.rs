//! Sampling from logits: penalties, logit bias, greedy or temperature with top-k / top-p /
//! min-p, seeded reproducible draws, and log-probabilities with top alternatives.
//!
//! Order, as vLLM applies it: logit_bias, then repetition (prompt and output), presence and
//! frequency (output) penalties, then temperature, top-k, top-p, min-p, then the draw.
//! Reported log-probabilities are of the raw model distribution (vLLM's default
//! `raw_logprobs`), so they do not change with sampling settings.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`): dividing logits by a tiny
/// positive temperature (a denormal like 1e-45) overflows them all to +-inf, which is no
/// distribution at all.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Validated sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Below [`GREEDY_TEMPERATURE`] (0 included) means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: Option<u64>,
    /// 1 means off; > 1 discourages tokens seen in prompt or output (divides positive logits).
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: HashMap<u32, f32>,
    /// Return this many top alternatives with each token's log-probability (None: none).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Raw log-probability of `token`, when asked.
    pub logprob: Option<f32>,
    /// Top alternatives (token, raw log-probability), best first.
    pub top: Vec<(u32, f32)>,
}

/// Per-request sampler state: the RNG and output token counts for penalties.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    output_counts: HashMap<u32, u32>,
    prompt_tokens: std::collections::HashSet<u32>,
}

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    x.iter().map(|v| v - lse).collect()
}

/// The `k` most likely tokens of log-probabilities `lp`, best first.
fn top_k(lp: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
    }
    let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i, lp[i as usize])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top
}

/// The raw log-probability of `token` under `logits` ([vocab]) and the `k` most likely
/// tokens (prompt scoring; the same numbers a sampled token's `logprobs` report).
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let lp = log_softmax(logits);
    let top = top_k(&lp, k);
    (
        lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top,
    )
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            output_counts: HashMap::new(),
            prompt_tokens: prompt.iter().copied().collect(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` ([vocab], f32) and records it for penalties.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        self.sample_allowed(logits, None)
    }

    /// [`Sampler::sample`] among the tokens `allowed` accepts (a structured output's mask).
    /// Log-probabilities are the model's, before the mask (and before `logit_bias` and the
    /// penalties), as vLLM reports them.
    pub fn sample_allowed(
        &mut self,
        logits: &[f32],
        allowed: Option<&dyn Fn(u32) -> bool>,
    ) -> Sampled {
        let p = &self.params;
        let (logprob_src, top) = match p.logprobs {
            Some(k) => {
                let lp = log_softmax(logits);
                let top = top_k(&lp, k);
                (Some(lp), top)
            }
            None => (None, vec![]),
        };
        let mut x = logits.to_vec();
        for (&t, &b) in &p.logit_bias {
            if let Some(v) = x.get_mut(t as usize) {
                *v += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt_tokens.iter().chain(self.output_counts.keys());
            for &t in seen {
                if let Some(v) = x.get_mut(t as usize) {
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(v) = x.get_mut(t as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        if let Some(ok) = allowed {
            let mut any = None;
            for (i, v) in x.iter_mut().enumerate() {
                if ok(i as u32) {
                    any.get_or_insert(i as u32);
                } else {
                    *v = f32::NEG_INFINITY;
                }
            }
            // Only tokens the grammar allows, however the logits look.
            if let Some(first) = any {
                if !x.iter().any(|v| v.is_finite()) {
                    x[first as usize] = 0.0;
                }
            }
        }
        let token = if p.temperature < GREEDY_TEMPERATURE {
            argmax(&x)
        } else {
            self.draw(x)
        };
        *self.output_counts.entry(token).or_insert(0) += 1;
        Sampled {
            token,
            logprob: logprob_src.map(|lp| lp[token as usize]),
            top,
        }
    }

    fn draw(&mut self, mut x: Vec<f32>) -> u32 {
        let p = &self.params;
        for v in x.iter_mut() {
            *v /= p.temperature;
        }
        let mut idx: Vec<u32> = (0..x.len() as u32)
            .filter(|&i| x[i as usize].is_finite())
            .collect();
        if idx.is_empty() {
            return argmax(&x);
        }
        // Only top-k and top-p need candidates in order, and only as far as they cut: a full
        // sort of a 49k vocabulary costs milliseconds per token, more than a decode step's
        // attention. top-k selects (linear) then top-p sorts what is left.
        let by_logit = |a: &u32, b: &u32| x[*b as usize].total_cmp(&x[*a as usize]);
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            idx.sort_unstable_by(by_logit);
        }
        let max = idx
            .iter()
            .map(|&i| x[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = idx.iter().map(|&i| (x[i as usize] - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        if p.min_p > 0.0 {
            // Relative to the best candidate (probability e^0 / sum), before top-p cuts.
            let floor = p.min_p / sum;
            (idx, probs) = idx
                .iter()
                .zip(&probs)
                .filter(|(_, q)| **q >= floor)
                .map(|(i, q)| (*i, *q))
                .unzip();
        }
        if p.top_p < 1.0 {
            // Sorted above, and min_p's filter keeps the order.
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (j, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (j, q) in probs.iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return idx[j];
            }
        }
        idx[idx.len() - 1]
    }
}

/// Finds stop strings in streamed text and holds back what could still become one.
///
/// Each stop string runs a Knuth-Morris-Pratt matcher over the text's bytes, so the work per
/// token is linear in the new text (amortized, times the number of stop strings), however long
/// the stop strings or the output. The output ends at the first position where a stop string
/// is complete (earliest end; of two ending there, the longer one is cut).
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<Matcher>,
    text: String,
    emitted: usize,
    /// Keep the matched stop string in the output (vLLM's `include_stop_str_in_output`).
    include_stop: bool,
}

/// One stop string's KMP state: `matched` bytes of `pat` are a suffix of the text so far.
#[derive(Debug, Clone)]
struct Matcher {
    pat: Vec<u8>,
    /// `fail[i]`: the longest proper border of `pat[..=i]`.
    fail: Vec<usize>,
    matched: usize,
}

impl Matcher {
    fn new(pat: &str) -> Self {
        let pat = pat.as_bytes().to_vec();
        let mut fail = vec![0; pat.len()];
        let mut k = 0;
        for i in 1..pat.len() {
            while k > 0 && pat[i] != pat[k] {
                k = fail[k - 1];
            }
            if pat[i] == pat[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Matcher {
            pat,
            fail,
            matched: 0,
        }
    }

    /// Feeds one byte; true when the whole pattern now ends here.
    fn feed(&mut self, b: u8) -> bool {
        while self.matched > 0 && (self.matched == self.pat.len() || self.pat[self.matched] != b) {
            self.matched = self.fail[self.matched - 1];
        }
        if self.pat[self.matched] == b {
            self.matched += 1;
        }
        self.matched == self.pat.len()
    }
}

/// What the caller may send after a piece of text arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to send now (may be empty).
    Continue(String),
    /// A stop string matched: send this last text (the stop string excluded) and finish.
    Stopped(String),
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Matcher::new(s))
                .collect(),
            ..Default::default()
        }
    }

    /// The same, keeping a matched stop string in the output.
    pub fn including_stop(mut self, include: bool) -> Self {
        self.include_stop = include;
        self
    }

    pub fn push(&mut self, piece: &str) -> StopCheck {
        self.push_with(piece, true)
    }

    /// [`Self::push`]; with `can_stop` false a stop string completing in `piece` is passed
    /// over (`min_tokens` not reached), the matchers still advance.
    pub fn push_with(&mut self, piece: &str, can_stop: bool) -> StopCheck {
        let base = self.text.len();
        self.text.push_str(piece);
        for (i, &b) in piece.as_bytes().iter().enumerate() {
            let mut longest = 0;
            for m in &mut self.stops {
                if m.feed(b) {
                    longest = longest.max(m.pat.len());
                }
            }
            if longest > 0 && can_stop {
                // A stop string starts with a char's first byte, so `at` is a char boundary.
                let end = base + i + 1;
                let at = if self.include_stop {
                    end
                } else {
                    end - longest
                };
                let out = self.text[self.emitted.min(at)..at].to_string();
                self.emitted = at;
                self.text.truncate(at);
                return StopCheck::Stopped(out);
            }
        }
        // Hold back the longest suffix that is a proper prefix of some stop string: exactly the
        // matchers' partial matches (a char boundary too, for the same reason).
        let held = self.stops.iter().map(|m| m.matched).max().unwrap_or(0);
        let safe = (self.text.len() - held).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        StopCheck::Continue(out)
    }

    /// The held-back tail, at the end of generation.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// All text passed so far, stop strings excluded.
    pub fn text_so_far(&self) -> &str {
        &self.text[..self.emitted]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_positive_temperature_is_greedy() {
        let logits = [0.5f32, 3.0, 2.9, -1.0];
        for t in [1e-45f32, 1e-30, 1e-6] {
            let params = SamplingParams {
                temperature: t,
                seed: Some(3),
                ..SamplingParams::default()
            };
            for _ in 0..20 {
                let mut s = Sampler::new(params.clone(), &[]);
                assert_eq!(s.sample(&logits).token, 1, "temperature {t}");
            }
        }
    }

    #[test]
    fn greedy_bias_and_penalties() {
        let logits = [1.0, 3.0, 2.0];
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&logits).token, 1);
        let mut bias = SamplingParams::greedy();
        bias.logit_bias.insert(2, 5.0);
        assert_eq!(Sampler::new(bias, &[]).sample(&logits).token, 2);
        // Repetition penalty 4 on a prompt token 1: 3 / 4 < 2.
        let rep = SamplingParams {
            repetition_penalty: 4.0,
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(rep, &[1]).sample(&logits).token, 2);
        // Frequency penalty: after emitting 1 twice it falls below 2.
        let freq = SamplingParams {
            frequency_penalty: 0.6,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(freq, &[]);
        let toks: Vec<u32> = (0..3).map(|_| s.sample(&logits).token).collect();
        assert_eq!(toks, vec![1, 1, 2]);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_filters_hold() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 5,
            seed: Some(7),
            ..Default::default()
        };
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p, &[]);
            (0..64).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        let a = run(params.clone());
        assert_eq!(a, run(params.clone()));
        let mut order: Vec<u32> = (0..50).collect();
        order.sort_by(|x, y| logits[*y as usize].total_cmp(&logits[*x as usize]));
        assert!(a.iter().all(|t| order[..5].contains(t)), "top_k respected");
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "it does sample"
        );
        let other = run(SamplingParams {
            seed: Some(8),
            ..params.clone()
        });
        assert_ne!(a, other);
        // min_p 1.0 keeps only the best token.
        let only = run(SamplingParams {
            min_p: 1.0,
            ..params.clone()
        });
        assert!(only.iter().all(|t| *t == order[0]));
        // top_p tiny keeps only the best token.
        let only = run(SamplingParams {
            top_p: 1e-6,
            ..params
        });
        assert!(only.iter().all(|t| *t == order[0]));
    }

    #[test]
    fn logprobs_are_raw_and_sorted() {
        let logits = [0.0f32, 1.0, 2.0];
        let p = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let s = Sampler::new(p, &[]).sample(&logits);
        let lse = (1.0f32 + 1f32.exp() + 2f32.exp()).ln();
        assert!((s.logprob.unwrap() - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn stop_strings_hold_back_and_cut() {
        let mut s = StopStrings::new(vec!["</end>".into()]);
        assert_eq!(s.push("Hello </"), StopCheck::Continue("Hello ".into()));
        assert_eq!(s.push("en"), StopCheck::Continue("".into()));
        assert_eq!(s.push("d> more"), StopCheck::Stopped("".into()));
        assert_eq!(s.text_so_far(), "Hello ");
        let mut s = StopStrings::new(vec!["ab".into()]);
        assert_eq!(s.push("xa"), StopCheck::Continue("x".into()));
        assert_eq!(s.push("c"), StopCheck::Continue("ac".into()));
        assert_eq!(s.flush(), "");
        let mut s = StopStrings::new(vec!["</end>".into()]).including_stop(true);
        assert_eq!(s.push("Hello </"), StopCheck::Continue("Hello ".into()));
        assert_eq!(s.push("end> more"), StopCheck::Stopped("</end>".into()));
        assert_eq!(s.text_so_far(), "Hello </end>");
    }

    #[test]
    fn a_stop_string_completing_before_min_tokens_is_passed_over() {
        let mut s = StopStrings::new(vec!["ab".into()]);
        assert_eq!(s.push_with("xab", false), StopCheck::Continue("x".into()));
        assert_eq!(s.push_with("c", true), StopCheck::Continue("abc".into()));
        // One that began before and completes once stopping is allowed ends the output.
        assert_eq!(s.push_with("a", false), StopCheck::Continue("".into()));
        assert_eq!(s.push_with("b!", true), StopCheck::Stopped("".into()));
        assert_eq!(s.text_so_far(), "xabc");
    }

    /// The output a whole text gets: cut before the stop string that ends first (the longer
    /// of two ending at the same byte), by brute force.
    fn cut_reference(text: &str, stops: &[String]) -> (String, bool) {
        for end in (1..=text.len()).filter(|&e| text.is_char_boundary(e)) {
            let hit = stops
                .iter()
                .filter(|s| !s.is_empty() && text[..end].ends_with(s.as_str()))
                .map(|s| s.len())
                .max();
            if let Some(len) = hit {
                return (text[..end - len].to_string(), true);
            }
        }
        (text.to_string(), false)
    }

    #[test]
    fn stop_strings_match_a_brute_force_reference_in_any_chunking() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = ['a', 'b', 'é', '\u{1F600}'];
        let word = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
            let n = rng.random_range(0..=max);
            (0..n)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect()
        };
        for _ in 0..3000 {
            let stops: Vec<String> = (0..rng.random_range(1..4))
                .map(|_| word(&mut rng, 4))
                .collect();
            let text = word(&mut rng, 24);
            let (want, want_stop) = cut_reference(&text, &stops);
            let mut s = StopStrings::new(stops.clone());
            let (mut got, mut stopped) = (String::new(), false);
            let chars: Vec<char> = text.chars().collect();
            let mut i = 0;
            while i < chars.len() && !stopped {
                let n = rng.random_range(1..=3).min(chars.len() - i);
                let piece: String = chars[i..i + n].iter().collect();
                i += n;
                match s.push(&piece) {
                    StopCheck::Continue(x) => got.push_str(&x),
                    StopCheck::Stopped(x) => {
                        got.push_str(&x);
                        stopped = true;
                    }
                }
                // Nothing released may be taken back: it is a prefix of the final output.
                assert!(
                    want.starts_with(&got),
                    "{stops:?} {text:?}: released {got:?}"
                );
            }
            if !stopped {
                got.push_str(&s.flush());
            }
            assert_eq!(
                (got.as_str(), stopped),
                (want.as_str(), want_stop),
                "{stops:?} {text:?}"
            );
            assert_eq!(s.text_so_far(), want);
        }
    }
}
