//! ETHICS (Hendrycks et al. 2021) subsets as binary classification.
//!
//! Text formats and labels (as released; 1 / 0):
//! - `commonsense`: the scenario text itself; 1 = the act is clearly wrong.
//! - `deontology`: `Request: {scenario}\nExcuse: {excuse}`; 1 = the excuse is reasonable.
//! - `justice`: the scenario text itself; 1 = the claim is reasonable.
//! - `virtue`: `Scenario: {sentence}\nTrait: {trait}` (the release joins them with ` [SEP] `);
//!   1 = the trait fits the scenario.
//! - `utilitarianism`: the release lists pairs (more pleasant, less pleasant). We show them as
//!   `Scenario 1: {a}\nScenario 2: {b}` with a seeded half of each split swapped; 1 = scenario 1 is
//!   the more pleasant one (so each split is balanced).
//!
//! Splits: `test` is the subset's standard test file (all of it by default, a seeded subset when a
//! size is given); `weak_train`, `strong_train` and `valid` are drawn from the train file. The
//! commonsense subset has no train file here: its pool is the `test_hard` file, its test the
//! standard `test` file. Texts present in the test file are removed from the pool.

use super::{dedup_by_key, shuffled, take, Dataset, Example, Label, ResolvedSizes, SplitSizes};
use crate::error::InputError;
use crate::hash::example_id;
use crate::io::read_text;
use crate::rng::Rng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subset {
    Commonsense,
    Deontology,
    Justice,
    Virtue,
    Utilitarianism,
}

impl Subset {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "commonsense" | "cm" => Subset::Commonsense,
            "deontology" => Subset::Deontology,
            "justice" => Subset::Justice,
            "virtue" => Subset::Virtue,
            "utilitarianism" | "util" => Subset::Utilitarianism,
            other => bail!(
                "unknown ETHICS subset `{other}`; expected commonsense, deontology, justice, virtue or utilitarianism"
            ),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Subset::Commonsense => "commonsense",
            Subset::Deontology => "deontology",
            Subset::Justice => "justice",
            Subset::Virtue => "virtue",
            Subset::Utilitarianism => "utilitarianism",
        }
    }

    /// (pool file, test file), relative to the ETHICS folder.
    fn files(self) -> (&'static str, &'static str) {
        match self {
            Subset::Commonsense => (
                "commonsense/cm_test_hard.csv.gz",
                "commonsense/cm_test.csv.gz",
            ),
            Subset::Deontology => (
                "deontology/deontology_train.csv.gz",
                "deontology/deontology_test.csv.gz",
            ),
            Subset::Justice => (
                "justice/justice_train.csv.gz",
                "justice/justice_test.csv.gz",
            ),
            Subset::Virtue => ("virtue/virtue_train.csv.gz", "virtue/virtue_test.csv.gz"),
            Subset::Utilitarianism => (
                "utilitarianism/util_train.csv.gz",
                "utilitarianism/util_test.csv.gz",
            ),
        }
    }
}

pub const DEFAULT_SIZES: ResolvedSizes = ResolvedSizes {
    weak_train: 5000,
    strong_train: 5000,
    test: usize::MAX,
    valid: 0,
};

/// A row before formatting: its text and label, or for utilitarianism the (better, worse) pair.
enum Row {
    Labelled { text: String, class: usize },
    Pair { better: String, worse: String },
}

fn read_rows(path: &Path, subset: Subset) -> Result<Vec<Row>> {
    let text = read_text(path)?;
    let has_header = subset != Subset::Utilitarianism;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(has_header)
        .flexible(false)
        .from_reader(text.as_bytes());
    let expected = match subset {
        Subset::Commonsense => "label,input,is_short,edited",
        Subset::Deontology => "label,scenario,excuse",
        Subset::Justice | Subset::Virtue => "label,scenario",
        Subset::Utilitarianism => "two columns: more pleasant scenario, less pleasant scenario",
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            InputError::at_line(
                path,
                line,
                format!("malformed CSV row (expected {expected}): {e}"),
            )
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let field = |i: usize| -> Result<String, InputError> {
            record.get(i).map(|s| s.trim().to_string()).ok_or_else(|| {
                InputError::at_line(
                    path,
                    line,
                    format!("missing column {}; expected {expected}", i + 1),
                )
            })
        };
        if subset == Subset::Utilitarianism {
            rows.push(Row::Pair {
                better: field(0)?,
                worse: field(1)?,
            });
            continue;
        }
        let class = match field(0)?.as_str() {
            "0" => 0,
            "1" => 1,
            other => {
                return Err(InputError::at_line(
                    path,
                    line,
                    format!("label `{other}` is not 0 or 1"),
                )
                .into())
            }
        };
        let text = match subset {
            Subset::Commonsense | Subset::Justice => field(1)?,
            Subset::Deontology => format!("Request: {}\nExcuse: {}", field(1)?, field(2)?),
            Subset::Virtue => {
                let scenario = field(1)?;
                let (sentence, trait_word) = scenario.rsplit_once("[SEP]").ok_or_else(|| {
                    InputError::at_line(
                        path,
                        line,
                        "expected `sentence [SEP] trait` in the scenario column",
                    )
                })?;
                format!(
                    "Scenario: {}\nTrait: {}",
                    sentence.trim(),
                    trait_word.trim()
                )
            }
            Subset::Utilitarianism => unreachable!("handled above"),
        };
        rows.push(Row::Labelled { text, class });
    }
    Ok(rows)
}

fn row_key(row: &Row) -> String {
    match row {
        Row::Labelled { text, .. } => text.to_lowercase(),
        Row::Pair { better, worse } => {
            format!("{}\u{1f}{}", better.to_lowercase(), worse.to_lowercase())
        }
    }
}

