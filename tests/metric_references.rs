//! The metrics against reference values computed independently: scikit-learn / numpy for
//! classification, the official SLURP scorer for slot filling (see the READMEs of the fixtures).

use serde_json::Value;
use std::path::{Path, PathBuf};
use ws2s::eval::{classify, slurp, summary};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_close(name: &str, key: &str, got: Option<f64>, expected: &Value) {
    match (got, expected.as_f64()) {
        (None, None) => assert!(
            expected.is_null(),
            "{name}.{key}: expected {expected}, got null"
        ),
        (Some(g), Some(e)) => assert!((g - e).abs() < 1e-9, "{name}.{key}: expected {e}, got {g}"),
        (g, _) => panic!("{name}.{key}: expected {expected}, got {g:?}"),
    }
}

#[test]
fn classification_metrics_match_sklearn_and_numpy() {
    let names = [
        "binary_random",
        "binary_ties",
        "multiclass",
        "multiclass_missing_class",
        "one_class",
        "perfect",
        "bin_edges",
    ];
    for name in names {
        let dir = fixtures().join("classify");
        let predictions = classify::read_predictions(&dir.join(format!("{name}.jsonl"))).unwrap();
        let expected = read_json(&dir.join(format!("{name}.expected.json")));
        let m = classify::classify_metrics(&predictions).unwrap();
        assert_close(name, "accuracy", Some(m.accuracy), &expected["accuracy"]);
        assert_close(name, "auroc", m.auroc, &expected["auroc"]);
        assert_close(name, "ece", Some(m.ece), &expected["ece"]);
        assert_close(name, "brier", Some(m.brier), &expected["brier"]);
        assert_eq!(m.n as u64, expected["n"].as_u64().unwrap(), "{name}.n");
    }
}

const SLURP_KEYS: [&str; 13] = [
    "span_precision",
    "span_recall",
    "span_f1",
    "word_precision",
    "word_recall",
    "word_f1",
    "char_precision",
    "char_recall",
    "char_f1",
    "slu_precision",
    "slu_recall",
    "slu_f1",
    "exact_match",
];

fn check_slurp(name: &str, gold: &Path, pred: &Path, expected: &Path) {
    let gold = slurp::read_records(gold).unwrap();
    let pred = slurp::read_records(pred).unwrap();
    let (metrics, unknown) = slurp::slurp_metrics(&gold, &pred);
    assert!(unknown.is_empty());
    let got = serde_json::to_value(&metrics).unwrap();
    let expected = read_json(expected);
    for key in SLURP_KEYS {
        assert_close(name, key, got[key].as_f64(), &expected[key]);
    }
    assert_eq!(got["n"], expected["n"], "{name}.n");
}

#[test]
fn slurp_metrics_match_the_official_scorer() {
    let dir = fixtures().join("slurp");
    check_slurp(
        "all",
        &dir.join("gold.jsonl"),
        &dir.join("pred.jsonl"),
        &dir.join("expected.json"),
    );
    for case in 1..=6 {
        let name = format!("case{case}");
        let path = |suffix: &str| dir.join("cases").join(format!("{name}_{suffix}"));
        check_slurp(
            &name,
            &path("gold.jsonl"),
            &path("pred.jsonl"),
            &path("expected.json"),
        );
    }
}

#[test]
fn slurp_missing_predictions_count_as_empty() {
    let dir = fixtures().join("slurp");
    let gold = slurp::read_records(&dir.join("gold.jsonl")).unwrap();
    let pred = slurp::read_records(&dir.join("pred.jsonl")).unwrap();
    let (metrics, _) = slurp::slurp_metrics(&gold, &pred);
    assert_eq!(metrics.missing_predictions, 2);
    // The official scorer skips such ids instead; scoring only the predicted ids must give its numbers.
    let predicted_ids: std::collections::HashSet<_> = pred.iter().map(|p| p.id.clone()).collect();
    let scored: Vec<_> = gold
        .into_iter()
        .filter(|g| predicted_ids.contains(&g.id))
        .collect();
    let (skipped, _) = slurp::slurp_metrics(&scored, &pred);
    let got = serde_json::to_value(&skipped).unwrap();
    let expected = read_json(&dir.join("expected_official_skip_missing.json"));
    for key in SLURP_KEYS
        .iter()
        .filter(|k| **k != "exact_match" && expected.get(**k).is_some())
    {
        assert_close("skip_missing", key, got[key].as_f64(), &expected[key]);
    }
}

#[test]
fn pgr_and_bootstrap_match_reference_values() {
    let reference = read_json(&fixtures().join("classify/pgr_bootstrap.json"));
    for case in reference["pgr"].as_array().unwrap() {
        let got = summary::pgr(
            case["student"].as_f64().unwrap(),
            case["weak"].as_f64().unwrap(),
            case["ceiling"].as_f64().unwrap(),
        );
        assert_close("pgr", "pgr", got, &case["pgr"]);
    }
    let boot = &reference["bootstrap"];
    let sample: Vec<f64> = boot["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let s = summary::summarize(&sample, 0).unwrap();
    assert_close("bootstrap", "mean", Some(s.mean), &boot["mean"]);
    assert_close("bootstrap", "std", s.std, &boot["std_ddof1"]);
    let (low, high) = s.ci95.unwrap();
    // exact percentiles from full enumeration of the 5^5 resamples; Monte Carlo error < 0.005
    assert!(
        (low - boot["p2_5"].as_f64().unwrap()).abs() < 0.005,
        "{low}"
    );
    assert!(
        (high - boot["p97_5"].as_f64().unwrap()).abs() < 0.005,
        "{high}"
    );
}
