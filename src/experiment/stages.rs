//! The stage cache: each finished stage of a run (a weak model's labels, the ceiling, a method's
//! student) is stored as JSON under a key hashing everything that determines it (its config
//! section, the data, the model, the seed). A rerun reuses finished stages, a changed setting
//! recomputes only the stages whose key changed, and a killed run resumes where it stopped.
//! Writes are atomic.

use crate::hash::sha256_hex;
use crate::train::log::{self, LogLine, Step};
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct StageCache {
    dir: PathBuf,
    /// The training steps of every stage this run computed or read, in order.
    log: Mutex<Vec<LogLine>>,
    /// Trainings already in `log` (one model's training may be reused by several stages).
    logged: Mutex<BTreeSet<String>>,
}

/// What a stage is about: its seed and model (and method), for errors and the training log.
#[derive(Debug, Clone)]
pub struct Subject {
    pub seed: u64,
    pub model: String,
    pub method: Option<String>,
    /// "seed 0, weak[1] SmolLM2-135M": how errors name the stage.
    pub what: String,
}

/// The key of a stage: the hash of its parts, in order.
pub fn stage_key(parts: &[&str]) -> String {
    sha256_hex(parts.join("\u{1f}").as_bytes())
}

impl StageCache {
    /// Where the trainable weights trained under `key` are saved (with their training log
    /// beside them): `trained/KEY.safetensors` in the cache.
    pub fn trained_path(&self, key: &str) -> PathBuf {
        self.dir.join("trained").join(format!("{key}.safetensors"))
    }

    pub fn new(dir: &Path) -> Self {
        StageCache {
            dir: dir.to_path_buf(),
            log: Mutex::default(),
            logged: Mutex::default(),
        }
    }

    /// Adds the steps of one training (identified by `id`, e.g. its stage file or its saved
    /// weights) to the run's log, once.
    pub fn add_log(&self, id: &str, stage: &str, subject: &Subject, steps: Vec<Step>) {
        if steps.is_empty() || !lock(&self.logged).insert(format!("{stage}/{id}")) {
            return;
        }
        lock(&self.log).extend(steps.into_iter().map(|step| LogLine {
            stage: stage.to_string(),
            model: subject.model.clone(),
            seed: subject.seed,
            method: subject.method.clone(),
            step,
        }));
    }

    /// The training log of every stage so far.
    pub fn log(&self) -> Vec<LogLine> {
        lock(&self.log).clone()
    }

    fn path(&self, stage: &str, key: &str) -> PathBuf {
        self.dir.join(format!("{stage}-{}.json", &key[..32]))
    }

    /// The stored result of a stage, or `f()` computed and stored; `true` when it came from the
    /// cache. `subject` says which seed and model the stage is about; an error of `f` carries it
    /// with the stage's name. The training steps `f` records go to the run's log and to a file
    /// beside the stage's (read back with the stage on a later run).
    pub fn get_or_compute<T: Serialize + DeserializeOwned>(
        &self,
        stage: &str,
        key: &str,
        subject: &Subject,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, bool)> {
        let path = self.path(stage, key);
        let log_path = path.with_extension("log.jsonl");
        if let Ok(text) = std::fs::read_to_string(&path) {
            match read_checked(&text) {
                Ok(value) => {
                    self.add_log(key, stage, subject, log::read_jsonl(&log_path));
                    return Ok((value, true));
                }
                Err(why) => eprintln!(
                    "warning: cached stage {} not used, recomputing: {why}",
                    path.display()
                ),
            }
        }
        let (value, steps) = log::capture(f);
        let value = value.with_context(|| format!("stage `{stage}` ({})", subject.what))?;
        if steps.is_empty() {
            let _ = std::fs::remove_file(&log_path);
        } else {
            crate::io::write_atomic(&log_path, log::to_jsonl(&steps).as_bytes())?;
        }
        self.add_log(key, stage, subject, steps);
        let json = serde_json::to_string(&value)?;
        let text = format!(
            "{STAGE_FORMAT} sha256={}\n{json}",
            sha256_hex(json.as_bytes())
        );
        crate::io::write_atomic(&path, text.as_bytes())?;
        Ok((value, false))
    }
}

/// The value behind a mutex, also after a panic elsewhere (the log is only ever appended to).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The first line of a stage file: format and the sha256 of the JSON that follows.
const STAGE_FORMAT: &str = "ws2s-stage-2";

