//! Models: one file per architecture, plus loading (HF folders, GGUF), tokenizers, heads, LoRA
//! and decoding. Forward passes are our own, written with differentiable candle operations.

pub mod bert;
pub mod cache;
pub mod config;
pub mod decode;
pub mod features;
pub mod gemma3;
pub mod gguf;
pub mod gpt2;
pub mod heads;
#[cfg(feature = "hub")]
pub mod hub;
pub mod llama;
pub mod nn;
pub mod params;
pub mod prefix;
pub mod tokenizer;

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
    Gemma3(gemma3::Gemma3),
}

/// The fewest tokens (padding included) a part of [`Network::hidden_parallel`] is given.
pub const MIN_PART_TOKENS: usize = 64;

/// How many parts a batch of `seqs` sequences of `len` tokens runs in side by side: one per
/// worker thread, at most one per sequence, each of at least [`MIN_PART_TOKENS`] tokens.
pub fn batch_parts(seqs: usize, len: usize) -> usize {
    let by_size = (seqs * len / MIN_PART_TOKENS).max(1);
    rayon::current_num_threads().min(seqs).min(by_size).max(1)
}

impl Network {
    pub fn architecture(&self) -> &'static str {
        match self {
            Network::Bert(_) => "bert",
            Network::Llama(m) if m.config.qkv_bias && !m.config.o_bias => "qwen2",
            Network::Llama(_) => "llama",
            Network::Gpt2(_) => "gpt2",
            Network::Gemma3(_) => "gemma3",
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
            Network::Gemma3(m) => m.config.num_layers,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Network::Bert(m) => m.config.hidden_size,
            Network::Llama(m) => m.config.hidden_size,
            Network::Gpt2(m) => m.config.hidden_size,
            Network::Gemma3(m) => m.config.hidden_size,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Network::Bert(m) => m.config.vocab_size,
            Network::Llama(m) => m.config.vocab_size,
            Network::Gpt2(m) => m.config.vocab_size,
            Network::Gemma3(m) => m.config.vocab_size,
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }

    /// Final hidden states [B, T, H] of the new tokens `ids` [B, T] with 0/1 `mask` rows.
    /// Decoders continue from `cache` (and extend it); encoders ignore it.
    pub fn hidden(&self, ids: &Tensor, mask: &[Vec<u32>], cache: &mut KvCache) -> Result<Tensor> {
        self.forward(ids, mask, cache, None)
    }

    /// Final hidden states [B, H] at each sequence's last real token (the last 1 of its `mask`
    /// row): what last-token pooling and next-token logits read. The same values as those
    /// positions of [`Network::hidden`]; the last layer's projections after attention, its
    /// MLP and the final norm run for these B positions alone (a T-th of their work).
    pub fn last_hidden(
        &self,
        ids: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let keep = nn::last_positions(mask, ids.device())?;
        Ok(self.forward(ids, mask, cache, Some(&keep))?.squeeze(0)?)
    }

