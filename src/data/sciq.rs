//! SciQ (Welbl et al. 2017) as binary classification: "is this answer correct?".
//!
//! Text format: `Q: {question} A: {answer}`, or with the `support` option
//! `{support}\nQ: {question} A: {answer}` (questions without a support paragraph keep the plain form).
//! Per question, either the correct answer (label 1) or one of its three distractors (label 0),
//! chosen with the seed so that each split is balanced (positives = floor(n / 2)); with the `pairs`
//! option both, one positive and one negative per question (sizes then count questions).
//!
//! Splits: `weak_train` and `strong_train` are disjoint sets of questions drawn from the official
//! train file (11,679 questions; those whose text also appears in the official valid or test file
//! are left out); `test` is the official test file (a seeded subset when a smaller size is asked);
//! `valid` is drawn from the official valid file.

use super::{
    choice_examples, dedup_by_key, shuffled, take, ChoiceOptions, ChoiceQuestion, Dataset,
    ResolvedSizes, SplitSizes, ASK_SUFFIX,
};
use crate::io::read_text;
use crate::rng::Rng;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::Path;

pub const DEFAULT_SIZES: ResolvedSizes = ResolvedSizes {
    weak_train: 5000,
    strong_train: 5000,
    test: 1000,
    valid: 0,
};

#[derive(Debug, Deserialize)]
struct Record {
    question: String,
    correct_answer: String,
    distractor1: String,
    distractor2: String,
    distractor3: String,
    #[serde(default)]
    support: String,
}

fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = read_text(path)?;
    let records: Vec<Record> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of SciQ questions (question, correct_answer, distractor1-3, support)",
            path.display()
        )
    })?;
    Ok(records)
}

fn to_question(record: &Record, support: bool, ask: bool) -> Option<ChoiceQuestion> {
    let correct = record.correct_answer.trim().to_string();
    let wrong: Vec<String> = [
        &record.distractor1,
        &record.distractor2,
        &record.distractor3,
    ]
    .iter()
    .map(|d| d.trim().to_string())
    .filter(|d| !d.is_empty() && !d.eq_ignore_ascii_case(&correct))
    .collect();
    if correct.is_empty() || wrong.is_empty() {
        return None;
    }
    let question = record.question.trim();
    let prefix = if support && !record.support.trim().is_empty() {
        format!("{}\nQ: {question} A: ", record.support.trim())
    } else {
        format!("Q: {question} A: ")
    };
    Some(ChoiceQuestion {
        prefix,
        correct,
        wrong,
        suffix: if ask {
            ASK_SUFFIX.into()
        } else {
            String::new()
        },
    })
}

