//! Users' own data as JSONL, CSV and Parquet (fixtures written by pandas / pyarrow,
//! tests/fixtures/data/make.py): the same rows give the same dataset and the same
//! `ws2s data stats`; string labels map to classes in sorted order; column names are
//! settable; and every reader's errors name the file and the line or row.

mod common;

use common::ws2s;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

/// `data stats --json` without the fields that name the file.
fn stats(task: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["data", "stats", task, "--json"];
    args.extend_from_slice(extra);
    let output = ws2s(&args);
    assert!(
        output.status.success(),
        "{task}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let object = json.as_object_mut().unwrap();
    // These name the file (the data hash hashes the task's name too).
    object.remove("task");
    object.remove("provenance");
    object.remove("data_hash");
    // Every example of every split, with its id: the splits themselves must agree.
    for split in ["weak-train", "strong-train", "test"] {
        let mut args = vec![
            "data", "show", task, "--split", split, "-n", "1000", "--json",
        ];
        args.extend_from_slice(extra);
        let output = ws2s(&args);
        assert!(output.status.success());
        object.insert(
            split.into(),
            String::from_utf8(output.stdout).unwrap().into(),
        );
    }
    json
}

#[test]
fn the_same_rows_as_jsonl_csv_and_parquet_give_the_same_dataset() {
    let jsonl = stats(
        &format!("classify:{}", fixture("rows.jsonl").display()),
        &[],
    );
    for name in ["rows.csv", "rows.parquet"] {
        let other = stats(&format!("classify:{}", fixture(name).display()), &[]);
        assert_eq!(other, jsonl, "{name}");
    }
    assert_eq!(jsonl["num_classes"], 2);
    // 30 rows: 12 / 12 / 6 by default.
    let sizes: Vec<u64> = jsonl["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["n"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes.iter().sum::<u64>(), 30, "{sizes:?}");
}

#[test]
fn string_labels_map_to_sorted_classes_under_chosen_columns() {
    let columns = ["--text-column", "sentence", "--label-column", "sentiment"];
    let parquet = stats(
        &format!("classify:{}", fixture("named.parquet").display()),
        &columns,
    );
    let csv = stats(
        &format!("classify:{}", fixture("named.csv").display()),
        &columns,
    );
    assert_eq!(parquet, csv);
    assert_eq!(parquet["num_classes"], 3);
    assert_eq!(
        parquet["label_names"],
        serde_json::json!(["negative", "neutral", "positive"])
    );
    let gen = stats(
        &format!("generate:{}", fixture("gen.parquet").display()),
        &["--prompt-column", "question", "--target-column", "answer"],
    );
    assert_eq!(gen["num_classes"], serde_json::Value::Null);
}

fn bad(task: &str, extra: &[&str], expected: &[&str]) {
    let mut args = vec!["data", "stats", task];
    args.extend_from_slice(extra);
    let output = ws2s(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{task}: {stderr}");
    assert!(output.stdout.is_empty());
    for needle in expected {
        assert!(stderr.contains(needle), "`{needle}` missing in: {stderr}");
    }
}

#[test]
fn each_reader_names_the_file_and_the_row_of_a_fault() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        format!("classify:{}", path.display())
    };
    // A missing column lists the columns that exist, in every format.
    bad(
        &format!("classify:{}", fixture("rows.parquet").display()),
        &["--text-column", "txt"],
        &["rows.parquet", "no column `txt`", "text, label, source"],
    );
    bad(
        &format!("classify:{}", fixture("rows.csv").display()),
        &["--label-column", "y"],
        &["rows.csv", "no column `y`", "text, label, source"],
    );
    bad(
        &format!("classify:{}", fixture("rows.jsonl").display()),
        &["--label-column", "y"],
        &["rows.jsonl:1", "no field `y`", "label, source, text"],
    );
    // CSV: a row with a missing field, an empty text, a negative label.
    bad(
        &write("short.csv", "text,label\na,0\nb\nc,1\n"),
        &[],
        &["short.csv:3"],
    );
    bad(
        &write("empty.csv", "text,label\na,0\n,1\n"),
        &[],
        &["empty.csv:3", "`text` is empty"],
    );
    bad(
        &write("neg.csv", "text,label\na,0\nb,-2\n"),
        &[],
        &["neg.csv:3", "label -2 is negative"],
    );
    // Labels of two kinds; a null label; an unknown extension.
    bad(
        &write("mixed.csv", "text,label\na,yes\nb,1\n"),
        &[],
        &["mixed.csv:3", "numeric label among string labels"],
    );
    bad(
        &write(
            "null.jsonl",
            "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": null}\n",
        ),
        &[],
        &["null.jsonl:2", "got null"],
    );
    bad(
        &write("rows.xlsx", "x"),
        &[],
        &["rows.xlsx", "unknown file type", ".parquet"],
    );
    // Parquet: not Parquet at all; a row whose label is a float that is not a class.
    bad(
        &write("fake.parquet", "not parquet"),
        &[],
        &["fake.parquet", "not a readable Parquet file"],
    );
    bad(
        &format!("generate:{}", fixture("gen.parquet").display()),
        &["--prompt-column", "question"],
        &["gen.parquet", "no column `target`", "question, answer"],
    );
    // Column options where they do nothing.
    bad(
        "sciq",
        &["--text-column", "t"],
        &["only for classify:/generate: tasks"],
    );
}
