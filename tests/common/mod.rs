//! What the end-to-end tests share: the tiny checkpoint, task files and the `ws2s` command.
// Each test binary uses a part of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny random Llama checkpoint in GGUF form (ASCII tokenizer).
pub fn tiny_gguf() -> PathBuf {
    fixtures().join("models/llama_gguf/tiny-llama.gguf")
}

/// Writes `text` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `dir/task.jsonl`: `n` ASCII texts (the tiny tokenizer knows ASCII only) in two classes that
/// their words tell apart, item i padded with i % `pad` x's.
pub fn write_class_task(dir: &Path, n: usize, pad: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let label = i % 2;
            let word = if label == 1 { "good" } else { "bad" };
            format!(
                "{{\"text\": \"item {i} is {word} {}\", \"label\": {label}}}",
                "x".repeat(i % pad)
            )
        })
        .collect();
    write(dir, "task.jsonl", &lines.join("\n"))
}

/// `ws2s` with `args`, nothing else set.
pub fn ws2s(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .args(args)
        .output()
        .unwrap()
}

/// `ws2s COMMAND CONFIG --out OUT` (`run` or `sweep`) with its home at `home`.
pub fn ws2s_config(command: &str, config: &Path, out: &Path, home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ws2s"))
        .args([
            command,
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .env("WS2S_HOME", home)
        .output()
        .unwrap()
}