    fn forward(
        &self,
        ids: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            Network::Bert(m) => m.forward(ids, mask, keep),
            Network::Llama(m) => m.forward(ids, mask, cache, keep),
            Network::Gpt2(m) => m.forward(ids, mask, cache, keep),
            Network::Gemma3(m) => m.forward(ids, mask, cache, keep),
        }
    }

    /// Final hidden states [B, T, H] of whole sequences `ids` [B, T] (a fresh cache), the batch
    /// in [`batch_parts`] parts of consecutive sequences run side by side, one per worker
    /// thread. Every row of a forward is computed apart from the other sequences' rows, so
    /// the values are those of one call for the whole batch; the ops inside each part still
    /// split their work, which a thread done with its own part takes over. Two threads on
    /// one batch of 32 x 32 tokens: MiniLM-L6 and SmolLM2-135M 17% and 22% faster than the
    /// batch as one part (fewer joins, each thread's rows in its own cache; Intel Xeon with
    /// AMX, docs/results/inference.md, session 22).
    pub fn hidden_parallel(&self, ids: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.hidden_in_parts(ids, mask, batch_parts(b, t))
    }

    /// [`Network::hidden_parallel`] in `parts` parts (1: one call; the CPU only).
    pub fn hidden_in_parts(&self, ids: &Tensor, mask: &[Vec<u32>], parts: usize) -> Result<Tensor> {
        self.in_parts(ids, mask, parts, |ids, mask, cache| {
            self.hidden(ids, mask, cache)
        })
    }

    /// [`Network::last_hidden`] of whole sequences, in parts as [`Network::hidden_parallel`].
    pub fn last_hidden_parallel(&self, ids: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.in_parts(ids, mask, batch_parts(b, t), |ids, mask, cache| {
            self.last_hidden(ids, mask, cache)
        })
    }

    /// `run` on each of `parts` parts of consecutive sequences (a fresh cache each), side by
    /// side on the CPU, the results concatenated along the batch.
    fn in_parts(
        &self,
        ids: &Tensor,
        mask: &[Vec<u32>],
        parts: usize,
        run: impl Fn(&Tensor, &[Vec<u32>], &mut KvCache) -> Result<Tensor> + Sync,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let b = ids.dim(0)?;
        if mask.len() != b {
            bail!("{} mask rows for a batch of {b}", mask.len());
        }
        let parts = parts.min(b);
        if parts <= 1 || !ids.device().is_cpu() {
            return run(ids, mask, &mut self.new_cache());
        }
        let outputs: Vec<Tensor> = (0..parts)
            .into_par_iter()
            .map(|i| {
                let (start, end) = (i * b / parts, (i + 1) * b / parts);
                let ids = ids.narrow(0, start, end - start)?;
                run(&ids, &mask[start..end], &mut self.new_cache())
            })
            .collect::<Result<_>>()?;
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// Packs the frozen projections (and the head) for inference in `precision`; f32 drops
    /// the packed copies. Layers with adapters or trained weights stay in f32.
    pub fn set_precision(&mut self, precision: crate::ops::Precision) -> Result<()> {
        match self {
            Network::Bert(m) => m.set_precision(precision),
            Network::Llama(m) => m.set_precision(precision),
            Network::Gpt2(m) => m.set_precision(precision),
            Network::Gemma3(m) => m.set_precision(precision),
        }
    }

    /// For each row of `hidden` [rows, H] (decoders only): the `keep` most likely next tokens
    /// with their log-probabilities, best first (screened in int8 where the head allows it,
    /// [`nn::Head::top_logprobs`]).
    pub fn top_logprobs(&self, hidden: &Tensor, keep: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        Ok(match self {
            Network::Bert(_) => bail!("a BERT encoder has no language-model head"),
            Network::Llama(m) => m.lm_head.top_logprobs(hidden, keep, None)?,
            Network::Gpt2(m) => m.head.top_logprobs(hidden, keep, None)?,
            Network::Gemma3(m) => {
                let cap = m.config.final_logit_softcapping;
                m.head.top_logprobs(hidden, keep, cap)?
            }
        })
    }

    /// Whether decoding screens its next tokens in int8 ([`nn::Head::screens`]).
    pub fn screens_head(&self) -> bool {
        match self {
            Network::Bert(_) => false,
            Network::Llama(m) => m.lm_head.screens(),
            Network::Gpt2(m) => m.head.screens(),
            Network::Gemma3(m) => m.head.screens(),
        }
    }

    /// Forces the head's int8 screen on or off, or back to the default (`None`); see
    /// [`nn::Head::set_screening`]. Encoders have no head: nothing to do.
    pub fn set_head_screen(&mut self, on: Option<bool>) {
        match self {
            Network::Bert(_) => {}
            Network::Llama(m) => m.lm_head.set_screening(on),
            Network::Gpt2(m) => m.head.set_screening(on),
            Network::Gemma3(m) => m.head.set_screening(on),
        }
    }

    /// Next-token logits [B, T, V] from hidden states (decoders only).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match self {
            Network::Bert(_) => bail!("a BERT encoder has no language-model head"),
            Network::Llama(m) => m.logits(hidden),
            Network::Gpt2(m) => m.logits(hidden),
            Network::Gemma3(m) => m.logits(hidden),
        }
        .and_then(|logits| Ok(logits.to_dtype(candle_core::DType::F32)?))
    }
}

