//! The stage cache: each finished stage of a run (a weak model's labels, the ceiling, a method's
//! student) is stored as JSON under a key hashing everything that determines it (its config
//! section, the data, the model, the seed). A rerun reuses finished stages, a changed setting
//! recomputes only the stages whose key changed, and a killed run resumes where it stopped.
//! Writes are atomic.

use crate::hash::sha256_hex;
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

pub struct StageCache {
    dir: PathBuf,
}

/// The key of a stage: the hash of its parts, in order.
pub fn stage_key(parts: &[&str]) -> String {
    sha256_hex(parts.join("\u{1f}").as_bytes())
}

impl StageCache {
    pub fn new(dir: &Path) -> Self {
        StageCache {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, stage: &str, key: &str) -> PathBuf {
        self.dir.join(format!("{stage}-{}.json", &key[..32]))
    }

    /// The stored result of a stage, or `f()` computed and stored; `true` when it came from the
    /// cache. `what` says which seed and model the stage is about; an error of `f` carries it
    /// with the stage's name.
    pub fn get_or_compute<T: Serialize + DeserializeOwned>(
        &self,
        stage: &str,
        key: &str,
        what: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, bool)> {
        let path = self.path(stage, key);
        if let Ok(text) = std::fs::read_to_string(&path) {
            match read_checked(&text) {
                Ok(value) => return Ok((value, true)),
                Err(why) => eprintln!(
                    "warning: cached stage {} not used, recomputing: {why}",
                    path.display()
                ),
            }
        }
        let value = f().with_context(|| format!("stage `{stage}` ({what})"))?;
        let json = serde_json::to_string(&value)?;
        let text = format!(
            "{STAGE_FORMAT} sha256={}\n{json}",
            sha256_hex(json.as_bytes())
        );
        crate::io::write_atomic(&path, text.as_bytes())?;
        Ok((value, false))
    }
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

    #[test]
    fn computes_once_and_keys_separate_stages() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(dir.path());
        let key = stage_key(&["model-a", "data-1", "seed 0"]);
        let mut calls = 0;
        let (a, hit) = cache
            .get_or_compute("weak", &key, "test", || {
                calls += 1;
                Ok(vec![1.0, 2.0])
            })
            .unwrap();
        assert!(!hit);
        let (b, hit): (Vec<f64>, bool) = cache
            .get_or_compute("weak", &key, "test", || {
                calls += 1;
                Ok(vec![9.0])
            })
            .unwrap();
        assert!(hit);
        assert_eq!((a, b, calls), (vec![1.0, 2.0], vec![1.0, 2.0], 1));
        let other = stage_key(&["model-a", "data-1", "seed 1"]);
        let (c, hit) = cache
            .get_or_compute("weak", &other, "test", || Ok(vec![3.0]))
            .unwrap();
        assert!(!hit);
        assert_eq!(c, vec![3.0]);
        assert_ne!(stage_key(&["ab", "c"]), stage_key(&["a", "bc"]));
    }

    #[test]
    fn torn_or_altered_stage_files_are_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StageCache::new(dir.path());
        let key = stage_key(&["k"]);
        let compute = |v: f64| move || Ok(vec![v, 2.0 * v]);
        cache
            .get_or_compute("s", &key, "test", compute(1.0))
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
                .get_or_compute("s", &key, "test", compute(3.0))
                .unwrap();
            assert!(!hit, "{torn:?} was trusted");
            assert_eq!(value, vec![3.0, 6.0]);
            // Rewritten whole: the next read is a hit.
            let (again, hit): (Vec<f64>, bool) = cache
                .get_or_compute("s", &key, "test", compute(9.0))
                .unwrap();
            assert!(hit);
            assert_eq!(again, vec![3.0, 6.0]);
            cache
                .get_or_compute("s", &key, "test", compute(1.0))
                .unwrap();
        }
    }
}
