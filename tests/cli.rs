//! The command line end to end: outputs, and bad input (file and line named, exit code 2,
//! nothing on stdout).

mod common;

use common::ws2s;
use std::path::Path;
use std::process::{Command, Output};

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_bad_input(output: &Output, expected: &[&str]) {
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(output));
    assert!(
        stdout(output).is_empty(),
        "stdout should be empty: {}",
        stdout(output)
    );
    for needle in expected {
        assert!(
            stderr(output).contains(needle),
            "missing `{needle}` in: {}",
            stderr(output)
        );
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn eval_classify_prints_one_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let pred = write(
        dir.path(),
        "p.jsonl",
        "{\"label\": 1, \"probs\": [0.2, 0.8]}\n{\"label\": 0, \"probs\": [0.6, 0.4]}\n",
    );
    let output = ws2s(&["eval", "classify", "--pred", &pred]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(value["accuracy"], 1.0);
    assert_eq!(value["auroc"], 1.0);
    assert_eq!(value["n"], 2);
    assert!(value["ece"].is_number() && value["brier"].is_number());
}

#[test]
fn eval_classify_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let ok = "{\"label\": 1, \"probs\": [0.2, 0.8]}\n";
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "sum.jsonl",
            format!("{ok}{{\"label\": 0, \"probs\": [0.5, 0.6]}}\n"),
            vec!["sum.jsonl:2:", "sum to"],
        ),
        (
            "range.jsonl",
            format!("{ok}{ok}{{\"label\": 2, \"probs\": [0.5, 0.5]}}\n"),
            vec!["range.jsonl:3:", "out of range"],
        ),
        (
            "field.jsonl",
            "{\"probs\": [0.5, 0.5]}\n".into(),
            vec!["field.jsonl:1:", "missing field `label`"],
        ),
        (
            "json.jsonl",
            format!("{ok}{{\"label\": 1, \"probs\": [0.5, \n"),
            vec!["json.jsonl:2:", "expected a JSON object"],
        ),
        ("empty.jsonl", "".into(), vec!["empty.jsonl", "empty"]),
        (
            "k.jsonl",
            format!("{ok}{{\"label\": 0, \"probs\": [0.2, 0.3, 0.5]}}\n"),
            vec!["k.jsonl:2:", "earlier predictions had 2"],
        ),
        (
            "neg.jsonl",
            "{\"label\": -1, \"probs\": [0.5, 0.5]}\n".into(),
            vec!["neg.jsonl:1:"],
        ),
    ];
    for (name, text, expected) in cases {
        let path = write(dir.path(), name, &text);
        assert_bad_input(&ws2s(&["eval", "classify", "--pred", &path]), &expected);
    }
    let missing = dir.path().join("nope.jsonl");
    assert_bad_input(
        &ws2s(&["eval", "classify", "--pred", missing.to_str().unwrap()]),
        &["nope.jsonl", "cannot open"],
    );
}

#[test]
fn eval_slurp_scores_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let gold = write(
        dir.path(),
        "gold.jsonl",
        "{\"id\": \"a\", \"entities\": [{\"type\": \"date\", \"filler\": \"friday\"}]}\n{\"id\": \"b\", \"entities\": []}\n",
    );
    let pred = write(
        dir.path(),
        "pred.jsonl",
        "{\"id\": \"a\", \"entities\": [{\"type\": \"date\", \"filler\": \"friday\"}]}\n",
    );
    let output = ws2s(&["eval", "slurp", "--gold", &gold, "--pred", &pred]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(value["span_f1"], 1.0);
    assert_eq!(value["slu_f1"], 1.0);
    assert_eq!(value["exact_match"], 1.0);
    assert_eq!(value["n"], 2);

    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"id\": \"a\", \"entities\": [{\"type\": \"date\"}]}\n",
    );
    assert_bad_input(
        &ws2s(&["eval", "slurp", "--gold", &gold, "--pred", &bad]),
        &["bad.jsonl:1:", "missing field `filler`"],
    );
    let dup = write(
        dir.path(),
        "dup.jsonl",
        "{\"id\": \"a\", \"entities\": []}\n{\"id\": \"a\", \"entities\": []}\n",
    );
    assert_bad_input(
        &ws2s(&["eval", "slurp", "--gold", &dup, "--pred", &pred]),
        &["dup.jsonl:2:", "repeats line 1"],
    );
}