/// The tokenizer of a model folder (tokenizer.json) or GGUF file, without loading the weights.
pub fn load_tokenizer(path: &Path) -> Result<tokenizer::Tokenizer> {
    if path.is_dir() {
        if !path.join("tokenizer.json").exists() {
            bail!("{}: no tokenizer.json in the model folder", path.display());
        }
        tokenizer::Tokenizer::from_hf_folder(path)
    } else {
        tokenizer::Tokenizer::from_gguf(&gguf::GgufFile::open(path)?)
    }
}

/// The `model_type` of a model folder or GGUF file, read from its config or metadata only (no
/// weights are loaded).
pub fn model_type(path: &Path) -> Result<String> {
    let config = if path.is_dir() {
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read config.json", path.display()))?;
        serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("{}: not valid JSON", config_path.display()))?
    } else {
        gguf::GgufFile::open(path)?.config_json()?
    };
    config
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: `model_type` is missing", path.display()))
}

/// The architecture settings that a `config.json` (or GGUF metadata) describes, checked
/// (heads divide the width, key/value heads divide the heads, sizes >= 1) before any tensor
/// is read.
#[derive(Debug, Clone)]
pub enum ArchConfig {
    Bert(bert::BertConfig),
    Llama(llama::LlamaConfig),
    Gpt2(gpt2::Gpt2Config),
    Gemma3(gemma3::Gemma3Config),
}

impl ArchConfig {
    /// Parses and checks the settings; errors name the file and the key.
    pub fn parse(config: &serde_json::Value, config_path: &Path) -> Result<ArchConfig> {
        let c = config::ConfigJson::new(config, config_path);
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("{}: `model_type` is missing", config_path.display()))?;
        Ok(match model_type {
            "bert" => ArchConfig::Bert(bert::BertConfig::from_json(&c)?),
            "llama" => ArchConfig::Llama(llama::LlamaConfig::from_json(&c, false)?),
            "qwen2" => ArchConfig::Llama(llama::LlamaConfig::from_json(&c, true)?),
            "gpt2" => ArchConfig::Gpt2(gpt2::Gpt2Config::from_json(&c)?),
            "gemma3_text" => ArchConfig::Gemma3(gemma3::Gemma3Config::from_json(&c)?),
            "gemma3" => {
                // A multimodal Gemma 3 config: the text stack's settings are under `text_config`.
                let text = config.get("text_config").ok_or_else(|| {
                    anyhow!("{}: `text_config` is missing", config_path.display())
                })?;
                let c = config::ConfigJson::new(text, config_path);
                ArchConfig::Gemma3(gemma3::Gemma3Config::from_json(&c)?)
            }
            other => bail!(
                "{}: unknown architecture `{other}`; supported: bert, llama, qwen2, gpt2, gemma3_text",
                config_path.display()
            ),
        })
    }

    /// The names of the modules that can carry a LoRA adapter (the last component of their
    /// checkpoint names).
    pub fn adapter_modules(&self) -> &'static [&'static str] {
        match self {
            ArchConfig::Bert(_) => &["query", "key", "value", "dense"],
            ArchConfig::Llama(_) | ArchConfig::Gemma3(_) => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            ArchConfig::Gpt2(_) => &["c_attn", "c_proj", "c_fc"],
        }
    }

    /// The longest input the architecture can encode (absolute position tables), if bounded.
    pub fn max_positions(&self) -> Option<(usize, &'static str)> {
        match self {
            ArchConfig::Bert(c) => Some((c.max_positions, "max_position_embeddings")),
            ArchConfig::Gpt2(c) => Some((c.max_positions, "n_positions")),
            ArchConfig::Llama(_) | ArchConfig::Gemma3(_) => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ArchConfig::Bert(_) => "bert",
            ArchConfig::Llama(_) => "llama/qwen2",
            ArchConfig::Gpt2(_) => "gpt2",
            ArchConfig::Gemma3(_) => "gemma3",
        }
    }

    /// The network with these settings, from checkpoint tensors.
    pub fn build(self, params: &mut Params) -> Result<Network> {
        Ok(match self {
            ArchConfig::Bert(c) => Network::Bert(bert::Bert::load(c, params)?),
            ArchConfig::Llama(c) => Network::Llama(llama::Llama::load(c, params)?),
            ArchConfig::Gpt2(c) => Network::Gpt2(gpt2::Gpt2::load(c, params)?),
            ArchConfig::Gemma3(c) => Network::Gemma3(gemma3::Gemma3::load(c, params)?),
        })
    }
}

