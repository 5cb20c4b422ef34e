//! Generic JSONL tasks for users' own data.
//!
//! - Classification: one `{"text": str, "label": int}` per line; labels are `0..K` and K is the
//!   largest label + 1 (at least 2).
//! - Generation: one `{"prompt": str, "target": str}` per line.
//!
//! Unknown fields are allowed (an `id` field, metadata); ids are content hashes. Without a separate
//! test file, the file is split with the seed into 40% weak_train / 40% strong_train / 20% test by
//! default; with `test_path`, the test split is that file and the first file is split 50 / 50.

use super::{dedup_by_key, shuffled, take, Dataset, Example, Label, ResolvedSizes, SplitSizes};
use crate::error::InputError;
use crate::hash::example_id;
use crate::io::read_jsonl_map;
use anyhow::{bail, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct ClassRecord {
    text: String,
    label: i64,
}

#[derive(Deserialize)]
struct GenRecord {
    prompt: String,
    target: String,
}

const CLASS_SHAPE: &str = "{\"text\": str, \"label\": int >= 0}";
const GEN_SHAPE: &str = "{\"prompt\": str, \"target\": str}";

/// An input text must hold something to encode (an empty one cannot be pooled or prompted).
fn nonempty(path: &Path, line: usize, field: &str, text: &str) -> Result<(), InputError> {
    if text.trim().is_empty() {
        return Err(InputError::at_line(
            path,
            line,
            format!("`{field}` is empty; every example needs a non-empty {field}"),
        ));
    }
    Ok(())
}

fn read_classification(path: &Path) -> Result<Vec<Example>, InputError> {
    read_jsonl_map(path, CLASS_SHAPE, |line, record: ClassRecord| {
        nonempty(path, line, "text", &record.text)?;
        let class = usize::try_from(record.label).map_err(|_| {
            InputError::at_line(
                path,
                line,
                format!("label {} is negative; expected {CLASS_SHAPE}", record.label),
            )
        })?;
        Ok(Example {
            id: example_id(&["classify", &record.text, &class.to_string()]),
            input: record.text,
            label: Label::Class { class },
        })
    })
}

fn read_generation(path: &Path) -> Result<Vec<Example>, InputError> {
    read_jsonl_map(path, GEN_SHAPE, |line, record: GenRecord| {
        nonempty(path, line, "prompt", &record.prompt)?;
        nonempty(path, line, "target", &record.target)?;
        Ok(Example {
            id: example_id(&["generate", &record.prompt, &record.target]),
            input: record.prompt,
            label: Label::Text {
                target: record.target,
            },
        })
    })
}

fn split(
    task: String,
    num_classes: Option<usize>,
    examples: Vec<Example>,
    test_file: Option<Vec<Example>>,
    sizes: &SplitSizes,
    seed: u64,
    source: &Path,
) -> Result<Dataset> {
    let examples = dedup_by_key(examples, |e| e.id.clone());
    let n = examples.len();
    let defaults = match &test_file {
        None => ResolvedSizes {
            weak_train: n * 2 / 5,
            strong_train: n * 2 / 5,
            test: n - 2 * (n * 2 / 5),
            valid: 0,
        },
        Some(test) => ResolvedSizes {
            weak_train: n / 2,
            strong_train: n - n / 2,
            test: test.len(),
            valid: 0,
        },
    };
    let resolved = sizes.resolve(defaults);
    let available = format!("{} holds {n} distinct examples", source.display());
    let mut pool = shuffled(examples, seed, &format!("{task}/pool"));
    let weak_train = take(&mut pool, resolved.weak_train, "weak_train", &available)?;
    let strong_train = take(&mut pool, resolved.strong_train, "strong_train", &available)?;
    let valid = take(&mut pool, resolved.valid, "valid", &available)?;
    let test = match test_file {
        None => take(&mut pool, resolved.test, "test", &available)?,
        Some(test) => {
            let total = test.len();
            let mut test = shuffled(test, seed, &format!("{task}/test"));
            take(
                &mut test,
                resolved.test,
                "test",
                &format!("the test file holds {total} examples"),
            )?
        }
    };
    Ok(Dataset {
        provenance: format!("{} split with seed {seed}", source.display()),
        task,
        num_classes,
        seed,
        weak_train,
        strong_train,
        test,
        valid,
    })
}

pub fn load_classification(
    path: &Path,
    test_path: Option<&Path>,
    sizes: &SplitSizes,
    seed: u64,
) -> Result<Dataset> {
    let examples = read_classification(path)?;
    let test = test_path.map(read_classification).transpose()?;
    let max_label = examples
        .iter()
        .chain(test.iter().flatten())
        .filter_map(|e| e.label.class())
        .max()
        .unwrap_or(0);
    let num_classes = (max_label + 1).max(2);
    let present: std::collections::HashSet<usize> =
        examples.iter().filter_map(|e| e.label.class()).collect();
    if present.len() < 2 {
        bail!("{}: every example has the same label; a classification task needs at least two classes", path.display());
    }
    split(
        format!("classify:{}", path.display()),
        Some(num_classes),
        examples,
        test,
        sizes,
        seed,
        path,
    )
}

pub fn load_generation(
    path: &Path,
    test_path: Option<&Path>,
    sizes: &SplitSizes,
    seed: u64,
) -> Result<Dataset> {
    let examples = read_generation(path)?;
    let test = test_path.map(read_generation).transpose()?;
    split(
        format!("generate:{}", path.display()),
        None,
        examples,
        test,
        sizes,
        seed,
        path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_jsonl_splits_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let lines: Vec<String> = (0..50)
            .map(|i| format!("{{\"text\": \"item {i}\", \"label\": {}}}", i % 3))
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let data = load_classification(&path, None, &SplitSizes::default(), 0).unwrap();
        assert_eq!(data.num_classes, Some(3));
        assert_eq!(
            (
                data.weak_train.len(),
                data.strong_train.len(),
                data.test.len()
            ),
            (20, 20, 10)
        );

        std::fs::write(
            &path,
            "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": -1}\n",
        )
        .unwrap();
        let err = load_classification(&path, None, &SplitSizes::default(), 0).unwrap_err();
        assert!(
            format!("{err:#}").contains("c.jsonl:2: label -1 is negative"),
            "{err:#}"
        );

        std::fs::write(
            &path,
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 1}\n",
        )
        .unwrap();
        let err = load_classification(&path, None, &SplitSizes::default(), 0).unwrap_err();
        assert!(format!("{err:#}").contains("same label"), "{err:#}");
    }

    #[test]
    fn generation_jsonl_with_separate_test_file() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("g.jsonl");
        let test = dir.path().join("t.jsonl");
        let lines: Vec<String> = (0..10)
            .map(|i| format!("{{\"prompt\": \"p{i}\", \"target\": \"t{i}\"}}"))
            .collect();
        std::fs::write(&train, lines.join("\n")).unwrap();
        std::fs::write(&test, "{\"prompt\": \"q\", \"target\": \"r\"}\n").unwrap();
        let data = load_generation(&train, Some(&test), &SplitSizes::default(), 0).unwrap();
        assert_eq!(
            (
                data.weak_train.len(),
                data.strong_train.len(),
                data.test.len()
            ),
            (5, 5, 1)
        );
        assert_eq!(data.test[0].label.target(), Some("r"));

        std::fs::write(&test, "{\"prompt\": \"q\"}\n").unwrap();
        let err = load_generation(&train, Some(&test), &SplitSizes::default(), 0).unwrap_err();
        assert!(
            format!("{err:#}").contains("t.jsonl:1: expected a JSON object"),
            "{err:#}"
        );
        assert!(
            format!("{err:#}").contains("missing field `target`"),
            "{err:#}"
        );
    }
}
