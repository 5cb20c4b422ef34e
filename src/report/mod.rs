//! Reports: plots of a run as SVG (written directly) and PNG (the same SVG rasterised).

pub mod classify;
pub mod generate;
pub mod loss;
pub mod parquet;
pub mod plot;
pub mod table;

use anyhow::{Context, Result};
use std::path::Path;

/// The files every run folder starts with: `results.json`, the training log with its loss
/// curves, and `results.md` (the report's `markdown` followed by the log's section).
pub(crate) fn write_run_folder(
    out: &Path,
    results: &impl serde::Serialize,
    markdown: String,
    log: &[crate::train::log::LogLine],
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::io::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    let training = loss::write(out, log)?;
    crate::io::write_atomic(&out.join("results.md"), (markdown + &training).as_bytes())
}

/// Rows as JSON lines, written atomically.
pub(crate) fn write_jsonl(path: &Path, rows: &[impl serde::Serialize]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row)?);
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())
}
