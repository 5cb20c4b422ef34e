//! Experiment configuration in TOML. Unknown keys are rejected with the key's name and the file,
//! so that a typo never silently falls back to a default.
//!
//! ```toml
//! name = "sciq-small"
//! seeds = [0, 1, 2]
//!
//! [task]
//! name = "sciq"          # or cosmosqa, ethics-justice, slurp, classify:PATH, generate:PATH
//! pairs = false          # SciQ / CosmosQA: a positive and a negative per question
//! support = false        # SciQ: prepend the support paragraph
//! # test_path = "..."    # generic JSONL tasks: a separate test file
//!
//! [task.sizes]
//! weak_train = 2000
//! strong_train = 2000
//! test = 1000
//! valid = 0
//! ```

use crate::data::{ChoiceOptions, SplitSizes, TaskSpec};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    #[serde(default)]
    pub pairs: bool,
    #[serde(default)]
    pub support: bool,
    #[serde(default)]
    pub test_path: Option<PathBuf>,
    #[serde(default)]
    pub sizes: SplitSizes,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Folder of the bundled datasets; default `$WS2S_DATA` or the source tree's `data/`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    pub task: TaskConfig,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

impl TaskConfig {
    /// The task this section names. Relative JSONL paths are taken relative to `base`, the folder
    /// of the config file.
    pub fn spec(&self, base: &Path) -> Result<TaskSpec> {
        let options = ChoiceOptions {
            pairs: self.pairs,
            support: self.support,
        };
        let resolve = |p: &Path| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            }
        };
        let spec = match TaskSpec::parse(&self.name, options)? {
            TaskSpec::ClassifyJsonl { path, .. } => TaskSpec::ClassifyJsonl {
                path: resolve(&path),
                test_path: self.test_path.as_deref().map(resolve),
            },
            TaskSpec::GenerateJsonl { path, .. } => TaskSpec::GenerateJsonl {
                path: resolve(&path),
                test_path: self.test_path.as_deref().map(resolve),
            },
            other => {
                if self.test_path.is_some() {
                    bail!(
                        "task.test_path is only for classify:/generate: JSONL tasks, not {}",
                        self.name
                    );
                }
                other
            }
        };
        Ok(spec)
    }
}

impl ExperimentConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let config: ExperimentConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        if config.seeds.is_empty() {
            bail!(
                "{}: `seeds` is empty; give at least one seed",
                path.display()
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        config
            .task
            .spec(base)
            .with_context(|| format!("{}: in [task]", path.display()))?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seeds = [0, 1]
[task]
name = "sciq"
pairs = true
[task.sizes]
weak_train = 10
"#;

    #[test]
    fn parses_a_valid_config_with_defaults() {
        let config = ExperimentConfig::parse(GOOD, Path::new("exp.toml")).unwrap();
        assert_eq!(config.seeds, vec![0, 1]);
        assert!(config.task.pairs && !config.task.support);
        assert_eq!(config.task.sizes.weak_train, Some(10));
        assert_eq!(config.task.sizes.test, None);
    }

    #[test]
    fn unknown_keys_are_rejected_with_name_and_file() {
        let text = GOOD.replace("pairs = true", "pairz = true");
        let err = ExperimentConfig::parse(&text, Path::new("exp.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("exp.toml:"), "{err}");
        assert!(err.contains("pairz"), "{err}");
        let text = GOOD.replace("weak_train = 10", "weak_trian = 10");
        let err = ExperimentConfig::parse(&text, Path::new("exp.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("weak_trian"), "{err}");
        let text = format!("{GOOD}\n[extra]\nx = 1\n");
        let err = ExperimentConfig::parse(&text, Path::new("exp.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
    }

    #[test]
    fn bad_task_names_and_empty_seeds_are_errors() {
        let text = GOOD.replace("name = \"sciq\"", "name = \"scqi\"");
        let err = format!(
            "{:#}",
            ExperimentConfig::parse(&text, Path::new("e.toml")).unwrap_err()
        );
        assert!(err.contains("unknown task `scqi`"), "{err}");
        let text = GOOD.replace("seeds = [0, 1]", "seeds = []");
        assert!(ExperimentConfig::parse(&text, Path::new("e.toml")).is_err());
    }
}
