//! Users' own tasks, from JSONL, CSV / TSV or Parquet files (data/table.rs reads them).
//!
//! - Classification: a text column and a label column (default `text`, `label`). Labels are
//!   integers `0..K` (K is the largest label + 1, at least 2) or strings, mapped to classes in
//!   sorted order (the mapping is kept in the dataset and recorded in results.json).
//! - Generation: a prompt column and a target column (default `prompt`, `target`).
//!
//! Other columns are allowed (an id, metadata); ids are content hashes. Without a separate
//! test file, the file is split with the seed into 40% weak_train / 40% strong_train / 20% test by
//! default; with `test_path`, the test split is that file and the first file is split 50 / 50.

use super::table::{self, Cell, Format};
use super::{dedup_by_key, shuffled, take, Dataset, Example, Label, ResolvedSizes, SplitSizes};
use crate::error::InputError;
use crate::hash::example_id;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The columns that hold a task's fields (the `*_column` settings of `[task]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Columns {
    pub text: String,
    pub label: String,
    pub prompt: String,
    pub target: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            text: "text".into(),
            label: "label".into(),
            prompt: "prompt".into(),
            target: "target".into(),
        }
    }
}

/// A non-empty text from a cell (an empty one cannot be pooled or prompted).
fn text_of(
    path: &Path,
    (format, position): (Format, usize),
    column: &str,
    cell: Cell,
) -> Result<String, InputError> {
    match cell {
        Cell::Str(s) if !s.trim().is_empty() => Ok(s),
        Cell::Str(_) => Err(table::at(
            path,
            format,
            position,
            format!("`{column}` is empty; every example needs a non-empty {column}"),
        )),
        // CSV cells that look like integers are read as integers: as text they are text.
        Cell::Int(i) if format != Format::Parquet && format != Format::Jsonl => Ok(i.to_string()),
        other => Err(table::at(
            path,
            format,
            position,
            format!("`{column}` must be a string, got {}", other.describe()),
        )),
    }
}

/// A label as read: a class number, or a class name.
#[derive(Debug, Clone, PartialEq)]
enum RawLabel {
    Number(usize),
    Name(String),
}

struct ClassRow {
    position: usize,
    text: String,
    label: RawLabel,
}

fn read_class_rows(path: &Path, columns: &Columns) -> Result<(Format, Vec<ClassRow>), InputError> {
    let (format, rows) = table::read(path, &[&columns.text, &columns.label])?;
    let rows = rows
        .into_iter()
        .map(|row| {
            let at = (format, row.position);
            let mut cells = row.cells.into_iter();
            let text = text_of(path, at, &columns.text, cells.next().unwrap_or(Cell::Null))?;
            let label = match cells.next().unwrap_or(Cell::Null) {
                Cell::Int(v) if v >= 0 => RawLabel::Number(v as usize),
                Cell::Int(v) => {
                    return Err(table::at(
                        path,
                        format,
                        row.position,
                        format!("label {v} is negative; labels are integers >= 0 or strings"),
                    ))
                }
                Cell::Float(v) if v >= 0.0 && v.fract() == 0.0 && v < 1e9 => {
                    RawLabel::Number(v as usize)
                }
                Cell::Str(s) if !s.trim().is_empty() => RawLabel::Name(s),
                other => {
                    return Err(table::at(
                        path,
                        format,
                        row.position,
                        format!(
                            "`{}` must be an integer >= 0 or a non-empty string, got {}",
                            columns.label,
                            other.describe()
                        ),
                    ))
                }
            };
            Ok(ClassRow {
                position: row.position,
                text,
                label,
            })
        })
        .collect::<Result<_, InputError>>()?;
    Ok((format, rows))
}

/// The classes of each file's rows, and the class names where labels were strings.
type Classes = (Vec<Vec<usize>>, Option<Vec<String>>);

/// Classes from labels as read: numbers as they are, names in sorted order (returned). Every
/// label of a task must be of one kind.
fn classes_of(files: &[(&Path, Format, &[ClassRow])]) -> Result<Classes, InputError> {
    let first = files
        .iter()
        .find_map(|(_, _, rows)| rows.first())
        .map(|r| matches!(r.label, RawLabel::Name(_)));
    let named = first.unwrap_or(false);
    for (path, format, rows) in files {
        if let Some(row) = rows
            .iter()
            .find(|r| matches!(r.label, RawLabel::Name(_)) != named)
        {
            return Err(table::at(
                path,
                *format,
                row.position,
                format!(
                    "a {} label among {} labels; give every label as an integer or every label as a string",
                    if named { "numeric" } else { "string" },
                    if named { "string" } else { "numeric" }
                ),
            ));
        }
    }
    let names: Option<Vec<String>> = named.then(|| {
        let set: std::collections::BTreeSet<&str> = files
            .iter()
            .flat_map(|(_, _, rows)| rows.iter())
            .filter_map(|r| match &r.label {
                RawLabel::Name(n) => Some(n.as_str()),
                RawLabel::Number(_) => None,
            })
            .collect();
        set.into_iter().map(str::to_string).collect()
    });
    let classes = files
        .iter()
        .map(|(_, _, rows)| {
            rows.iter()
                .map(|r| match &r.label {
                    RawLabel::Number(c) => *c,
                    RawLabel::Name(n) => names
                        .as_ref()
                        .and_then(|all| all.binary_search(n).ok())
                        .unwrap_or(0),
                })
                .collect()
        })
        .collect();
    Ok((classes, names))
}