/// Builds the network that `config.json` describes from checkpoint tensors.
pub fn network_from_config(
    config: &serde_json::Value,
    config_path: &Path,
    params: &mut Params,
) -> Result<Network> {
    ArchConfig::parse(config, config_path)?.build(params)
}

/// Checks a model's files without loading its weights, in well under a second: the config (or
/// GGUF header) parses and describes a consistent architecture, the safetensors headers parse
/// and match their files' sizes (a truncated download is caught), and the tokenizer loads.
pub fn check_model_files(path: &Path) -> Result<ArchConfig> {
    let arch = if path.is_dir() {
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read config.json", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let arch = ArchConfig::parse(&config, &config_path)?;
        for file in safetensors_files(path)? {
            check_safetensors_header(&file)?;
        }
        arch
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let file = gguf::GgufFile::open(path)?;
        file.check_extents()?;
        let arch = ArchConfig::parse(&file.config_json()?, path)?;
        tokenizer::Tokenizer::from_gguf(&file)?;
        return Ok(arch);
    } else if path.exists() {
        bail!(
            "{}: expected an HF model folder or a .gguf file",
            path.display()
        );
    } else {
        bail!("{}: no such model folder or file", path.display());
    };
    load_tokenizer(path)?;
    Ok(arch)
}

/// Reads a safetensors header and checks that the file holds exactly the data it describes.
fn check_safetensors_header(file: &Path) -> Result<()> {
    use std::io::Read;
    let corrupt =
        |why: String| anyhow!("{}: not a readable safetensors file: {why}", file.display());
    let mut f =
        std::fs::File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| corrupt("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100_000_000 {
        return Err(corrupt(format!(
            "header length {n} exceeds the file ({len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| corrupt(format!("cannot read the header: {e}")))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("the header is not JSON: {e}")))?;
    let tensors = header
        .as_object()
        .ok_or_else(|| corrupt("the header is not a JSON object".into()))?;
    let mut end = 0u64;
    for (name, info) in tensors {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| o.get(1))
            .and_then(|o| o.as_u64())
            .ok_or_else(|| corrupt(format!("tensor `{name}` has no data_offsets")))?;
        end = end.max(offsets);
    }
    let data = len - 8 - n;
    if end != data {
        return Err(corrupt(format!(
            "the header describes {end} bytes of tensor data, the file holds {data} (truncated download?)"
        )));
    }
    Ok(())
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

/// A loaded model: network, trainable variables, tokenizer, and what it was loaded from.
pub struct Model {
    pub network: Network,
    pub vars: BTreeMap<String, Var>,
    pub tokenizer: Option<tokenizer::Tokenizer>,
    pub source: PathBuf,
    /// The config.json (or its equivalent built from GGUF metadata).
    pub config: serde_json::Value,
    /// Checkpoint parameters used by the network (tied weights once).
    pub parameters: usize,
    /// Stored tensor types and how many tensors have each (GGUF: quantisation types).
    pub stored_dtypes: BTreeMap<String, usize>,
}

impl Model {
    /// Loads a model from an HF folder (config.json, safetensors, tokenizer.json) or a `.gguf`
    /// file, its frozen weights in the device's type (f32 on the CPU, bf16 on a GPU).
    pub fn load(path: &Path, trainable: Trainable, seed: u64, device: &Device) -> Result<Model> {
        Self::load_as(
            path,
            trainable,
            seed,
            device,
            crate::runtime::frozen_dtype(device),
        )
    }

    /// [`Model::load`] with the frozen weights in `dtype` (trained weights stay f32).
    pub fn load_as(
        path: &Path,
        trainable: Trainable,
        seed: u64,
        device: &Device,
        dtype: candle_core::DType,
    ) -> Result<Model> {
        Self::load_packing(path, trainable, seed, device, dtype, None)
    }

    /// Loads a model for inference in `precision` only: frozen, its weights in the precision's
    /// type, and, in int8 or bf16x2, each linear layer packed as it is built with no f32 copy
    /// kept (the head and embeddings stay f32) (GGUF
    /// tensors are de-quantised one at a time): the f32 weights never all exist at once, which
    /// saves most of the memory and of the time spent touching it. Such a model cannot switch
    /// to another precision later (load it again).
    pub fn load_for_inference(
        path: &Path,
        precision: crate::ops::Precision,
        device: &Device,
    ) -> Result<Model> {
        let pack = precision.packs().then_some(precision);
        let mut model =
            Self::load_packing(path, Trainable::Frozen, 0, device, precision.dtype(), pack)?;
        model.network.set_precision(precision)?;
        Ok(model)
    }

    fn load_packing(
        path: &Path,
        trainable: Trainable,
        seed: u64,
        device: &Device,
        dtype: candle_core::DType,
        pack: Option<crate::ops::Precision>,
    ) -> Result<Model> {
        let params = |tensors: Params| {
            let params = tensors.with_frozen_dtype(dtype);
            match pack {
                Some(p) => params.with_packing(p),
                None => params,
            }
        };
        let source = path.display().to_string();
        if path.is_dir() {
            Self::hf_with(
                path,
                |tensors| params(Params::new(tensors, trainable, seed, device, &source)),
                device,
            )
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Self::gguf_with(
                path,
                |lazy| params(Params::lazy(lazy, trainable, seed, device, &source)),
                device,
            )
        } else if path.exists() {
            bail!(
                "{}: expected an HF model folder or a .gguf file",
                path.display()
            )
        } else {
            bail!("{}: no such model folder or file", path.display())
        }
    }

    /// Loads an HF folder (config.json + safetensors; tokenizer.json when present).
    pub fn load_hf_folder(
        dir: &Path,
        trainable: Trainable,
        seed: u64,
        device: &Device,
        dtype: candle_core::DType,
    ) -> Result<Model> {
        Self::hf_with(
            dir,
            |tensors| {
                let source = dir.display().to_string();
                Params::new(tensors, trainable, seed, device, &source).with_frozen_dtype(dtype)
            },
            device,
        )
    }

    fn hf_with(
        dir: &Path,
        make_params: impl FnOnce(HashMap<String, Tensor>) -> Params,
        device: &Device,
    ) -> Result<Model> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read config.json", dir.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let mut params = make_params(read_safetensors(&safetensors_files(dir)?, device)?);
        let network = network_from_config(&config, &config_path, &mut params)?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(tokenizer::Tokenizer::from_hf_folder(dir)?)
        } else {
            None
        };
        let (parameters, stored_dtypes) = params.checkpoint_summary();
        Ok(Model {
            network,
            vars: params.into_vars(),
            tokenizer,
            source: dir.to_path_buf(),
            config,
            parameters,
            stored_dtypes,
        })
    }

    /// Loads a GGUF file, de-quantised to f32 (tensor by tensor, as the layers are built), with
    /// the tokenizer of its metadata.
    pub fn load_gguf(
        path: &Path,
        trainable: Trainable,
        seed: u64,
        device: &Device,
        dtype: candle_core::DType,
    ) -> Result<Model> {
        Self::gguf_with(
            path,
            |lazy| {
                let source = path.display().to_string();
                Params::lazy(lazy, trainable, seed, device, &source).with_frozen_dtype(dtype)
            },
            device,
        )
    }

    fn gguf_with(
        path: &Path,
        make_params: impl FnOnce(HashMap<String, params::LazyTensor>) -> Params,
        device: &Device,
    ) -> Result<Model> {
        let file = gguf::GgufFile::open(path)?;
        let config = file.config_json()?;
        // Checked before the tensors are read: their layout depends on the head counts.
        let arch = ArchConfig::parse(&config, path)?;
        let mut params = make_params(file.lazy_tensors(device)?);
        // The tokenizer (~0.2 s on one thread for a 150k vocabulary) is built while the layers
        // are read and packed.
        let (network, tokenizer) = rayon::join(
            || {
                // Packed for inference on the CPU, the token embeddings stay quantised (read
                // row by row; the f32 table, often the largest matrix, is made only if a tied
                // head needs it).
                if params.keeps_quantised() {
                    if let Some(rows) = file.embedding_rows()? {
                        params.keep_quantised("model.embed_tokens.weight", rows);
                    }
                }
                arch.build(&mut params)
            },
            || tokenizer::Tokenizer::from_gguf(&file),
        );
        let (network, tokenizer) = (network?, Some(tokenizer?));
        let (parameters, _) = params.checkpoint_summary();
        Ok(Model {
            network,
            vars: params.into_vars(),
            tokenizer,
            source: path.to_path_buf(),
            config,
            parameters,
            stored_dtypes: file.dtype_counts(),
        })
    }

    /// The tokenizer, or an error saying that the model came without one.
    pub fn tokenizer(&self) -> Result<&tokenizer::Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: the model has no tokenizer (tokenizer.json is missing)",
                self.source.display()
            )
        })
    }
}

