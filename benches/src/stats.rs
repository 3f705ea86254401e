//! Summary statistics over latency samples, with numpy's default percentile (linear
//! interpolation between closest ranks), so figures line up with `vllm bench serve`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// The `q`-th percentile (0..=100) of `sorted`, interpolating linearly between ranks.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = q / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

impl Summary {
    /// Summary of `xs` (any order). All fields are NaN-free zeros for an empty sample except
    /// `count`, which says so.
    pub fn of(xs: &[f64]) -> Summary {
        if xs.is_empty() {
            return Summary::default();
        }
        let mut v = xs.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        Summary {
            count: v.len(),
            mean,
            median: percentile(&v, 50.0),
            std: var.sqrt(),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    /// The same summary with every value multiplied by `k` (seconds to milliseconds).
    pub fn scaled(self, k: f64) -> Summary {
        Summary {
            count: self.count,
            mean: self.mean * k,
            median: self.median * k,
            std: self.std * k,
            p90: self.p90 * k,
            p99: self.p99 * k,
            min: self.min * k,
            max: self.max * k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = [3.0, 7.6, 9.76]
        let s = Summary::of(&[10.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(s.median, 3.0);
        assert!((s.p90 - 7.6).abs() < 1e-12);
        assert!((s.p99 - 9.76).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.count), (1.0, 10.0, 5));
        assert!((s.mean - 4.0).abs() < 1e-12);
        // population std, as numpy's default: sqrt(mean((x - 4)^2)) = sqrt(10)
        assert!((s.std - 10f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(Summary::of(&[]).count, 0);
        let s = Summary::of(&[2.5]);
        assert_eq!((s.median, s.p99, s.std), (2.5, 2.5, 0.0));
    }
}