#[test]
fn data_stats_sciq_shows_paper_sizes_and_balance() {
    let output = ws2s(&["data", "stats", "sciq", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let splits = value["splits"].as_array().unwrap();
    let sizes: Vec<u64> = splits.iter().map(|s| s["n"].as_u64().unwrap()).collect();
    assert_eq!(sizes, vec![5000, 5000, 1000, 0]);
    for split in &splits[..3] {
        let rate = split["positive_rate"].as_f64().unwrap();
        assert!((rate - 0.5).abs() <= 0.01, "{rate}");
    }
    let table = stdout(&ws2s(&["data", "stats", "sciq"]));
    assert!(
        table.contains("weak_train") && table.contains("5000") && table.contains("50.0%"),
        "{table}"
    );
}

#[test]
fn data_show_and_unknown_task() {
    let output = ws2s(&[
        "data",
        "show",
        "slurp",
        "--split",
        "strong-train",
        "-n",
        "2",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    let example: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert!(example["label"]["target"]
        .as_str()
        .unwrap()
        .starts_with('{'));
    assert_bad_input(
        &ws2s(&["data", "stats", "sciqq"]),
        &["unknown task `sciqq`"],
    );
}

#[test]
fn config_check_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llama_gguf/tiny-llama.gguf");
    let good = write(
        dir.path(),
        "good.toml",
        &format!(
            "name = \"x\"\n[task]\nname = \"sciq\"\n[[weak]]\nmodel = \"{m}\"\n[strong]\nmodel = \"{m}\"\n",
            m = tiny.display()
        ),
    );
    let output = ws2s(&["config", "check", &good]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("\"seeds\""));
    let bad = write(
        dir.path(),
        "bad.toml",
        "name = \"x\"\nlearning_rat = 1.0\n[task]\nname = \"sciq\"\n",
    );
    assert_bad_input(
        &ws2s(&["config", "check", &bad]),
        &["bad.toml", "learning_rat"],
    );
}

#[test]
fn demo_without_models_says_exactly_what_to_run() {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .arg("demo")
        .env("WS2S_HOME", home.path())
        .output()
        .unwrap();
    assert_bad_input(&output, &["scripts/fetch-models smollm2-135m gemma3-270m qwen2.5-coder-0.5b all-minilm-l6-v2 qwen2.5-coder-1.5b"]);
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/demo.toml");
    let checked = Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .args(["config", "check", config.to_str().unwrap()])
        .env("WS2S_HOME", home.path())
        .output()
        .unwrap();
    assert_bad_input(
        &checked,
        &[
            "weak[1].model",
            "is not installed",
            "scripts/fetch-models smollm2-135m",
        ],
    );
}

#[test]
fn every_bundled_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // Values, data and sizes are checked before the models: where a model is not
            // installed (CI), everything else has passed.
            let output = ws2s(&["config", "check", path.to_str().unwrap()]);
            assert!(
                output.status.success() || stderr(&output).contains("is not installed"),
                "{}: {}",
                path.display(),
                stderr(&output)
            );
            checked += 1;
        }
    }
    assert!(checked >= 4);
}