fn class_examples(rows: Vec<ClassRow>, classes: &[usize]) -> Vec<Example> {
    rows.into_iter()
        .zip(classes)
        .map(|(row, &class)| Example {
            id: example_id(&["classify", &row.text, &class.to_string()]),
            input: row.text,
            label: Label::Class { class },
        })
        .collect()
}

fn read_generation(path: &Path, columns: &Columns) -> Result<Vec<Example>, InputError> {
    let (format, rows) = table::read(path, &[&columns.prompt, &columns.target])?;
    rows.into_iter()
        .map(|row| {
            let at = (format, row.position);
            let mut cells = row.cells.into_iter();
            let prompt = text_of(
                path,
                at,
                &columns.prompt,
                cells.next().unwrap_or(Cell::Null),
            )?;
            let target = text_of(
                path,
                at,
                &columns.target,
                cells.next().unwrap_or(Cell::Null),
            )?;
            Ok(Example {
                id: example_id(&["generate", &prompt, &target]),
                input: prompt,
                label: Label::Text { target },
            })
        })
        .collect()
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
    // The shuffle depends on the seed and the rows, not on where the file lies or its format:
    // the same rows give the same splits as JSONL, CSV or Parquet, from any folder.
    let kind = if num_classes.is_some() {
        "classify"
    } else {
        "generate"
    };
    let mut pool = shuffled(examples, seed, &format!("{kind}/pool"));
    let weak_train = take(&mut pool, resolved.weak_train, "weak_train", &available)?;
    let strong_train = take(&mut pool, resolved.strong_train, "strong_train", &available)?;
    let valid = take(&mut pool, resolved.valid, "valid", &available)?;
    let test = match test_file {
        None => take(&mut pool, resolved.test, "test", &available)?,
        Some(test) => {
            let total = test.len();
            let mut test = shuffled(test, seed, &format!("{kind}/test"));
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
        label_names: None,
    })
}

pub fn load_classification(
    path: &Path,
    test_path: Option<&Path>,
    columns: &Columns,
    sizes: &SplitSizes,
    seed: u64,
) -> Result<Dataset> {
    let (format, rows) = read_class_rows(path, columns)?;
    let test_rows = test_path
        .map(|p| read_class_rows(p, columns).map(|(f, rows)| (p, f, rows)))
        .transpose()?;
    let mut files: Vec<(&Path, Format, &[ClassRow])> = vec![(path, format, &rows)];
    if let Some((p, f, rows)) = &test_rows {
        files.push((p, *f, rows));
    }
    let (classes, label_names) = classes_of(&files)?;
    let examples = class_examples(rows, &classes[0]);
    let test = test_rows.map(|(_, _, rows)| class_examples(rows, &classes[1]));
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
    let mut dataset = split(
        format!("classify:{}", path.display()),
        Some(num_classes),
        examples,
        test,
        sizes,
        seed,
        path,
    )?;
    dataset.label_names = label_names;
    Ok(dataset)
}

pub fn load_generation(
    path: &Path,
    test_path: Option<&Path>,
    columns: &Columns,
    sizes: &SplitSizes,
    seed: u64,
) -> Result<Dataset> {
    let examples = read_generation(path, columns)?;
    let test = test_path.map(|p| read_generation(p, columns)).transpose()?;
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
        let data = load_classification(&path, None, &Columns::default(), &SplitSizes::default(), 0)
            .unwrap();
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
        let err = load_classification(&path, None, &Columns::default(), &SplitSizes::default(), 0)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("c.jsonl:2: label -1 is negative"),
            "{err:#}"
        );

        std::fs::write(
            &path,
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 1}\n",
        )
        .unwrap();
        let err = load_classification(&path, None, &Columns::default(), &SplitSizes::default(), 0)
            .unwrap_err();
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
        let data = load_generation(
            &train,
            Some(&test),
            &Columns::default(),
            &SplitSizes::default(),
            0,
        )
        .unwrap();
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
        let err = load_generation(
            &train,
            Some(&test),
            &Columns::default(),
            &SplitSizes::default(),
            0,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("t.jsonl:1: no field `target`; this line has: prompt"),
            "{err:#}"
        );
    }
}
