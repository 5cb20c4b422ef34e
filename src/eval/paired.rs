//! Paired statistics over test examples and seeds.
//!
//! Every model of a run is scored on the same test examples in every seed, so a comparison of
//! two methods is *paired*: per example and seed, the difference of their outcomes. The 95%
//! interval of a difference (or of any statistic of per-seed, per-example outcomes, such as a
//! PGR) comes from a two-way percentile bootstrap: each replicate draws the seeds with
//! replacement and, when all seeds share one test set (the usual design: `pool_seed`), one
//! resample of the examples shared by every drawn seed (examples and seeds are crossed);
//! otherwise the examples of each drawn seed are drawn separately (nested).

use crate::eval::summary::quantile_sorted;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// Per-seed, per-example outcomes of one model (e.g. 1.0 where it was correct).
pub type Outcomes = Vec<Vec<f64>>;

/// A statistic with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Estimate {
    /// "holds" when the interval is above zero, "contradicted" when below, else "not resolved".
    pub fn verdict(&self) -> &'static str {
        if self.lo > 0.0 {
            "holds"
        } else if self.hi < 0.0 {
            "contradicted"
        } else {
            "not resolved"
        }
    }
}

/// Draws of the two-way bootstrap: for each replicate, the drawn seeds and, per drawn seed, the
/// drawn example indices.
pub struct Resampler {
    pub shared_examples: bool,
    sizes: Vec<usize>,
    pub resamples: usize,
    seed: u64,
}

impl Resampler {
    /// `sizes`: the number of test examples of each seed; `shared_examples`: whether every seed
    /// has the same test examples in the same order.
    pub fn new(sizes: Vec<usize>, shared_examples: bool, resamples: usize, seed: u64) -> Self {
        Resampler {
            shared_examples,
            sizes,
            resamples,
            seed,
        }
    }

    /// Mean over seeds of the mean over examples of `values`: the point estimate.
    pub fn mean(values: &Outcomes) -> f64 {
        let per_seed: Vec<f64> = values
            .iter()
            .map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64)
            .collect();
        per_seed.iter().sum::<f64>() / per_seed.len().max(1) as f64
    }

    /// Point value and percentile interval (95%) of `statistic`, a function of the means of
    /// several outcome arrays (all indexed alike); replicates where it is undefined are dropped
    /// (`None` when more than half are).
    pub fn estimate(
        &self,
        outcomes: &[&Outcomes],
        statistic: impl Fn(&[f64]) -> Option<f64>,
    ) -> Option<Estimate> {
        let seeds = self.sizes.len();
        if seeds == 0 || outcomes.is_empty() {
            return None;
        }
        let point: Vec<f64> = outcomes.iter().map(|o| Self::mean(o)).collect();
        let value = statistic(&point)?;
        let mut rng = Rng::derived(self.seed, "paired-bootstrap");
        let mut stats = Vec::with_capacity(self.resamples);
        let mut means = vec![0.0; outcomes.len()];
        let mut drawn_examples: Vec<usize> = Vec::new();
        for _ in 0..self.resamples {
            let drawn_seeds: Vec<usize> = (0..seeds).map(|_| rng.below(seeds)).collect();
            if self.shared_examples {
                let n = self.sizes[0];
                drawn_examples.clear();
                drawn_examples.extend((0..n).map(|_| rng.below(n)));
            }
            means.iter_mut().for_each(|m| *m = 0.0);
            for &s in &drawn_seeds {
                if !self.shared_examples {
                    let n = self.sizes[s];
                    drawn_examples.clear();
                    drawn_examples.extend((0..n).map(|_| rng.below(n)));
                }
                let count = drawn_examples.len().max(1) as f64;
                for (m, o) in means.iter_mut().zip(outcomes) {
                    let row = &o[s];
                    *m += drawn_examples.iter().map(|&i| row[i]).sum::<f64>() / count;
                }
            }
            means.iter_mut().for_each(|m| *m /= seeds as f64);
            if let Some(v) = statistic(&means) {
                if v.is_finite() {
                    stats.push(v);
                }
            }
        }
        if stats.len() * 2 < self.resamples {
            return None;
        }
        stats.sort_by(f64::total_cmp);
        Some(Estimate {
            value,
            lo: quantile_sorted(&stats, 0.025),
            hi: quantile_sorted(&stats, 0.975),
        })
    }

    /// Difference of means a - b with its interval.
    pub fn difference(&self, a: &Outcomes, b: &Outcomes) -> Option<Estimate> {
        self.estimate(&[a, b], |m| Some(m[0] - m[1]))
    }

    /// PGR = (student - weak) / (ceiling - weak) of accuracies, with its interval; undefined
    /// where the ceiling is not above the weak reference.
    pub fn pgr(&self, student: &Outcomes, weak: &Outcomes, ceiling: &Outcomes) -> Option<Estimate> {
        self.estimate(&[student, weak, ceiling], |m| {
            crate::eval::summary::pgr(m[0], m[1], m[2])
        })
    }
}

