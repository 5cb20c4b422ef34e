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
