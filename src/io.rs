//! File helpers: JSONL reading with line-numbered errors, gzip transparency, atomic writes.

use crate::error::InputError;
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

/// Reads a whole file, un-gzipping it when its name ends in `.gz`.
pub fn read_text(path: &Path) -> Result<String, InputError> {
    let file = std::fs::File::open(path)
        .map_err(|e| InputError::in_file(path, format!("cannot open: {e}")))?;
    let mut text = String::new();
    let result = if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text)
    } else {
        BufReader::new(file).read_to_string(&mut text)
    };
    result.map_err(|e| InputError::in_file(path, format!("cannot read as UTF-8 text: {e}")))?;
    Ok(text)
}

/// Parses a JSONL file into records of type `T`. Blank lines are skipped; an empty file, a line
/// that is not JSON, or a line missing a field is an error naming the file and the line.
/// `what` describes one expected record for the error message, e.g. `{"label": int, "probs": [float]}`.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<T>, InputError> {
    read_jsonl_map(path, what, |_, record| Ok(record))
}

/// Like [`read_jsonl`], and each parsed record goes through `convert` with its 1-based line number,
/// so that checks beyond the JSON shape can name their line too.
pub fn read_jsonl_map<T: DeserializeOwned, U>(
    path: &Path,
    what: &str,
    mut convert: impl FnMut(usize, T) -> Result<U, InputError>,
) -> Result<Vec<U>, InputError> {
    let file = std::fs::File::open(path)
        .map_err(|e| InputError::in_file(path, format!("cannot open: {e}")))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut records = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line_no = index + 1;
        let line =
            line.map_err(|e| InputError::at_line(path, line_no, format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        // serde would also read a struct from a JSON array (`[0, [0.9, 0.1]]`): only objects.
        if !line.trim_start().starts_with('{') {
            return Err(InputError::at_line(
                path,
                line_no,
                format!("expected a JSON object {what}, got `{}`", preview(&line)),
            ));
        }
        let record = serde_json::from_str::<T>(&line).map_err(|e| {
            InputError::at_line(path, line_no, format!("expected a JSON object {what}: {e}"))
        })?;
        records.push(convert(line_no, record)?);
    }
    if records.is_empty() {
        return Err(InputError::in_file(
            path,
            format!("the file is empty: expected one JSON object {what} per line"),
        ));
    }
    Ok(records)
}

/// The start of a line for an error message.
fn preview(line: &str) -> String {
    let trimmed = line.trim();
    match trimmed.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &trimmed[..at]),
        None => trimmed.to_string(),
    }
}

/// A temporary file name in `path`'s folder (created if missing), to be renamed over `path`.
fn temporary_beside(path: &Path) -> Result<std::path::PathBuf> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    Ok(dir.join(format!(".{name}.tmp-{}", std::process::id())))
}

/// Writes a file atomically: the bytes go to a temporary file in the same folder, which is then
/// renamed over the target, so a reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_beside(path)?;
    {
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all().ok();
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// The sha256 of named tensors: names, types, shapes and bytes, in name order.
fn tensors_digest<'a, V: safetensors::View + 'a>(
    tensors: impl Iterator<Item = (&'a str, V)>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<(&str, V)> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Sha256::new();
    for (name, view) in sorted {
        hasher.update(name.as_bytes());
        hasher.update(format!("\u{1f}{:?}\u{1f}{:?}\u{1f}", view.dtype(), view.shape()).as_bytes());
        hasher.update(view.data());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const CHECKSUM_KEY: &str = "ws2s_sha256";

/// Saves tensors as safetensors with the sha256 of their contents in the file's metadata,
/// atomically (temporary file, then rename): a reader sees the old file or the whole new one.
pub fn save_tensors(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let digest = tensors_digest(tensors.iter().map(|(k, v)| (k.as_str(), v)));
    let metadata = std::collections::HashMap::from([(CHECKSUM_KEY.to_string(), digest)]);
    let tmp = temporary_beside(path)?;
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata),
        &tmp,
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Loads a file written by [`save_tensors`] after checking its checksum: a truncated, torn or
/// altered file is an error (callers that cache recompute), never data.
pub fn load_tensors(
    path: &Path,
    device: &candle_core::Device,
) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let torn = |why: &str| anyhow::anyhow!("{}: {why}", path.display());
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| torn(&format!("not a readable tensor file (truncated?): {e}")))?;
    let expected = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CHECKSUM_KEY))
        .cloned()
        .ok_or_else(|| torn("no checksum (written by an older version, or not by ws2s)"))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| torn(&format!("not a readable tensor file (truncated?): {e}")))?;
    let views = file.tensors();
    if tensors_digest(views.iter().map(|(k, v)| (k.as_str(), v))) != expected {
        return Err(torn("checksum mismatch: the file is torn or corrupt"));
    }
    candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("{}: not a readable tensor file", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Rec {
        label: i64,
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"label\": 1}\n\n{\"lab\": 2}\n").unwrap();
        let err = read_jsonl::<Rec>(&path, "{\"label\": int}").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().contains("p.jsonl:3:"), "{err}");
        assert!(err.message.contains("missing field `label`"), "{err}");

        std::fs::write(&path, "not json\n").unwrap();
        let err = read_jsonl::<Rec>(&path, "{\"label\": int}").unwrap_err();
        assert_eq!(err.line, Some(1));

        std::fs::write(&path, "\n  \n").unwrap();
        let err = read_jsonl::<Rec>(&path, "{\"label\": int}").unwrap_err();
        assert_eq!(err.line, None);
        assert!(err.message.contains("empty"));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("out.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn tensor_files_carry_a_checksum_that_catches_torn_and_altered_files() {
        use candle_core::{Device, Tensor};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let x = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 8))
            .unwrap();
        let tensors = std::collections::HashMap::from([("x".to_string(), x.clone())]);
        save_tensors(&path, &tensors).unwrap();
        let back = load_tensors(&path, &Device::Cpu).unwrap();
        assert_eq!(
            back["x"].to_vec2::<f32>().unwrap(),
            x.to_vec2::<f32>().unwrap()
        );
        let bytes = std::fs::read(&path).unwrap();
        // One bit of one value flipped: still a valid file, but not the one written.
        let mut altered = bytes.clone();
        let at = altered.len() - 7;
        altered[at] ^= 1;
        std::fs::write(&path, &altered).unwrap();
        let err = load_tensors(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = load_tensors(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("t.safetensors"), "{err}");
        // A file without our checksum (plain candle) is not trusted either.
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = load_tensors(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("no checksum"), "{err}");
    }
}
