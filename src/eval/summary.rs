//! Performance gap recovered (PGR) and summaries over seeds: mean, standard deviation and a
//! percentile-bootstrap confidence interval.

use crate::rng::Rng;
use serde::Serialize;

/// PGR = (student - weak) / (ceiling - weak). `None` (undefined, not 0) where ceiling <= weak.
pub fn pgr(student: f64, weak: f64, ceiling: f64) -> Option<f64> {
    (ceiling > weak).then(|| (student - weak) / (ceiling - weak))
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Sample standard deviation (n - 1 in the denominator); `None` for fewer than two values.
pub fn sample_std(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let m = mean(values)?;
    let ss: f64 = values.iter().map(|v| (v - m) * (v - m)).sum();
    Some((ss / (values.len() - 1) as f64).sqrt())
}

/// The q-quantile (0 <= q <= 1) of sorted values with linear interpolation between order
/// statistics (numpy's default): position q (n - 1).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let lower = position.floor() as usize;
    let upper = position.ceil() as usize;
    let fraction = position - lower as f64;
    sorted[lower] + (sorted[upper] - sorted[lower]) * fraction
}

/// Percentile bootstrap interval of `statistic` at `level` (e.g. 0.95): `resamples` resamples of
/// the values with replacement, drawn with `seed`. `None` for no values.
pub fn bootstrap_ci(
    values: &[f64],
    statistic: impl Fn(&[f64]) -> f64,
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<(f64, f64)> {
    if values.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = Rng::derived(seed, "bootstrap");
    let mut sample = vec![0.0; values.len()];
    let mut stats: Vec<f64> = (0..resamples)
        .map(|_| {
            for slot in sample.iter_mut() {
                *slot = values[rng.below(values.len())];
            }
            statistic(&sample)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    Some((
        quantile_sorted(&stats, alpha),
        quantile_sorted(&stats, 1.0 - alpha),
    ))
}

pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// A number over seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub std: Option<f64>,
    /// 95% percentile-bootstrap interval of the mean.
    pub ci95: Option<(f64, f64)>,
    pub n: usize,
    pub values: Vec<f64>,
}

/// Mean, standard deviation and 95% bootstrap interval of the mean (10,000 resamples). `None`
/// when there is no value.
pub fn summarize(values: &[f64], seed: u64) -> Option<Summary> {
    Some(Summary {
        mean: mean(values)?,
        std: sample_std(values),
        ci95: bootstrap_ci(
            values,
            |s| mean(s).unwrap_or(f64::NAN),
            BOOTSTRAP_RESAMPLES,
            0.95,
            seed,
        ),
        n: values.len(),
        values: values.to_vec(),
    })
}

/// Summaries by row (a model or method) and column (a metric), as results tables print them.
pub type SummaryTable =
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, Option<Summary>>>;

/// Builds a [`SummaryTable`] cell by cell; every cell's bootstrap uses the same seed.
pub struct SummaryBuilder {
    pub table: SummaryTable,
    bootstrap_seed: u64,
}

impl SummaryBuilder {
    pub fn new(bootstrap_seed: u64) -> Self {
        SummaryBuilder {
            table: SummaryTable::new(),
            bootstrap_seed,
        }
    }

    /// Summarises `values` (one per seed) into row `name`, column `metric`.
    pub fn add(&mut self, name: &str, metric: &str, values: Vec<f64>) {
        self.table
            .entry(name.to_string())
            .or_default()
            .insert(metric.to_string(), summarize(&values, self.bootstrap_seed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgr_known_values_and_undefined() {
        assert!((pgr(0.65, 0.6, 0.8).unwrap() - 0.25).abs() < 1e-12);
        assert!((pgr(0.55, 0.6, 0.8).unwrap() + 0.25).abs() < 1e-12);
        assert_eq!(pgr(0.7, 0.6, 0.6), None);
        assert_eq!(pgr(0.7, 0.8, 0.6), None);
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert!((quantile_sorted(&v, 0.5) - 2.5).abs() < 1e-12);
        assert!((quantile_sorted(&v, 0.25) - 1.75).abs() < 1e-12);
    }

    #[test]
    fn summary_of_one_value_has_no_spread() {
        let s = summarize(&[0.7], 0).unwrap();
        assert_eq!((s.mean, s.std, s.ci95), (0.7, None, Some((0.7, 0.7))));
        assert_eq!(summarize(&[], 0), None);
    }
}
