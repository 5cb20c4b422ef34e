//! Optional download of a model folder from the Hugging Face hub (cargo feature `hub`, off by
//! default; nothing else in ws2s touches the network).
//!
//! Fetches `config.json`, the tokenizer files and the safetensors weights (single file or the
//! shards named by `model.safetensors.index.json`) of `owner/name` at a revision into
//! `$WS2S_HOME/hub/owner--name/`. Each file is written to `.partial` and renamed when complete;
//! files already present are kept. `HF_TOKEN`, when set, is sent for gated models.

use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

const REQUIRED: [&str; 1] = ["config.json"];
const OPTIONAL: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

fn url(repo: &str, revision: &str, file: &str) -> String {
    format!("https://huggingface.co/{repo}/resolve/{revision}/{file}")
}

/// Downloads one file; `Ok(false)` when the hub says it does not exist.
fn fetch(repo: &str, revision: &str, file: &str, dir: &Path) -> Result<bool> {
    let target = dir.join(file);
    if target.exists() {
        return Ok(true);
    }
    let mut request = ureq::get(&url(repo, revision, file));
    if let Ok(token) = std::env::var("HF_TOKEN") {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(404, _)) => return Ok(false),
        Err(e) => bail!("downloading {file} of {repo}: {e}"),
    };
    let partial = dir.join(format!("{file}.partial"));
    let mut out = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    std::io::copy(&mut response.into_reader(), &mut out)
        .with_context(|| format!("downloading {file} of {repo}"))?;
    out.flush()?;
    std::fs::rename(&partial, &target)?;
    eprintln!("downloaded {file}");
    Ok(true)
}

/// Downloads a model folder and returns its path.
pub fn download(repo: &str, revision: &str) -> Result<PathBuf> {
    if repo.split('/').count() != 2 {
        bail!("`{repo}` is not a hub repository id of the form owner/name");
    }
    let dir = crate::home::Home::from_env().hub(repo);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in REQUIRED {
        if !fetch(repo, revision, file, &dir)? {
            bail!("{repo} has no {file} at revision {revision}");
        }
    }
    for file in OPTIONAL {
        fetch(repo, revision, file, &dir)?;
    }
    if !fetch(repo, revision, "model.safetensors", &dir)? {
        if !fetch(repo, revision, "model.safetensors.index.json", &dir)? {
            bail!("{repo} has neither model.safetensors nor model.safetensors.index.json (only safetensors weights are supported)");
        }
        for shard in super::safetensors_files(&dir)? {
            let name = shard
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("bad shard name"))?;
            if !fetch(repo, revision, name, &dir)? {
                bail!("{repo}: shard {name} is missing on the hub");
            }
        }
    }
    Ok(dir)
}
