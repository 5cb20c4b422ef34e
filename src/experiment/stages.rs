//! The stage cache: each finished stage of a run (a weak model's labels, the ceiling, a method's
//! student) is stored as JSON under a key hashing everything that determines it (its config
//! section, the data, the model, the seed). A rerun reuses finished stages, a changed setting
//! recomputes only the stages whose key changed, and a killed run resumes where it stopped.
//! Writes are atomic.

use crate::hash::sha256_hex;
use anyhow::Result;
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

    /// The stored result of a stage, or `f()` computed and stored; `true` when it came from the cache.
    pub fn get_or_compute<T: Serialize + DeserializeOwned>(
        &self,
        stage: &str,
        key: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, bool)> {
        let path = self.path(stage, key);
        if let Some(value) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            return Ok((value, true));
        }
        let value = f()?;
        crate::io::write_atomic(&path, serde_json::to_string(&value)?.as_bytes())?;
        Ok((value, false))
    }
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
            .get_or_compute("weak", &key, || {
                calls += 1;
                Ok(vec![1.0, 2.0])
            })
            .unwrap();
        assert!(!hit);
        let (b, hit): (Vec<f64>, bool) = cache
            .get_or_compute("weak", &key, || {
                calls += 1;
                Ok(vec![9.0])
            })
            .unwrap();
        assert!(hit);
        assert_eq!((a, b, calls), (vec![1.0, 2.0], vec![1.0, 2.0], 1));
        let other = stage_key(&["model-a", "data-1", "seed 1"]);
        let (c, hit) = cache
            .get_or_compute("weak", &other, || Ok(vec![3.0]))
            .unwrap();
        assert!(!hit);
        assert_eq!(c, vec![3.0]);
        assert_ne!(stage_key(&["ab", "c"]), stage_key(&["a", "bc"]));
    }
}
