//! Runs survive any kill: a small run killed with SIGKILL at pseudo-random moments and started
//! again finishes with the same results as an uninterrupted run; torn or altered cache files
//! are detected by their checksums and recomputed, never trusted and never a crash.

mod common;

use common::{tiny_gguf, write_class_task};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write_class_task(&root, 120, 4);
    let model = tiny_gguf();
    // A probe, a LoRA model (trained with checkpoints) and a fully fine-tuned strong model, two
    // seeds: kills land in feature extraction, probe fits, fine-tuning and the students.
    let config = format!(
        r#"
name = "resume"
seeds = [0, 1]
[task]
name = "classify:task.jsonl"
[task.sizes]
weak_train = 40
strong_train = 40
test = 30
[[weak]]
name = "probe"
model = "{m}"
[[weak]]
name = "lora"
model = "{m}"
mode = "lora"
lora = {{ rank = 2, alpha = 4.0, targets = ["q_proj", "v_proj"] }}
train = {{ epochs = 3, batch_size = 8, lr = 0.001 }}
[strong]
name = "full"
model = "{m}"
mode = "full"
train = {{ epochs = 2, batch_size = 8, lr = 0.0005 }}
[methods]
list = ["xent", "naive", "edl"]
"#,
        m = model.display()
    );
    let path = root.join("resume.toml");
    std::fs::write(&path, config).unwrap();
    Setup {
        _dir: dir,
        root,
        config: path,
    }
}

fn command(s: &Setup, name: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ws2s"));
    c.args([
        "run",
        s.config.to_str().unwrap(),
        "--out",
        s.root.join(name).join("out").to_str().unwrap(),
    ])
    .env("WS2S_HOME", s.root.join(name).join("home"))
    .env("RAYON_NUM_THREADS", "2")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// Runs to the end; returns results.json without its wall times, and stderr.
fn finish(s: &Setup, name: &str) -> (serde_json::Value, String) {
    let output = command(s, name).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{name}: {stderr}");
    let text = std::fs::read_to_string(s.root.join(name).join("out/results.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_object_mut().unwrap().remove("timings");
    (json, stderr)
}

/// A small deterministic generator (the kill moments are reproducible).
struct Lcg(u64);

impl Lcg {
    fn fraction(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn killed_runs_resume_to_the_same_results() {
    let s = setup();
    let start = Instant::now();
    let (reference, _) = finish(&s, "reference");
    let full = start.elapsed();
    eprintln!("uninterrupted run: {:.2} s", full.as_secs_f64());
    let mut rng = Lcg(20261203);
    for trial in 0..4 {
        let name = format!("killed{trial}");
        // Two kills per trial, then a run to the end.
        for _ in 0..2 {
            let at = full.mul_f64(0.05 + 0.9 * rng.fraction());
            let mut child = command(&s, &name).spawn().unwrap();
            std::thread::sleep(at);
            let _ = child.kill(); // SIGKILL; the run may already have finished
            let status = child.wait().unwrap();
            eprintln!(
                "trial {trial}: killed at {:.2} s ({status})",
                at.as_secs_f64()
            );
        }
        let (resumed, stderr) = finish(&s, &name);
        assert_eq!(resumed, reference, "trial {trial}: {stderr}");
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn torn_cache_files_are_recomputed() {
    let s = setup();
    let (reference, _) = finish(&s, "run");
    let home = s.root.join("run/home");
    let features = files_under(&home.join("features"));
    let stages: Vec<PathBuf> = files_under(&home.join("stages"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".log.jsonl"))
        .collect();
    assert!(!features.is_empty() && !stages.is_empty());
    // Truncate a feature matrix, alter one byte in the middle of another (same length), cut a
    // stage file in half and change a digit of another.
    let bytes = std::fs::read(&features[0]).unwrap();
    std::fs::write(&features[0], &bytes[..bytes.len() / 2]).unwrap();
    if let Some(other) = features.get(1) {
        let mut bytes = std::fs::read(other).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;
        std::fs::write(other, bytes).unwrap();
    }
    let text = std::fs::read_to_string(&stages[0]).unwrap();
    std::fs::write(&stages[0], &text[..text.len() / 2]).unwrap();
    let text = std::fs::read_to_string(&stages[1]).unwrap();
    let (head, body) = text.split_once('\n').unwrap();
    let digit = body.find(|c: char| c.is_ascii_digit()).unwrap();
    let mut body = body.to_string();
    let old = body.as_bytes()[digit];
    body.replace_range(digit..digit + 1, if old == b'9' { "8" } else { "9" });
    std::fs::write(&stages[1], format!("{head}\n{body}")).unwrap();
    let (again, stderr) = finish(&s, "run");
    assert_eq!(again, reference, "{stderr}");
    assert!(
        stderr.contains("cached features not used") && stderr.contains("cached stage"),
        "{stderr}"
    );
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
}
