//! Experiments: their configuration, the checks before any work, the stage cache, and the runs
//! themselves. [`run`] is the one entry point: it checks the config's files, loads the datasets
//! once and runs the kind of experiment the config describes (classification, generation, or a
//! ladder of classification runs).

pub mod classify;
pub mod generate;
pub mod learner;
pub mod precision_study;
pub mod preflight;
pub mod stages;
pub mod study;
pub mod sweep;

use crate::config::ExperimentConfig;
use crate::data::{self, Dataset};
use crate::home::Home;
use anyhow::Result;
use std::path::Path;

/// What a run produced.
pub enum Report {
    Classify(classify::RunResults),
    Generate(generate::RunResults),
    Ladder(sweep::SweepResults),
}

impl Report {
    /// The table a paper would print.
    pub fn markdown(&self) -> String {
        match self {
            Report::Classify(r) => classify::markdown(r),
            Report::Generate(r) => generate::markdown(r),
            Report::Ladder(r) => sweep::markdown(r),
        }
    }

    /// The report's file in the run folder.
    pub fn file_name(&self) -> &'static str {
        match self {
            Report::Ladder(_) => "sweep.md",
            _ => "results.md",
        }
    }
}

/// Checks everything that needs no training ([`preflight::check`]), then runs the experiment of
/// `config` (read from `config_path`, against which its relative paths resolve) into `out`, with
/// its models, features and stages under `home`.
pub fn run(
    config: &ExperimentConfig,
    config_path: &Path,
    out: &Path,
    (home, progress): (&Home, bool),
) -> Result<Report> {
    let datasets = preflight::check(config, config_path, Some(out))?.datasets;
    Ok(if config.sweep.is_some() {
        Report::Ladder(sweep::run(config, &datasets, out, (home, progress))?)
    } else if datasets[0].num_classes.is_none() {
        Report::Generate(generate::run(config, &datasets, out, (home, progress))?)
    } else {
        Report::Classify(classify::run(config, &datasets, out, (home, progress))?)
    })
}

/// The (label, hash) of every model a run's results record: the weak models in config order,
/// then the strong one.
pub(crate) fn model_list(
    config: &ExperimentConfig,
    weak_hashes: impl IntoIterator<Item = String>,
    strong: (String, String),
) -> Vec<(String, String)> {
    config
        .weak_labels()
        .into_iter()
        .zip(weak_hashes)
        .chain(std::iter::once(strong))
        .collect()
}

/// The datasets of a run, one per seed (re-splits of one pool when `task.pool_seed` is set).
pub fn load_datasets(config: &ExperimentConfig, config_path: &Path) -> Result<Vec<Dataset>> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let spec = config.task.spec(base)?;
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(data::default_data_dir);
    let datasets: Vec<Dataset> = match config.task.pool_seed {
        Some(pool_seed) => {
            let pool = data::load(&data_dir, &spec, &config.task.sizes, pool_seed)?;
            config
                .seeds
                .iter()
                .map(|&seed| pool.resplit(seed))
                .collect()
        }
        None => config
            .seeds
            .iter()
            .map(|&seed| data::load(&data_dir, &spec, &config.task.sizes, seed))
            .collect::<Result<_>>()?,
    };
    Ok(datasets)
}
