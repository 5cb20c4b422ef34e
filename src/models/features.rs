//! Frozen-feature extraction: pooled hidden states of a frozen backbone over a list of texts,
//! computed once with length-bucketed batches (little padding) and cached on disk (safetensors)
//! under a key of model hash + data hash + pooling + maximum length.

use super::heads::{pool, Pooling};
use super::{prefix, Model};
use crate::hash::sha256_hex;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// The fewest tokens a group of texts must share before its prefix is computed once.
pub const MIN_SHARED_TOKENS: usize = 8;

#[derive(Debug, Clone)]
pub struct FeatureOptions {
    pub pooling: Pooling,
    /// Examples per forward pass.
    pub batch_size: usize,
    /// Inputs longer than this many tokens keep their last `max_tokens` tokens (the answer of an
    /// "is this answer correct" item sits at the end).
    pub max_tokens: usize,
    pub progress: bool,
    /// Number type of the forward's products (part of the cache key unless f32).
    pub precision: crate::ops::Precision,
}

impl Default for FeatureOptions {
    fn default() -> Self {
        FeatureOptions {
            pooling: Pooling::LastToken,
            batch_size: 32,
            max_tokens: 256,
            progress: false,
            precision: crate::ops::Precision::F32,
        }
    }
}

/// Pooled features [N, H] of `texts`, in order.
pub fn extract(
    model: &Model,
    texts: &[&str],
    options: &FeatureOptions,
    device: &Device,
) -> Result<Tensor> {
    let mut out = extract_pooled(model, texts, &[options.pooling], options, device)?;
    Ok(out.remove(0))
}