#[test]
fn run_checks_every_model_and_the_output_folder_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llama_gguf/tiny-llama.gguf");
    let data = write(
        dir.path(),
        "task.jsonl",
        &(0..40)
            .map(|i| format!("{{\"text\": \"item {i}\", \"label\": {}}}", i % 2))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let config = |strong: &str| {
        write(
            dir.path(),
            "c.toml",
            &format!(
                "name = \"x\"\n[task]\nname = \"classify:{data}\"\n[[weak]]\nmodel = \"{}\"\n[strong]\nmodel = \"{strong}\"\n",
                tiny.display()
            ),
        )
    };
    let out = dir.path().join("out");
    // The strong model is missing: found before the weak model's features are extracted.
    let missing = dir.path().join("no-such-model.gguf");
    let output = ws2s(&[
        "run",
        &config(missing.to_str().unwrap()),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_bad_input(&output, &["c.toml", "strong.model", "no-such-model.gguf"]);
    assert!(!out.exists(), "nothing written");
    assert!(
        !stderr(&output).contains("features:"),
        "{}",
        stderr(&output)
    );
    // An output folder under a file cannot be created.
    let file = write(dir.path(), "a-file", "x");
    let bad_out = format!("{file}/out");
    let output = ws2s(&["run", &config(tiny.to_str().unwrap()), "--out", &bad_out]);
    assert_bad_input(&output, &["--out", "a-file"]);
}

#[test]
fn every_bench_and_device_flag_parses() {
    // Each command gets all its flags and a bad workload or model, so that it stops at our own
    // error (exit 2, naming the model) rather than at clap's ("unexpected argument").
    let cases: [&[&str]; 4] = [
        &[
            "bench",
            "train",
            "--workload",
            "nope",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--precision",
            "f32",
            "--device",
            "cpu",
            "--json",
        ],
        &[
            "bench",
            "forward",
            "--model",
            "nope",
            "--batch",
            "1",
            "--seq-len",
            "2",
            "--repeats",
            "1",
            "--precision",
            "auto",
            "--device",
            "cpu",
            "--json",
        ],
        &[
            "bench",
            "decode",
            "--model",
            "nope",
            "--prompts",
            "1",
            "--prompt-len",
            "2",
            "--beams",
            "1",
            "--new-tokens",
            "1",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
        &[
            "generate",
            "--model",
            "nope",
            "--prompt",
            "hi",
            "--device",
            "cpu",
            "--precision",
            "f32",
        ],
    ];
    for args in cases {
        let output = ws2s(args);
        assert_bad_input(&output, &["nope"]);
        assert!(
            !stderr(&output).contains("unexpected argument"),
            "{}",
            stderr(&output)
        );
    }
}

#[test]
fn a_cap_below_amx_keeps_decoding_off_the_tiles() {
    // Decoding picks bf16x2 on the AMX-BF16 tiles where the CPU has them; WS2S_MAX_ISA=avx512
    // must take the tiles away like every other AMX kernel (it once did not), leaving bf16x2 by
    // AVX512-BF16 where the CPU has that, else f32; below AVX-512, f32.
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llama_gguf/tiny-llama.gguf");
    let tiny = tiny.display().to_string();
    let args = [
        "bench",
        "decode",
        "--model",
        &tiny,
        "--prompts",
        "1",
        "--prompt-len",
        "4",
        "--beams",
        "1",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--json",
    ];
    for cap in ["avx512", "avxvnni", "avx2", "scalar"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ws2s"))
            .args(args)
            .env("WS2S_MAX_ISA", cap)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cap}: {}", stderr(&out));
        let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let kernel = json["kernel"].as_str().unwrap_or_default();
        assert!(!kernel.contains("amx"), "{cap}: {json}");
        if cap == "avx512" && json["precision"] == "bf16x2" {
            assert!(kernel.starts_with("avx512-bf16"), "{cap}: {json}");
        } else {
            assert_eq!(json["precision"], "f32", "{cap}: {json}");
        }
    }
}

#[test]
fn a_bench_with_turns_runs_once_per_line_of_input() {
    // `--turns` (bench/compare-forward.sh alternates ws2s and PyTorch with it): `ready` after
    // the warm-up, one timed run per line of input, each reported as `turn SECONDS`, and no
    // more runs than lines even where --repeats allows more.
    use std::io::Write;
    use std::process::Stdio;
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llama_gguf/tiny-llama.gguf");
    let tiny = tiny.display().to_string();
    let args = [
        "bench",
        "forward",
        "--model",
        &tiny,
        "--batch",
        "2",
        "--seq-len",
        "3",
        "--repeats",
        "5",
        "--turns",
        "--json",
    ];
    let run = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ws2s"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run("go\ngo\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.first(), Some(&"ready"), "{err}");
    let turns: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("turn "))
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(turns.len(), 2, "{err}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{json}");
    for (run, turn) in runs.iter().zip(&turns) {
        assert!((run.as_f64().unwrap() - turn).abs() < 1e-5, "{json} {err}");
    }
    // No line at all: no timed run, an error, nothing on standard output.
    let out = run("");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no timed run"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    // Training takes turns one workload at a time (all four would print four `ready`s).
    let out = ws2s(&["bench", "train", "--turns"]);
    assert_bad_input(&out, &["--turns", "--workload"]);
}

#[test]
fn kernel_variables_with_unknown_values_are_rejected_before_any_work() {
    // A typo in either variable would otherwise leave the widest kernels in use, silently.
    let out = Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .args(["data", "stats", "sciq"])
        .env("WS2S_MAX_ISA", "avx3")
        .output()
        .unwrap();
    assert_bad_input(
        &out,
        &[
            "WS2S_MAX_ISA=\"avx3\"",
            "scalar, avx2, avxvnni, avx512, amx",
        ],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .args(["data", "stats", "sciq"])
        .env("WS2S_INT8_KERNEL", "vnni")
        .output()
        .unwrap();
    assert_bad_input(
        &out,
        &["WS2S_INT8_KERNEL=\"vnni\" names no int8 kernel", "scalar"],
    );
    // A cap the CPU does not need to honour is fine; a kernel above the cap is not.
    let out = Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .args(["data", "stats", "sciq"])
        .env("WS2S_MAX_ISA", "scalar")
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .args(["data", "stats", "sciq"])
        .env("WS2S_MAX_ISA", "scalar")
        .env("WS2S_INT8_KERNEL", "avx2")
        .output()
        .unwrap();
    assert_bad_input(
        &out,
        &[
            "WS2S_INT8_KERNEL=\"avx2\" is a kernel this CPU cannot run",
            "here: scalar",
        ],
    );
}
