//! Where ws2s keeps what it installs and caches, all under one root: `$WS2S_HOME`, default
//! `~/.cache/ws2s`. Every path under the root is named here; the experiment receives a [`Home`]
//! (the command line makes it once from the environment) instead of reading the environment.
//!
//! ```text
//! ROOT/models/            models installed by scripts/fetch-models
//! ROOT/hub/OWNER--NAME/   models downloaded from the Hugging Face hub
//! ROOT/file-hashes.json   memo of model file hashes (by path, size and modification time)
//! ROOT/features/          extracted features (by model hash, texts and options)
//! ROOT/stages/            cached stages of runs (weak labels, probes, ...)
//! ROOT/stages/trained/    trained adapters or weights of generation stages
//! ```

use std::path::{Path, PathBuf};

/// The root folder of ws2s's installed models and caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// `$WS2S_HOME`, default `~/.cache/ws2s` (`./.cache/ws2s` without `$HOME`).
    pub fn from_env() -> Home {
        match std::env::var_os("WS2S_HOME") {
            Some(dir) => Home::new(dir),
            None => {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."));
                Home::new(home.join(".cache").join("ws2s"))
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Models installed by `scripts/fetch-models`.
    pub fn models(&self) -> PathBuf {
        self.root.join("models")
    }

    /// A model downloaded from the hub (`owner/name`).
    pub fn hub(&self, repo: &str) -> PathBuf {
        self.root.join("hub").join(repo.replace('/', "--"))
    }

    /// The memo of model file hashes.
    pub fn file_hashes(&self) -> PathBuf {
        self.root.join("file-hashes.json")
    }

    /// Extracted features.
    pub fn features(&self) -> PathBuf {
        self.root.join("features")
    }

    /// Cached stages of runs; trained weights of generation stages under `trained/`.
    pub fn stages(&self) -> PathBuf {
        self.root.join("stages")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_under_the_root() {
        let home = Home::new("/data/ws2s");
        assert_eq!(home.root(), Path::new("/data/ws2s"));
        assert_eq!(home.models(), Path::new("/data/ws2s/models"));
        assert_eq!(
            home.hub("Qwen/Qwen2.5-0.5B"),
            Path::new("/data/ws2s/hub/Qwen--Qwen2.5-0.5B")
        );
        assert_eq!(home.file_hashes(), Path::new("/data/ws2s/file-hashes.json"));
        assert_eq!(home.features(), Path::new("/data/ws2s/features"));
        assert_eq!(home.stages(), Path::new("/data/ws2s/stages"));
    }
}