/// Features [N, H] of `texts` under each of `poolings`, from one forward pass per batch
/// (`options.pooling` is ignored).
pub fn extract_pooled(
    model: &Model,
    texts: &[&str],
    poolings: &[Pooling],
    options: &FeatureOptions,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let tokenizer = model.tokenizer()?;
    let mut encoded: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
    for text in texts {
        let mut ids = tokenizer.encode(text)?;
        if ids.len() > options.max_tokens {
            ids.drain(..ids.len() - options.max_tokens);
        }
        encoded.push(ids);
    }
    let hidden_size = model.network.hidden_size();
    let mut rows: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; texts.len()]; poolings.len()];
    let bar = progress_bar(options.progress, texts.len() as u64, "features");
    // Pooled at the last token only, a forward computes the last layer's position-wise work
    // for that token alone (Network::last_hidden): `hidden` is then [B, H], already pooled.
    let last_only = poolings.iter().all(|&p| p == Pooling::LastToken);
    let mut store = |members: &[usize], hidden: &Tensor, mask: &[Vec<u32>]| -> Result<()> {
        for (rows, &pooling) in rows.iter_mut().zip(poolings) {
            let pooled = if last_only {
                hidden.to_vec2::<f32>()?
            } else {
                pool(hidden, mask, pooling)?.to_vec2::<f32>()?
            };
            for (&i, values) in members.iter().zip(pooled) {
                rows[i] = Some(values);
            }
        }
        bar.inc(members.len() as u64);
        Ok(())
    };
    let batch_size = options.batch_size.max(1);
    // Texts of a decoder pooled at their last token that begin alike (SciQ's answers to one
    // question, with or without its support paragraph) share the keys and values of that
    // beginning: it runs once per group (prefix::suffix_last_hidden) where that saves a tenth
    // of the tokens or more.
    let shareable = model.network.is_decoder() && last_only;
    let mut groups = if shareable {
        prefix::group_by_prefix(&encoded, MIN_SHARED_TOKENS)
    } else {
        Vec::new()
    };
    let saved: usize = groups.iter().map(prefix::PrefixGroup::tokens_saved).sum();
    let total: usize = encoded.iter().map(Vec::len).sum();
    if saved * 10 < total {
        groups.clear();
    }
    let mut alone: Vec<usize> = Vec::new();
    let mut shared: Vec<prefix::PrefixGroup> = Vec::new();
    for group in groups {
        if group.shared == 0 {
            alone.extend(group.members);
        } else {
            // A group larger than a batch runs its prefix once per batch-sized part.
            for part in group.members.chunks(batch_size) {
                if part.len() == 1 {
                    alone.extend_from_slice(part);
                    continue;
                }
                shared.push(prefix::PrefixGroup {
                    shared: group.shared,
                    members: part.to_vec(),
                });
            }
        }
    }
    if shared.is_empty() {
        alone = (0..texts.len()).collect();
    }
    // Length buckets: sort by length so that each batch pads to a similar length.
    alone.sort_by_key(|&i| encoded[i].len());
    for batch in alone.chunks(batch_size) {
        let tokens: Vec<&[u32]> = batch.iter().map(|&i| encoded[i].as_slice()).collect();
        let (ids, mask) = prefix::right_pad(&tokens, device)?;
        let hidden = if last_only {
            model.network.last_hidden_parallel(&ids, &mask)?
        } else {
            model.network.hidden_parallel(&ids, &mask)?
        };
        store(batch, &hidden, &mask)?;
    }
    // Groups by prefix length, then batches of up to `batch_size` texts.
    shared.sort_by_key(|g| (g.shared, g.members.iter().map(|&i| encoded[i].len()).max()));
    let mut start = 0;
    while start < shared.len() {
        let mut end = start;
        let mut members = 0;
        while end < shared.len()
            && (end == start || members + shared[end].members.len() <= batch_size)
        {
            members += shared[end].members.len();
            end += 1;
        }
        // The batch's groups in parts side by side, as Network::hidden_parallel does.
        let longest = shared[start..end]
            .iter()
            .flat_map(|g| g.members.iter().map(|&i| encoded[i].len()))
            .max()
            .unwrap_or(1);
        let parts = if device.is_cpu() {
            super::batch_parts(members, longest)
        } else {
            1
        };
        let outputs = split_by_members(&shared[start..end], parts)
            .into_par_iter()
            .map(|part| {
                let hidden = prefix::suffix_last_hidden(&model.network, &encoded, part, device)?;
                let order: Vec<usize> = part
                    .iter()
                    .flat_map(|g| g.members.iter().copied())
                    .collect();
                Ok((order, hidden))
            })
            .collect::<Result<Vec<_>>>()?;
        for (order, hidden) in outputs {
            store(&order, &hidden, &[])?;
        }
        start = end;
    }
    bar.finish_and_clear();
    rows.into_iter()
        .map(|rows| {
            let flat: Vec<f32> = rows
                .into_iter()
                .flat_map(|r| r.expect("every row computed"))
                .collect();
            Ok(Tensor::from_vec(flat, (texts.len(), hidden_size), device)?)
        })
        .collect()
}

/// `groups` cut into at most `parts` runs of consecutive groups with about the same number of
/// members each (none empty).
fn split_by_members(groups: &[prefix::PrefixGroup], parts: usize) -> Vec<&[prefix::PrefixGroup]> {
    let total: usize = groups.iter().map(|g| g.members.len()).sum();
    let parts = parts.clamp(1, groups.len().max(1));
    let mut out = Vec::with_capacity(parts);
    let (mut start, mut seen) = (0, 0);
    for (i, group) in groups.iter().enumerate() {
        // A run ends before this group where that leaves it nearer its share of the members
        // (the j-th run ends near total j / parts) than taking the group would.
        let target = total * (out.len() + 1);
        let (before, after) = (seen * parts, (seen + group.members.len()) * parts);
        if i > start && out.len() + 1 < parts && target.abs_diff(before) <= target.abs_diff(after) {
            out.push(&groups[start..i]);
            start = i;
        }
        seen += group.members.len();
    }
    if start < groups.len() {
        out.push(&groups[start..]);
    }
    out
}

pub fn progress_bar(visible: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{bar:30}] {pos}/{len} ({per_sec}, ETA {eta})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Bumped whenever tokenization or pooling code changes what a cached feature matrix holds, so
/// that stale caches are never read.
pub const FEATURE_FORMAT: &str = "ws2s-features-2";