/// The value of a stage file whose checksum holds.
fn read_checked<T: DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    let (header, json) = text
        .split_once('\n')
        .ok_or("no header line (truncated, or written by an older version)")?;
    let expected = header
        .strip_prefix(STAGE_FORMAT)
        .and_then(|h| h.strip_prefix(" sha256="))
        .ok_or("unknown header (written by an older version?)")?;
    if sha256_hex(json.as_bytes()) != expected {
        return Err("checksum mismatch: the file is torn or corrupt".into());
    }
    serde_json::from_str(json).map_err(|e| format!("does not hold this stage's result: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            seed: 0,
            model: "m".into(),
            method: None,
            what: "test".into(),
        }
    }

    #[test]
    fn computes_once_and_keys_separate_stages() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(dir.path());
        let key = stage_key(&["model-a", "data-1", "seed 0"]);
        let mut calls = 0;
        let (a, hit) = cache
            .get_or_compute("weak", &key, &subject(), || {
                calls += 1;
                Ok(vec![1.0, 2.0])
            })
            .unwrap();
        assert!(!hit);
        let (b, hit): (Vec<f64>, bool) = cache
            .get_or_compute("weak", &key, &subject(), || {
                calls += 1;
                Ok(vec![9.0])
            })
            .unwrap();
        assert!(hit);
        assert_eq!((a, b, calls), (vec![1.0, 2.0], vec![1.0, 2.0], 1));
        let other = stage_key(&["model-a", "data-1", "seed 1"]);
        let (c, hit) = cache
            .get_or_compute("weak", &other, &subject(), || Ok(vec![3.0]))
            .unwrap();
        assert!(!hit);
        assert_eq!(c, vec![3.0]);
        assert_ne!(stage_key(&["ab", "c"]), stage_key(&["a", "bc"]));
    }

    #[test]
    fn training_steps_are_logged_once_and_read_back_with_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let step = |n: usize| Step {
            epoch: 1,
            step: n,
            loss: 2.0 - n as f64,
            lr: Some(1e-3),
            grad_norm: 0.1,
            seconds: 0.5,
        };
        let key = stage_key(&["trained"]);
        let train = || {
            log::record(step(1));
            log::record(step(2));
            Ok(7)
        };
        let cache = StageCache::new(dir.path());
        cache
            .get_or_compute("weak", &key, &subject(), train)
            .unwrap();
        // The same stage again in this run: its steps are not repeated.
        cache
            .get_or_compute("weak", &key, &subject(), train)
            .unwrap();
        let first = cache.log();
        assert_eq!(first.len(), 2);
        assert_eq!(
            (
                first[1].stage.as_str(),
                first[1].model.as_str(),
                first[1].seed
            ),
            ("weak", "m", 0)
        );
        assert_eq!(first[1].step, step(2));
        // A later run reads the stage and its log from the cache.
        let later = StageCache::new(dir.path());
        let (value, hit) = later
            .get_or_compute("weak", &key, &subject(), || Ok(0))
            .unwrap();
        assert_eq!((value, hit), (7, true));
        assert_eq!(later.log(), first);
        let line = serde_json::to_value(&first[0]).unwrap();
        for field in [
            "stage",
            "model",
            "seed",
            "epoch",
            "step",
            "loss",
            "lr",
            "grad_norm",
            "seconds",
        ] {
            assert!(line.get(field).is_some(), "{field} missing from {line}");
        }
    }

    #[test]
    fn torn_or_altered_stage_files_are_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(dir.path());
        let key = stage_key(&["k"]);
        let compute = |v: f64| move || Ok(vec![v, 2.0 * v]);
        cache
            .get_or_compute("s", &key, &subject(), compute(1.0))
            .unwrap();
        let path = cache.path("s", &key);
        let full = std::fs::read_to_string(&path).unwrap();
        // Truncated mid-JSON, a digit changed (still valid JSON), the header gone, empty.
        let altered = full.replacen("[1.0", "[7.0", 1);
        assert_ne!(altered, full);
        let cases = [
            full[..full.len() - 3].to_string(),
            altered,
            full.lines().nth(1).unwrap().to_string(),
            String::new(),
        ];
        for torn in cases {
            std::fs::write(&path, &torn).unwrap();
            let (value, hit): (Vec<f64>, bool) = cache
                .get_or_compute("s", &key, &subject(), compute(3.0))
                .unwrap();
            assert!(!hit, "{torn:?} was trusted");
            assert_eq!(value, vec![3.0, 6.0]);
            // Rewritten whole: the next read is a hit.
            let (again, hit): (Vec<f64>, bool) = cache
                .get_or_compute("s", &key, &subject(), compute(9.0))
                .unwrap();
            assert!(hit);
            assert_eq!(again, vec![3.0, 6.0]);
            cache
                .get_or_compute("s", &key, &subject(), compute(1.0))
                .unwrap();
        }
    }
}
