//! Summary statistics of a split dataset: sizes, class balance, lengths in characters.

use super::{Dataset, Example, SplitName};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LengthSummary {
    pub min: usize,
    pub p25: usize,
    pub median: usize,
    pub p75: usize,
    pub p95: usize,
    pub max: usize,
    pub mean: f64,
}

/// Nearest-rank percentiles of character counts (Unicode scalar values). `None` for no values.
pub fn length_summary(lengths: &[usize]) -> Option<LengthSummary> {
    if lengths.is_empty() {
        return None;
    }
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    let rank = |q: f64| {
        let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[index]
    };
    Some(LengthSummary {
        min: sorted[0],
        p25: rank(0.25),
        median: rank(0.5),
        p75: rank(0.75),
        p95: rank(0.95),
        max: sorted[sorted.len() - 1],
        mean: sorted.iter().sum::<usize>() as f64 / sorted.len() as f64,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitStats {
    pub split: &'static str,
    pub n: usize,
    /// Per class: count (classification only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_counts: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positive_rate: Option<f64>,
    pub input_chars: Option<LengthSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_chars: Option<LengthSummary>,
    /// Generation: the fraction of targets that are empty slot sets (`{}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub empty_target_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetStats {
    pub task: String,
    pub seed: u64,
    pub num_classes: Option<usize>,
    pub data_hash: String,
    pub provenance: String,
    pub splits: Vec<SplitStats>,
    /// String labels: the class names (class k = label_names[k]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_names: Option<Vec<String>>,
}

fn split_stats(name: SplitName, examples: &[Example], num_classes: Option<usize>) -> SplitStats {
    let chars = |s: &str| s.chars().count();
    let input_lengths: Vec<usize> = examples.iter().map(|e| chars(&e.input)).collect();
    let class_counts = num_classes.map(|k| {
        let mut counts = vec![0usize; k];
        for class in examples.iter().filter_map(|e| e.label.class()) {
            counts[class] += 1;
        }
        counts
    });
    let positive_rate = match (&class_counts, examples.len()) {
        (Some(counts), n) if counts.len() == 2 && n > 0 => Some(counts[1] as f64 / n as f64),
        _ => None,
    };
    let targets: Vec<&str> = examples.iter().filter_map(|e| e.label.target()).collect();
    let target_lengths: Vec<usize> = targets.iter().map(|t| chars(t)).collect();
    SplitStats {
        split: name.as_str(),
        n: examples.len(),
        class_counts,
        positive_rate,
        input_chars: length_summary(&input_lengths),
        target_chars: if num_classes.is_none() {
            length_summary(&target_lengths)
        } else {
            None
        },
        empty_target_rate: (num_classes.is_none() && !targets.is_empty()).then(|| {
            targets.iter().filter(|t| t.trim() == "{}").count() as f64 / targets.len() as f64
        }),
    }
}

pub fn dataset_stats(dataset: &Dataset) -> DatasetStats {
    DatasetStats {
        task: dataset.task.clone(),
        seed: dataset.seed,
        num_classes: dataset.num_classes,
        data_hash: dataset.data_hash(),
        provenance: dataset.provenance.clone(),
        label_names: dataset.label_names.clone(),
        splits: SplitName::ALL
            .iter()
            .map(|&name| split_stats(name, dataset.split(name), dataset.num_classes))
            .collect(),
    }
}

/// A plain-text table of the statistics, for the terminal.
pub fn format_stats(stats: &DatasetStats) -> String {
    let mut out = format!(
        "task {}  seed {}  data hash {}\n{}\n\n",
        stats.task,
        stats.seed,
        &stats.data_hash[..16],
        stats.provenance
    );
    if let Some(names) = &stats.label_names {
        out.push_str(&format!(
            "classes: {}\n\n",
            names
                .iter()
                .enumerate()
                .map(|(k, n)| format!("{k} = {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let balance_header = if stats.num_classes.is_some() {
        "class counts (positive rate)"
    } else {
        "empty targets"
    };
    out.push_str(&format!(
        "{:<13} {:>6}  {:<30} {:>34}\n",
        "split", "n", balance_header, "input chars min/p25/med/p75/p95/max (mean)"
    ));
    for split in &stats.splits {
        let balance = match (
            &split.class_counts,
            split.positive_rate,
            split.empty_target_rate,
        ) {
            (Some(counts), Some(rate), _) => format!("{counts:?} ({:.1}%)", rate * 100.0),
            (Some(counts), None, _) => format!("{counts:?}"),
            (None, _, Some(rate)) => format!("{:.1}%", rate * 100.0),
            _ => "-".into(),
        };
        let lengths = |l: &Option<LengthSummary>| match l {
            Some(l) => format!(
                "{}/{}/{}/{}/{}/{} ({:.0})",
                l.min, l.p25, l.median, l.p75, l.p95, l.max, l.mean
            ),
            None => "-".into(),
        };
        out.push_str(&format!(
            "{:<13} {:>6}  {:<30} {:>34}\n",
            split.split,
            split.n,
            balance,
            lengths(&split.input_chars)
        ));
        if split.target_chars.is_some() {
            out.push_str(&format!(
                "{:<13} {:>6}  {:<30} {:>34}\n",
                "",
                "",
                "target chars",
                lengths(&split.target_chars)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = length_summary(&[5, 1, 4, 2, 3]).unwrap();
        assert_eq!(
            (s.min, s.p25, s.median, s.p75, s.p95, s.max),
            (1, 2, 3, 4, 5, 5)
        );
        assert!((s.mean - 3.0).abs() < 1e-12);
        assert_eq!(length_summary(&[]), None);
        let one = length_summary(&[7]).unwrap();
        assert_eq!((one.min, one.median, one.max), (7, 7, 7));
    }
}
