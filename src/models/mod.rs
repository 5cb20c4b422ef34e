//! Models: one file per architecture, plus loading (HF folders, GGUF), tokenizers, heads, LoRA
//! and decoding. Forward passes are our own, written with differentiable candle operations.

pub mod bert;
pub mod cache;
pub mod config;
pub mod gpt2;
pub mod llama;
pub mod nn;
pub mod params;

use anyhow::{anyhow, bail, Context, Result};
use cache::KvCache;
use candle_core::{Device, Tensor, Var};
use params::{Params, Trainable};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The network of a model, by architecture.
#[derive(Debug, Clone)]
pub enum Network {
    Bert(bert::Bert),
    Llama(llama::Llama),
    Gpt2(gpt2::Gpt2),
}

impl Network {
    pub fn architecture(&self) -> &'static str {
        match self {
            Network::Bert(_) => "bert",
            Network::Llama(m) if m.config.qkv_bias && !m.config.o_bias => "qwen2",
            Network::Llama(_) => "llama",
            Network::Gpt2(_) => "gpt2",
        }
    }

    pub fn is_decoder(&self) -> bool {
        !matches!(self, Network::Bert(_))
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Network::Bert(m) => m.config.num_layers,
            Network::Llama(m) => m.config.num_layers,
            Network::Gpt2(m) => m.config.num_layers,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Network::Bert(m) => m.config.hidden_size,
            Network::Llama(m) => m.config.hidden_size,
            Network::Gpt2(m) => m.config.hidden_size,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Network::Bert(m) => m.config.vocab_size,
            Network::Llama(m) => m.config.vocab_size,
            Network::Gpt2(m) => m.config.vocab_size,
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }

    /// Final hidden states [B, T, H] of the new tokens `ids` [B, T] with 0/1 `mask` rows.
    /// Decoders continue from `cache` (and extend it); encoders ignore it.
    pub fn hidden(&self, ids: &Tensor, mask: &[Vec<u32>], cache: &mut KvCache) -> Result<Tensor> {
        match self {
            Network::Bert(m) => m.forward(ids, mask),
            Network::Llama(m) => m.forward(ids, mask, cache),
            Network::Gpt2(m) => m.forward(ids, mask, cache),
        }
    }

    /// Next-token logits [B, T, V] from hidden states (decoders only).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match self {
            Network::Bert(_) => bail!("a BERT encoder has no language-model head"),
            Network::Llama(m) => m.logits(hidden),
            Network::Gpt2(m) => m.logits(hidden),
        }
    }
}

/// Builds the network that `config.json` describes from checkpoint tensors.
pub fn network_from_config(
    config: &serde_json::Value,
    config_path: &Path,
    params: &mut Params,
) -> Result<Network> {
    let c = config::ConfigJson::new(config, config_path);
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("{}: `model_type` is missing", config_path.display()))?;
    Ok(match model_type {
        "bert" => Network::Bert(bert::Bert::load(bert::BertConfig::from_json(&c)?, params)?),
        "llama" => Network::Llama(llama::Llama::load(
            llama::LlamaConfig::from_json(&c, false)?,
            params,
        )?),
        "qwen2" => Network::Llama(llama::Llama::load(
            llama::LlamaConfig::from_json(&c, true)?,
            params,
        )?),
        "gpt2" => Network::Gpt2(gpt2::Gpt2::load(gpt2::Gpt2Config::from_json(&c)?, params)?),
        other => bail!(
            "{}: unknown architecture `{other}`; supported: bert, llama, qwen2, gpt2",
            config_path.display()
        ),
    })
}

/// The safetensors files of an HF folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: `weight_map` is missing", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// Reads every tensor of the given safetensors files.
pub fn read_safetensors(files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for file in files {
        let loaded = candle_core::safetensors::load(file, device).with_context(|| {
            format!(
                "{}: not a readable safetensors file (truncated or corrupt?)",
                file.display()
            )
        })?;
        tensors.extend(loaded);
    }
    Ok(tensors)
}

/// A loaded model: network, trainable variables, and what it was loaded from.
pub struct Model {
    pub network: Network,
    pub vars: BTreeMap<String, Var>,
    pub source: PathBuf,
}

impl Model {
    /// Loads an HF folder (config.json + safetensors).
    pub fn load_hf_folder(
        dir: &Path,
        trainable: Trainable,
        seed: u64,
        device: &Device,
    ) -> Result<Model> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read config.json", dir.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let tensors = read_safetensors(&safetensors_files(dir)?, device)?;
        let mut params = Params::new(tensors, trainable, seed, device, &dir.display().to_string());
        let network = network_from_config(&config, &config_path, &mut params)?;
        Ok(Model {
            network,
            vars: params.into_vars(),
            source: dir.to_path_buf(),
        })
    }
}