fn to_examples(task: &str, rows: Vec<Row>, rng: &mut Rng) -> Vec<Example> {
    let mut swapped = vec![false; rows.len()];
    let mut order: Vec<usize> = (0..rows.len()).collect();
    rng.shuffle(&mut order);
    for &i in &order[..rows.len() / 2] {
        swapped[i] = true;
    }
    rows.into_iter()
        .zip(swapped)
        .map(|(row, swap)| {
            let (input, class) = match row {
                Row::Labelled { text, class } => (text, class),
                Row::Pair { better, worse } if swap => {
                    (format!("Scenario 1: {worse}\nScenario 2: {better}"), 0)
                }
                Row::Pair { better, worse } => {
                    (format!("Scenario 1: {better}\nScenario 2: {worse}"), 1)
                }
            };
            Example {
                id: example_id(&[task, &input, &class.to_string()]),
                input,
                label: Label::Class { class },
            }
        })
        .collect()
}

pub fn load(dir: &Path, subset: Subset, sizes: &SplitSizes, seed: u64) -> Result<Dataset> {
    let task = format!("ethics-{}", subset.as_str());
    let (pool_file, test_file) = subset.files();
    let test_rows = dedup_by_key(read_rows(&dir.join(test_file), subset)?, row_key);
    let test_keys: HashSet<String> = test_rows.iter().map(row_key).collect();
    let pool_rows = read_rows(&dir.join(pool_file), subset)?;
    let pool_total = pool_rows.len();
    let pool_rows: Vec<Row> = pool_rows
        .into_iter()
        .filter(|r| !test_keys.contains(&row_key(r)))
        .collect();
    let pool_rows = dedup_by_key(pool_rows, row_key);

    let mut resolved = sizes.resolve(DEFAULT_SIZES);
    if resolved.test == usize::MAX {
        resolved.test = test_rows.len();
    }
    let available = format!(
        "{pool_file} has {pool_total} rows, {} after removing duplicates and test texts",
        pool_rows.len()
    );
    let mut pool = shuffled(pool_rows, seed, &format!("{task}/pool"));
    let weak = take(&mut pool, resolved.weak_train, "weak_train", &available)?;
    let strong = take(&mut pool, resolved.strong_train, "strong_train", &available)?;
    let valid = take(&mut pool, resolved.valid, "valid", &available)?;
    let test_total = test_rows.len();
    let mut test_pool = shuffled(test_rows, seed, &format!("{task}/test"));
    let test = take(
        &mut test_pool,
        resolved.test,
        "test",
        &format!("{test_file} has {test_total} distinct rows"),
    )?;

    let build = |rows: Vec<Row>, split: &str| {
        to_examples(
            &task,
            rows,
            &mut Rng::derived(seed, &format!("{task}/order/{split}")),
        )
    };
    Ok(Dataset {
        task: task.clone(),
        num_classes: Some(2),
        seed,
        weak_train: build(weak, "weak_train"),
        strong_train: build(strong, "strong_train"),
        test: build(test, "test"),
        valid: build(valid, "valid"),
        provenance: format!(
            "ETHICS {}: train splits from {pool_file}, test from {test_file}; seed {seed}",
            subset.as_str()
        ),
        label_names: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{default_data_dir, load as load_task, ChoiceOptions, TaskSpec};

    #[test]
    fn every_subset_loads_with_two_classes_present() {
        for name in [
            "commonsense",
            "deontology",
            "justice",
            "virtue",
            "utilitarianism",
        ] {
            let spec =
                TaskSpec::parse(&format!("ethics-{name}"), ChoiceOptions::default()).unwrap();
            let sizes = SplitSizes {
                weak_train: Some(300),
                strong_train: Some(300),
                test: Some(200),
                valid: Some(20),
            };
            let data = load_task(&default_data_dir(), &spec, &sizes, 0).unwrap();
            assert_eq!(data.test.len(), 200, "{name}");
            for split in [&data.weak_train, &data.test] {
                let positives = split
                    .iter()
                    .filter(|e| e.label == Label::Class { class: 1 })
                    .count();
                assert!(positives > 0 && positives < split.len(), "{name}");
            }
        }
    }

    #[test]
    fn utilitarianism_is_exactly_balanced_and_virtue_is_formatted() {
        let sizes = SplitSizes {
            weak_train: Some(100),
            strong_train: Some(100),
            test: Some(100),
            valid: None,
        };
        let data = load_task(
            &default_data_dir(),
            &TaskSpec::Ethics(Subset::Utilitarianism),
            &sizes,
            3,
        )
        .unwrap();
        let positives = data
            .test
            .iter()
            .filter(|e| e.label == Label::Class { class: 1 })
            .count();
        assert_eq!(positives, 50);
        assert!(data.test[0].input.starts_with("Scenario 1: "));
        let data = load_task(
            &default_data_dir(),
            &TaskSpec::Ethics(Subset::Virtue),
            &sizes,
            3,
        )
        .unwrap();
        assert!(data.test[0].input.contains("\nTrait: "));
        assert!(!data.test[0].input.contains("[SEP]"));
    }

    #[test]
    fn default_test_is_the_whole_standard_test_file() {
        let sizes = SplitSizes {
            weak_train: Some(10),
            strong_train: Some(10),
            ..Default::default()
        };
        let data = load_task(
            &default_data_dir(),
            &TaskSpec::Ethics(Subset::Justice),
            &sizes,
            0,
        )
        .unwrap();
        assert!(data.test.len() > 2600, "{}", data.test.len());
    }
}