/// The cache key of a feature matrix.
pub fn feature_key(
    model_hash: &str,
    ids: &[&str],
    texts: &[&str],
    options: &FeatureOptions,
) -> String {
    let mut data = String::new();
    for (id, text) in ids.iter().zip(texts) {
        data.push_str(id);
        data.push('\u{1f}');
        data.push_str(text);
        data.push('\u{1e}');
    }
    let data_hash = sha256_hex(data.as_bytes());
    let mut key = format!(
        "{FEATURE_FORMAT}\n{model_hash}\n{data_hash}\n{}\n{}",
        options.pooling.as_str(),
        options.max_tokens
    );
    // f32 keys are those of the versions before precisions existed (their caches stay valid).
    if options.precision != crate::ops::Precision::F32 {
        key.push_str(&format!("\nprecision {}", options.precision.name()));
        if options.precision == crate::ops::Precision::Int8 {
            // A change of the int8 format changes the features.
            key.push_str(&format!(" ({})", crate::ops::int8::FORMAT));
        }
    }
    sha256_hex(key.as_bytes())
}

/// The feature matrix stored under `key` in `cache_dir`, if present, intact (its checksum
/// holds) and of `rows` rows. A torn or altered file is reported and recomputed.
pub fn load_cached(key: &str, rows: usize, cache_dir: &Path, device: &Device) -> Option<Tensor> {
    let path = cache_dir.join(format!("{key}.safetensors"));
    if !path.exists() {
        return None;
    }
    match crate::io::load_tensors(&path, device) {
        Ok(mut tensors) => tensors
            .remove("features")
            .filter(|f| f.dim(0).ok() == Some(rows)),
        Err(err) => {
            eprintln!("warning: cached features not used, recomputing: {err:#}");
            None
        }
    }
}

/// Writes a feature matrix under `key` in `cache_dir` (atomically, with its checksum).
pub fn store_cached(key: &str, features: &Tensor, cache_dir: &Path) -> Result<()> {
    let path = cache_dir.join(format!("{key}.safetensors"));
    let tensors: HashMap<String, Tensor> =
        HashMap::from([("features".to_string(), features.clone())]);
    crate::io::save_tensors(&path, &tensors)
}

/// Features of `texts` from the cache folder when present, else extracted and written there
/// (atomically). Returns the features and whether they came from the cache.
pub fn cached_features(
    model: &Model,
    model_hash: &str,
    ids: &[&str],
    texts: &[&str],
    options: &FeatureOptions,
    cache_dir: &Path,
    device: &Device,
) -> Result<(Tensor, bool)> {
    let key = feature_key(model_hash, ids, texts, options);
    if let Some(features) = load_cached(&key, texts.len(), cache_dir, device) {
        return Ok((features, true));
    }
    let features = extract(model, texts, options, device)?;
    store_cached(&key, &features, cache_dir)?;
    Ok((features, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(sizes: &[usize]) -> Vec<prefix::PrefixGroup> {
        let mut next = 0;
        sizes
            .iter()
            .map(|&n| {
                let members = (next..next + n).collect();
                next += n;
                prefix::PrefixGroup { shared: 3, members }
            })
            .collect()
    }

    fn sizes_of(parts: &[&[prefix::PrefixGroup]]) -> Vec<usize> {
        parts
            .iter()
            .map(|p| p.iter().map(|g| g.members.len()).sum())
            .collect()
    }

    #[test]
    fn groups_split_into_runs_of_about_equal_members() {
        let g = groups(&[2, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(sizes_of(&split_by_members(&g, 2)), [8, 8]);
        assert_eq!(sizes_of(&split_by_members(&g, 3)), [6, 4, 6]);
        assert_eq!(sizes_of(&split_by_members(&g, 1)), [16]);
        // Never more runs than groups, none empty; the runs cover the groups in order.
        let g = groups(&[5, 2, 9]);
        for parts in 1..6 {
            let split = split_by_members(&g, parts);
            assert!(split.len() <= parts.min(3) && split.iter().all(|p| !p.is_empty()));
            let order: Vec<usize> = split
                .iter()
                .flat_map(|p| p.iter())
                .flat_map(|g| g.members.clone())
                .collect();
            assert_eq!(order, (0..16).collect::<Vec<_>>());
        }
        assert_eq!(sizes_of(&split_by_members(&g, 2)), [7, 9]);
        assert!(split_by_members(&[], 2).is_empty());
    }
}
