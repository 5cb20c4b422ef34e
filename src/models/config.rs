//! Parsing `config.json` ourselves, in both the transformers 4.x and 5.x layouts (STACK.md, trap 2:
//! 5.x writes `rope_parameters: {rope_theta}` and `sliding_window: null`).

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::path::Path;

/// Typed access to a config.json object with errors naming the file and the key.
pub struct ConfigJson<'a> {
    pub value: &'a Value,
    pub source: String,
}

impl<'a> ConfigJson<'a> {
    pub fn new(value: &'a Value, path: &Path) -> Self {
        ConfigJson {
            value,
            source: path.display().to_string(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                anyhow!(
                    "{}: `{key}` is missing or not a non-negative integer",
                    self.source
                )
            })
    }

    /// How `key` is named where the numbers came from: the config.json key, and for a GGUF
    /// file also its metadata key.
    pub fn key_name(&self, key: &str) -> String {
        let arch = self
            .value
            .get("model_type")
            .and_then(Value::as_str)
            .map(|t| t.trim_end_matches("_text"));
        match (self.source.ends_with(".gguf"), arch, gguf_key(key)) {
            (true, Some(arch), Some(suffix)) => format!("`{key}` (GGUF `{arch}.{suffix}`)"),
            _ => format!("`{key}`"),
        }
    }

    /// A size that must be at least 1.
    pub fn count(&self, key: &str) -> Result<usize> {
        let value = self.usize(key)?;
        if value == 0 {
            bail!(
                "{}: {} is 0; it must be at least 1",
                self.source,
                self.key_name(key)
            );
        }
        Ok(value)
    }

    /// The attention's shape (heads, key/value heads, head width) for a model of width
    /// `hidden`, checked: the heads divide the width (unless the config gives `head_dim`), the
    /// key/value heads divide the heads. `kv_key` is None for architectures without grouped
    /// queries; `head_dim` is the width of a head when the config does not give one (None:
    /// hidden / heads).
    pub fn attention(
        &self,
        hidden_key: &str,
        heads_key: &str,
        kv_key: Option<(&str, Option<usize>)>,
        head_dim: Option<usize>,
    ) -> Result<(usize, usize, usize)> {
        let hidden = self.count(hidden_key)?;
        let heads = self.count(heads_key)?;
        let kv_heads = match kv_key {
            Some((key, default)) => match self.get(key) {
                Some(_) => self.count(key)?,
                None => default.unwrap_or(heads),
            },
            None => heads,
        };
        // Only decoders with grouped queries read `head_dim`; the others split the width.
        let given = match kv_key {
            Some(_) => self.opt_usize("head_dim")?,
            None => None,
        };
        let head_dim = match (given, head_dim) {
            (Some(0), _) => bail!(
                "{}: {} is 0; it must be at least 1",
                self.source,
                self.key_name("head_dim")
            ),
            (Some(d), _) | (None, Some(d)) => d,
            (None, None) => {
                if hidden % heads != 0 {
                    bail!(
                        "{}: {} = {heads} does not divide {} = {hidden}; every head must have the same width",
                        self.source,
                        self.key_name(heads_key),
                        self.key_name(hidden_key)
                    );
                }
                hidden / heads
            }
        };
        if heads % kv_heads != 0 {
            let key = kv_key.map_or("num_key_value_heads", |(k, _)| k);
            bail!(
                "{}: {} = {kv_heads} does not divide {} = {heads}; each key/value head must serve the same number of query heads",
                self.source,
                self.key_name(key),
                self.key_name(heads_key)
            );
        }
        Ok((heads, kv_heads, head_dim))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|_| self.usize(key)).transpose()
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("{}: `{key}` is missing or not a number", self.source))
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.f64(key),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| anyhow!("{}: `{key}` is not true/false", self.source)),
        }
    }

    pub fn str_or(&self, key: &str, default: &'a str) -> &'a str {
        self.get(key).and_then(Value::as_str).unwrap_or(default)
    }

    /// RoPE base frequency: `rope_theta` (4.x) or `rope_parameters.rope_theta` (5.x; for models
    /// with several attention types, `rope_parameters.{kind}.rope_theta`).
    pub fn rope_theta(&self, kind: Option<&str>, default: f64) -> Result<f64> {
        if let Some(params) = self.get("rope_parameters") {
            let section = kind.and_then(|k| params.get(k)).unwrap_or(params);
            if let Some(theta) = section.get("rope_theta").and_then(Value::as_f64) {
                return Ok(theta);
            }
        }
        self.f64_or("rope_theta", default)
    }

    /// Rejects RoPE scaling schemes we do not implement, rather than silently ignoring them.
    pub fn check_plain_rope(&self) -> Result<()> {
        let scaling = self
            .get("rope_scaling")
            .or_else(|| self.get("rope_parameters"));
        if let Some(scaling) = scaling {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                bail!(
                    "{}: RoPE scaling `{kind}` is not supported (only plain RoPE)",
                    self.source
                );
            }
        }
        Ok(())
    }
}

/// The GGUF metadata key (after the architecture's prefix) that a config.json key is read from
/// (models/gguf.rs, `config_json`).
fn gguf_key(key: &str) -> Option<&'static str> {
    Some(match key {
        "hidden_size" => "embedding_length",
        "intermediate_size" => "feed_forward_length",
        "num_hidden_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "num_key_value_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attention(value: Value, source: &str) -> Result<(usize, usize, usize)> {
        let c = ConfigJson::new(&value, Path::new(source));
        c.attention(
            "hidden_size",
            "num_attention_heads",
            Some(("num_key_value_heads", None)),
            None,
        )
    }

    #[test]
    fn attention_shapes_are_checked_with_file_and_key() {
        let ok = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2});
        assert_eq!(attention(ok, "m/config.json").unwrap(), (4, 2, 16));
        let given = json!({"model_type": "llama", "hidden_size": 66, "num_attention_heads": 4, "head_dim": 16});
        assert_eq!(attention(given, "m/config.json").unwrap(), (4, 4, 16));
        let cases = [
            (json!({"model_type": "llama", "hidden_size": 66, "num_attention_heads": 4}), "m/config.json", "`num_attention_heads` = 4 does not divide `hidden_size` = 66"),
            (json!({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}), "m/config.json", "`num_key_value_heads` = 3 does not divide `num_attention_heads` = 4"),
            (json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0}), "m/config.json", "`num_attention_heads` is 0"),
            (json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 0}), "m/config.json", "`num_key_value_heads` is 0"),
            // GGUF files: the metadata key too.
            (json!({"model_type": "llama", "hidden_size": 66, "num_attention_heads": 4}), "t.gguf", "`num_attention_heads` (GGUF `llama.attention.head_count`) = 4 does not divide `hidden_size` (GGUF `llama.embedding_length`) = 66"),
            (json!({"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3, "head_dim": 16}), "g.gguf", "GGUF `gemma3.attention.head_count_kv`"),
        ];
        for (value, source, expected) in cases {
            let err = attention(value, source).unwrap_err().to_string();
            assert!(err.starts_with(source), "{err}");
            assert!(err.contains(expected), "{expected} not in {err}");
        }
    }
}