pub fn load(dir: &Path, options: ChoiceOptions, sizes: &SplitSizes, seed: u64) -> Result<Dataset> {
    let sizes = sizes.resolve(DEFAULT_SIZES);
    let train = read_records(&dir.join("train.json.gz"))?;
    let valid = read_records(&dir.join("valid.json"))?;
    let test = read_records(&dir.join("test.json"))?;

    let held_out: HashSet<String> = valid
        .iter()
        .chain(&test)
        .map(|r| r.question.trim().to_lowercase())
        .collect();
    let train_total = train.len();
    let pool: Vec<&Record> = train
        .iter()
        .filter(|r| !held_out.contains(&r.question.trim().to_lowercase()))
        .collect();
    let pool = dedup_by_key(pool, |r| r.question.trim().to_lowercase());
    let overlap = train_total - pool.len();
    let mut pool = shuffled(pool, seed, "sciq/train-pool");

    let available = format!(
        "the SciQ train file has {train_total} questions, {} after removing duplicates and questions also in valid/test",
        pool.len()
    );
    let weak = take(&mut pool, sizes.weak_train, "weak_train", &available)?;
    let strong = take(&mut pool, sizes.strong_train, "strong_train", &available)?;
    let mut test_pool = shuffled(test.iter().collect(), seed, "sciq/test");
    let test = take(
        &mut test_pool,
        sizes.test,
        "test",
        "the official SciQ test file has 1,000 questions",
    )?;
    let mut valid_pool = shuffled(valid.iter().collect(), seed, "sciq/valid");
    let valid = take(
        &mut valid_pool,
        sizes.valid,
        "valid",
        "the official SciQ valid file has 1,000 questions",
    )?;

    let build = |records: Vec<&Record>, purpose: &str| {
        let questions: Vec<ChoiceQuestion> = records
            .iter()
            .filter_map(|r| to_question(r, options.support, options.ask))
            .collect();
        let mut rng = Rng::derived(seed, purpose);
        choice_examples("sciq", &questions, options.pairs, &mut rng)
    };
    Ok(Dataset {
        task: "sciq".into(),
        num_classes: Some(2),
        seed,
        weak_train: build(weak, "sciq/labels/weak_train"),
        strong_train: build(strong, "sciq/labels/strong_train"),
        test: build(test, "sciq/labels/test"),
        valid: build(valid, "sciq/labels/valid"),
        provenance: format!(
            "SciQ official release; weak_train/strong_train drawn from the train file ({overlap} duplicate or held-out questions removed), \
             test from the official test file, valid from the official valid file; {}; seed {seed}",
            if options.pairs { "one positive and one negative per question" } else { "one answer per question, balanced" }
        ),
        label_names: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{default_data_dir, load as load_task, Label, TaskSpec};

    fn positive_rate(examples: &[crate::data::Example]) -> f64 {
        let positives = examples
            .iter()
            .filter(|e| e.label == Label::Class { class: 1 })
            .count();
        positives as f64 / examples.len() as f64
    }

    #[test]
    fn default_splits_have_paper_sizes_and_balance() {
        let spec = TaskSpec::parse("sciq", ChoiceOptions::default()).unwrap();
        let data = load_task(&default_data_dir(), &spec, &SplitSizes::default(), 0).unwrap();
        assert_eq!(data.weak_train.len(), 5000);
        assert_eq!(data.strong_train.len(), 5000);
        assert_eq!(data.test.len(), 1000);
        assert_eq!(data.valid.len(), 0);
        for split in [&data.weak_train, &data.strong_train, &data.test] {
            assert!((positive_rate(split) - 0.5).abs() <= 0.01);
        }
        let first = &data.test[0].input;
        assert!(
            first.starts_with("Q: ") && first.contains(" A: "),
            "{first}"
        );
    }

    #[test]
    fn splits_are_deterministic_and_depend_on_the_seed() {
        let spec = TaskSpec::parse("sciq", ChoiceOptions::default()).unwrap();
        let sizes = SplitSizes {
            weak_train: Some(200),
            strong_train: Some(200),
            test: Some(100),
            valid: Some(50),
        };
        let a = load_task(&default_data_dir(), &spec, &sizes, 1).unwrap();
        let b = load_task(&default_data_dir(), &spec, &sizes, 1).unwrap();
        let c = load_task(&default_data_dir(), &spec, &sizes, 2).unwrap();
        assert_eq!(a.data_hash(), b.data_hash());
        assert_ne!(a.data_hash(), c.data_hash());
        assert_eq!(a.valid.len(), 50);
    }

    #[test]
    fn pairs_give_one_positive_and_one_negative_per_question() {
        let options = ChoiceOptions {
            pairs: true,
            support: true,
            ask: false,
        };
        let spec = TaskSpec::Sciq(options);
        let sizes = SplitSizes {
            weak_train: Some(10),
            strong_train: Some(10),
            test: Some(10),
            valid: None,
        };
        let data = load_task(&default_data_dir(), &spec, &sizes, 0).unwrap();
        assert_eq!(data.weak_train.len(), 20);
        for pair in data.weak_train.chunks(2) {
            assert_eq!(pair[0].label, Label::Class { class: 1 });
            assert_eq!(pair[1].label, Label::Class { class: 0 });
            let question =
                |e: &crate::data::Example| e.input.rsplit_once(" A: ").unwrap().0.to_string();
            assert_eq!(question(&pair[0]), question(&pair[1]));
        }
        // the support option prepends a paragraph where the question has one
        assert!(data.test.iter().any(|e| !e.input.starts_with("Q: ")));
    }

    #[test]
    fn resplit_keeps_the_pool_and_the_test_set() {
        let spec = TaskSpec::parse("sciq", ChoiceOptions::default()).unwrap();
        let sizes = SplitSizes {
            weak_train: Some(100),
            strong_train: Some(60),
            test: Some(50),
            valid: None,
        };
        let pool = load_task(&default_data_dir(), &spec, &sizes, 0).unwrap();
        let a = pool.resplit(1);
        let b = pool.resplit(2);
        assert_eq!((a.weak_train.len(), a.strong_train.len()), (100, 60));
        assert_eq!(a.test, pool.test);
        let ids = |d: &crate::data::Dataset| {
            let mut v: Vec<String> = d
                .weak_train
                .iter()
                .chain(&d.strong_train)
                .map(|e| e.id.clone())
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids(&a), ids(&pool));
        assert_eq!(ids(&b), ids(&pool));
        assert_ne!(a.data_hash(), b.data_hash());
        assert_eq!(a.data_hash(), pool.resplit(1).data_hash());
    }

    #[test]
    fn too_large_a_split_is_a_clear_error() {
        let spec = TaskSpec::parse("sciq", ChoiceOptions::default()).unwrap();
        let sizes = SplitSizes {
            test: Some(5000),
            ..Default::default()
        };
        let err = load_task(&default_data_dir(), &spec, &sizes, 0).unwrap_err();
        assert!(
            format!("{err:#}").contains("asked for 5000 test examples"),
            "{err:#}"
        );
    }
}