/// Per-example average of several models' outcomes (e.g. the mean of the weak models).
pub fn average(models: &[&Outcomes]) -> Outcomes {
    let Some(first) = models.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(s, row)| {
            (0..row.len())
                .map(|i| models.iter().map(|m| m[s][i]).sum::<f64>() / models.len() as f64)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_models_differ_by_exactly_zero() {
        let a: Outcomes = vec![vec![1.0, 0.0, 1.0, 1.0], vec![0.0, 1.0, 1.0, 0.0]];
        let r = Resampler::new(vec![4, 4], true, 500, 1);
        let e = r.difference(&a, &a).unwrap();
        assert_eq!((e.value, e.lo, e.hi), (0.0, 0.0, 0.0));
        assert_eq!(e.verdict(), "not resolved");
    }

    #[test]
    fn a_model_always_right_where_the_other_is_wrong_holds() {
        let a: Outcomes = vec![vec![1.0; 50]; 3];
        let b: Outcomes = vec![vec![0.0; 50]; 3];
        let r = Resampler::new(vec![50; 3], true, 200, 2);
        let e = r.difference(&a, &b).unwrap();
        assert_eq!((e.value, e.lo, e.hi), (1.0, 1.0, 1.0));
        assert_eq!(e.verdict(), "holds");
        assert_eq!(r.difference(&b, &a).unwrap().verdict(), "contradicted");
    }

    #[test]
    fn interval_matches_the_normal_approximation_for_one_seed() {
        // One seed, n examples, differences d_i in {-1, 0, 1}: the bootstrap standard error of
        // the mean is close to sd(d) / sqrt(n); the 95% interval close to mean +- 1.96 se.
        let n = 400;
        let a: Outcomes = vec![(0..n).map(|i| f64::from(i % 3 != 0)).collect()];
        let b: Outcomes = vec![(0..n).map(|i| f64::from(i % 5 == 0)).collect()];
        let d: Vec<f64> = a[0].iter().zip(&b[0]).map(|(x, y)| x - y).collect();
        let mean = d.iter().sum::<f64>() / n as f64;
        let sd = (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        let se = sd / (n as f64).sqrt();
        let e = Resampler::new(vec![n], true, 4000, 3)
            .difference(&a, &b)
            .unwrap();
        assert!((e.value - mean).abs() < 1e-12);
        assert!(
            (e.lo - (mean - 1.96 * se)).abs() < 0.25 * se,
            "{e:?} se {se}"
        );
        assert!(
            (e.hi - (mean + 1.96 * se)).abs() < 0.25 * se,
            "{e:?} se {se}"
        );
    }

    #[test]
    fn pgr_point_value_is_the_ratio_of_mean_accuracies() {
        let student: Outcomes = vec![vec![1.0, 1.0, 0.0, 0.0]];
        let weak: Outcomes = vec![vec![1.0, 0.0, 0.0, 0.0]];
        let ceiling: Outcomes = vec![vec![1.0, 1.0, 1.0, 0.0]];
        let e = Resampler::new(vec![4], true, 300, 4)
            .pgr(&student, &weak, &ceiling)
            .unwrap();
        assert!((e.value - 0.5).abs() < 1e-12);
        assert!(e.lo <= e.value && e.value <= e.hi);
    }

    #[test]
    fn nested_design_uses_each_seeds_own_size() {
        let a: Outcomes = vec![vec![1.0; 3], vec![0.0; 7]];
        let b: Outcomes = vec![vec![0.0; 3], vec![0.0; 7]];
        let e = Resampler::new(vec![3, 7], false, 400, 5)
            .difference(&a, &b)
            .unwrap();
        assert!((e.value - 0.5).abs() < 1e-12);
        // Seeds drawn with replacement: the replicates range from 0 (seed 2 twice) to 1.
        assert!(e.lo < 0.5 && e.hi > 0.5, "{e:?}");
    }

    #[test]
    fn average_is_per_example() {
        let a: Outcomes = vec![vec![1.0, 0.0]];
        let b: Outcomes = vec![vec![0.0, 0.0]];
        assert_eq!(average(&[&a, &b]), vec![vec![0.5, 0.0]]);
    }
}
