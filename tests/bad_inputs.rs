//! The bad-input corpus (tests/bad_inputs/cases.toml): every case exits with code 2, prints
//! nothing on stdout, names what was wrong and where in its message, and writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(serde::Deserialize)]
struct Corpus {
    snippets: BTreeMap<String, String>,
    case: Vec<Case>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// (source, destination, bytes to keep: 0 = all)
    #[serde(default)]
    copy: Vec<(String, String, u64)>,
    args: Vec<String>,
    expect: Vec<String>,
}

/// Replaces `{name}` by its snippet (snippets may use other placeholders) until none is left.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut text = text.to_string();
    for _ in 0..4 {
        for (name, value) in vars {
            text = text.replace(&format!("{{{name}}}"), value);
        }
    }
    text
}

/// Every file under `dir` with its contents, for the "nothing written" check.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.insert(path.clone(), Vec::new());
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn every_bad_input_exits_2_names_the_fault_and_writes_nothing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/bad_inputs/cases.toml")).unwrap();
    let corpus: Corpus = toml::from_str(&text).unwrap();
    let mut vars = corpus.snippets.clone();
    let fixtures = root.join("tests/fixtures/models");
    vars.insert(
        "tiny".into(),
        fixtures
            .join("llama_gguf/tiny-llama.gguf")
            .display()
            .to_string(),
    );
    vars.insert("fixtures".into(), fixtures.display().to_string());
    let home = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut names = std::collections::HashSet::new();
    for case in &corpus.case {
        assert!(names.insert(&case.name), "case `{}` twice", case.name);
        let dir = tempfile::tempdir().unwrap();
        let data: String = (0..40)
            .map(|i| format!("{{\"text\": \"item number {i}\", \"label\": {}}}\n", i % 2))
            .collect();
        std::fs::write(dir.path().join("data.jsonl"), data).unwrap();
        let gen: String = (0..20)
            .map(|i| format!("{{\"prompt\": \"say {i}\", \"target\": \"{i}\"}}\n"))
            .collect();
        std::fs::write(dir.path().join("gen.jsonl"), gen).unwrap();
        for (name, contents) in &case.files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, expand(contents, &vars)).unwrap();
        }
        for (from, to, keep) in &case.copy {
            let bytes = std::fs::read(expand(from, &vars)).unwrap();
            let keep = if *keep == 0 {
                bytes.len()
            } else {
                *keep as usize
            };
            let path = dir.path().join(to);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &bytes[..keep]).unwrap();
        }
        let before = snapshot(dir.path());
        let args: Vec<String> = case.args.iter().map(|a| expand(a, &vars)).collect();
        let output = Command::new(env!("CARGO_BIN_EXE_ws2s"))
            .args(&args)
            .current_dir(dir.path())
            .env("WS2S_HOME", home.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut faults = Vec::new();
        if output.status.code() != Some(2) {
            faults.push(format!("exit code {:?}", output.status.code()));
        }
        if !stdout.is_empty() {
            faults.push(format!("stdout not empty: {}", stdout.trim()));
        }
        for needle in &case.expect {
            if !stderr.contains(needle.as_str()) {
                faults.push(format!("`{needle}` missing"));
            }
        }
        if snapshot(dir.path()) != before {
            faults.push("files were written or changed".into());
        }
        if stderr.contains("panicked") {
            faults.push("panicked".into());
        }
        if !faults.is_empty() {
            failures.push(format!(
                "{}: {}\n    stderr: {}",
                case.name,
                faults.join("; "),
                stderr.trim()
            ));
        }
    }
    assert!(corpus.case.len() >= 60, "{} cases", corpus.case.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        corpus.case.len(),
        failures.join("\n")
    );
}