/// Models that `scripts/fetch-models` installs: (name, path under `$WS2S_HOME/models`).
pub const KNOWN_MODELS: [(&str, &str); 5] = [
    (
        "smollm2-135m",
        "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    ("gemma3-270m", "gemma3-270m/gemma-3-270m-q4_k_m.gguf"),
    (
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    (
        "qwen2.5-coder-1.5b",
        "qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
    ("all-minilm-l6-v2", "all-minilm-l6-v2"),
];

/// A model argument: a path, or the name of a fetched model. A known name that is not installed
/// yet is an error that says how to install it.
pub fn resolve_model(name_or_path: &str) -> Result<PathBuf> {
    let path = PathBuf::from(name_or_path);
    if path.exists() {
        return Ok(path);
    }
    if let Some((name, relative)) = KNOWN_MODELS.iter().find(|(n, _)| *n == name_or_path) {
        let installed = crate::home::Home::from_env().models().join(relative);
        if installed.exists() {
            return Ok(installed);
        }
        bail!(
            "model `{name}` is not installed at {}; run: scripts/fetch-models {name}",
            installed.display()
        );
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|(n, _)| *n).collect();
    bail!(
        "{name_or_path}: no such file or folder, and not a known model name ({})",
        names.join(", ")
    )
}

/// A content hash of a model: the sha256 of a GGUF file, or of the config, weights and tokenizer
/// files of an HF folder. File hashes are remembered in `$WS2S_HOME/file-hashes.json` by path,
/// size and modification time, so large files are hashed once.
pub fn model_hash(path: &Path) -> Result<String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files = safetensors_files(path)?;
        for name in ["config.json", "tokenizer.json"] {
            if path.join(name).exists() {
                files.push(path.join(name));
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let memo_path = crate::home::Home::from_env().file_hashes();
    let mut memo: BTreeMap<String, String> = std::fs::read_to_string(&memo_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut combined = String::new();
    let mut changed = false;
    for file in &files {
        let meta =
            std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let key = format!(
            "{}|{}|{}",
            file.canonicalize()?.display(),
            meta.len(),
            mtime.map_or(0, |d| d.as_nanos())
        );
        let hash = match memo.get(&key) {
            Some(hash) => hash.clone(),
            None => {
                let hash = crate::hash::sha256_file(file)
                    .with_context(|| format!("hashing {}", file.display()))?;
                memo.insert(key, hash.clone());
                changed = true;
                hash
            }
        };
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        combined.push_str(&format!("{name}:{hash}\n"));
    }
    if changed {
        // The memo is an optimisation: failing to write it is not an error.
        let _ = serde_json::to_vec_pretty(&memo)
            .map(|bytes| crate::io::write_atomic(&memo_path, &bytes));
    }
    Ok(if files.len() == 1 && !path.is_dir() {
        combined
            .split(':')
            .nth(1)
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    } else {
        crate::hash::sha256_hex(combined.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_batch_runs_in_one_part_per_thread_with_enough_tokens_each() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        pool.install(|| {
            assert_eq!(super::batch_parts(32, 32), 4);
            assert_eq!(super::batch_parts(2, 500), 2);
            // Parts of at least 64 tokens: 3 x 20 tokens is one part, 8 x 20 two.
            assert_eq!(super::batch_parts(3, 20), 1);
            assert_eq!(super::batch_parts(8, 20), 2);
            assert_eq!(super::batch_parts(1, 4096), 1);
            assert_eq!(super::batch_parts(0, 0), 1);
        });
    }
}
