//! What the end-to-end tests share: the tiny checkpoint, task files and the `ws2s` command.
// Each test binary uses a part of these.
#![allow(dead_code)]

use candle_core::{Device, Tensor, D};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use ws2s::models::params::Trainable;
use ws2s::models::Model;

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

/// A tiny random checkpoint of `tests/fixtures/models/NAME`, frozen, on the CPU.
pub fn tiny_model(name: &str) -> Model {
    Model::load(
        &fixtures().join("models").join(name),
        Trainable::Frozen,
        0,
        &Device::Cpu,
    )
    .unwrap()
}

/// Greedy continuation computed the slow way: a full forward pass per step (no cache) and the
/// argmax of the whole f32 logits.
pub fn greedy_without_cache(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..steps {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = model
            .network
            .hidden(&ids, &[vec![1; seq.len()]], &mut model.network.new_cache())
            .unwrap();
        let logits = model.network.logits(&hidden).unwrap();
        let last = logits
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap();
        seq.push(last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
    }
    seq[prompt.len()..].to_vec()
}
