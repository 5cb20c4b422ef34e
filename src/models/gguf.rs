//! GGUF checkpoints (llama.cpp's format): metadata turned into a config, tensors de-quantised to
//! f32 (STACK.md trap 8: quantised matmuls are far too slow for batched passes here) and renamed
//! to the HF names our architectures use; llama-arch Q/K weights un-permuted back to the HF
//! half-split RoPE layout.

use super::params::LazyTensor;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A buffered file that knows its position. The GGUF metadata is read a few bytes at a time
/// (a 150,000-token vocabulary is some 300,000 reads), and candle asks for the position before
/// every string: on the bare file each read and each question is a system call.
struct Tracked {
    inner: std::io::BufReader<std::fs::File>,
    position: u64,
}

impl std::io::Read for Tracked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Tracked {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        if to == std::io::SeekFrom::Current(0) {
            return Ok(self.position);
        }
        self.position = self.inner.seek(to)?;
        Ok(self.position)
    }
}

/// An opened GGUF file: its metadata and tensor directory.
pub struct GgufFile {
    pub content: Content,
    pub path: std::path::PathBuf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut reader = Tracked {
            inner: std::io::BufReader::with_capacity(1 << 20, file),
            position: 0,
        };
        let content = Content::read(&mut reader).with_context(|| {
            format!(
                "{}: not a readable GGUF file (truncated or corrupt?)",
                path.display()
            )
        })?;
        Ok(GgufFile {
            content,
            path: path.to_path_buf(),
        })
    }

    /// Checks that every tensor's data lies inside the file (a truncated download is caught
    /// here, before any weight is read).
    pub fn check_extents(&self) -> Result<()> {
        let len = std::fs::metadata(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?
            .len();
        for (name, info) in &self.content.tensor_infos {
            let elems = info.shape.elem_count() as u64;
            let block = info.ggml_dtype.block_size() as u64;
            let bytes = elems / block.max(1) * info.ggml_dtype.type_size() as u64;
            let end = self.content.tensor_data_offset + info.offset + bytes;
            if end > len {
                bail!(
                    "{}: truncated: tensor `{name}` ends at byte {end}, the file has {len} (an interrupted download?)",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key)
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
    }

    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key)
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
    }

    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")
            .ok_or_else(|| anyhow!("{}: `general.architecture` is missing", self.path.display()))
    }

    fn required_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key)
            .ok_or_else(|| anyhow!("{}: metadata `{key}` is missing", self.path.display()))
    }

    fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
    }

    /// Quantisation types of the tensors and how many tensors have each.
    pub fn dtype_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            *counts.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
        }
        counts
    }

    /// The equivalent of an HF config.json, built from the metadata.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let arch = self.architecture()?;
        let model_type = match arch {
            "llama" | "qwen2" | "gemma3" => arch,
            other => bail!(
                "{}: GGUF architecture `{other}` is not supported (llama, qwen2, gemma3)",
                self.path.display()
            ),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let embed = self.tensor_dims("token_embd.weight").ok_or_else(|| {
            anyhow!(
                "{}: tensor `token_embd.weight` is missing",
                self.path.display()
            )
        })?;
        let mut config = json!({
            "model_type": if model_type == "gemma3" { "gemma3_text" } else { model_type },
            "hidden_size": self.required_u64(&key("embedding_length"))?,
            "intermediate_size": self.required_u64(&key("feed_forward_length"))?,
            "num_hidden_layers": self.required_u64(&key("block_count"))?,
            "num_attention_heads": self.required_u64(&key("attention.head_count"))?,
            "num_key_value_heads": self.meta_u64(&key("attention.head_count_kv")).or(self.meta_u64(&key("attention.head_count"))),
            "rms_norm_eps": self.meta_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "rope_theta": self.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            "vocab_size": embed[0],
            "tie_word_embeddings": self.tensor_dims("output.weight").is_none(),
        });
        if let Some(head_dim) = self.meta_u64(&key("attention.key_length")) {
            config["head_dim"] = json!(head_dim);
        }
        if model_type == "gemma3" {
            config["sliding_window"] = json!(self.meta_u64(&key("attention.sliding_window")));
            config["rope_local_base_freq"] = json!(10_000.0);
            if let Some(scalar) = self.meta_u64(&key("attention.key_length")) {
                config["query_pre_attn_scalar"] = json!(scalar);
            }
        }
        Ok(config)
    }

    /// The architecture's name and its query and key/value head counts (the un-permutation of
    /// llama-arch Q/K rows needs them).
    fn arch_and_heads(&self) -> Result<(String, usize, usize)> {
        let arch = self.architecture()?.to_string();
        let heads = self.required_u64(&format!("{arch}.attention.head_count"))? as usize;
        let kv_heads = self
            .meta_u64(&format!("{arch}.attention.head_count_kv"))
            .map_or(heads, |v| v as usize);
        Ok((arch, heads, kv_heads))
    }

    /// Every tensor under its HF name, read and de-quantised to f32 when first asked for (each
    /// from the file at that moment), so that a model's f32 weights need not all exist at once.
    pub fn lazy_tensors(&self, device: &Device) -> Result<HashMap<String, LazyTensor>> {
        let (arch, heads, kv_heads) = self.arch_and_heads()?;
        let file = Arc::new(Mutex::new(
            std::fs::File::open(&self.path)
                .with_context(|| format!("{}: cannot open", self.path.display()))?,
        ));
        let data_offset = self.content.tensor_data_offset;
        let mut lazy: HashMap<String, LazyTensor> = HashMap::new();
        for (name, info) in &self.content.tensor_infos {
            let Some(hf_name) = hf_name(name, &arch) else {
                continue;
            };
            let info = TensorInfo {
                ggml_dtype: info.ggml_dtype,
                shape: info.shape.clone(),
                offset: info.offset,
            };
            let (file, device, path) = (file.clone(), device.clone(), self.path.clone());
            let (name, arch) = (name.clone(), arch.clone());
            lazy.insert(
                hf_name,
                Box::new(move || {
                    let q = {
                        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                        info.read(&mut *file, data_offset, &device)
                    }
                    .map_err(|e| {
                        candle_core::Error::Msg(format!(
                            "{}: reading tensor `{name}`: {e}",
                            path.display()
                        ))
                    })?;
                    let tensor = dequantize(&q, &device)?;
                    fix_layout(tensor, &name, &arch, (heads, kv_heads))
                }),
            );
        }
        Ok(lazy)
    }

    /// The token embeddings (HF name `model.embed_tokens.weight`) kept quantised, read now,
    /// where their type is read row by row ([`QuantRows`]); `None` otherwise.
    pub fn embedding_rows(&self) -> Result<Option<QuantRows>> {
        const NAME: &str = "token_embd.weight";
        if !self.content.tensor_infos.contains_key(NAME) {
            return Ok(None);
        }
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("{}: cannot open", self.path.display()))?;
        let q = self
            .content
            .tensor(&mut file, NAME, &Device::Cpu)
            .with_context(|| format!("{}: reading tensor `{NAME}`", self.path.display()))?;
        Ok(QuantRows::new(q))
    }

    /// Every tensor, de-quantised to f32 and renamed to HF names.
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let (arch, heads, kv_heads) = self.arch_and_heads()?;
        let mut file = std::fs::File::open(&self.path)?;
        let mut tensors = HashMap::new();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let Some(hf_name) = hf_name(name, &arch) else {
                continue;
            };
            let q = self
                .content
                .tensor(&mut file, name, device)
                .with_context(|| format!("{}: reading tensor `{name}`", self.path.display()))?;
            let tensor = fix_layout(dequantize(&q, device)?, name, &arch, (heads, kv_heads))?;
            tensors.insert(hf_name, tensor);
        }
        Ok(tensors)
    }
}

/// A quantised matrix kept as it is stored, its rows de-quantised when read: a model's token
/// embeddings, of which a forward reads a few hundred rows (Qwen2.5-1.5B's de-quantised table
/// is 0.93 GB of f32). The values of a row are those of the whole table de-quantised.
pub struct QuantRows {
    q: QTensor,
    rows: usize,
    cols: usize,
}

impl QuantRows {
    /// `q` [rows, cols] on the CPU whose rows are whole blocks of a type de-quantised block by
    /// block (the k-quants and the legacy 4-, 5- and 8-bit types); else `None`.
    pub fn new(q: QTensor) -> Option<QuantRows> {
        let (rows, cols) = q.shape().dims2().ok()?;
        let block = q.dtype().block_size();
        let supported = rows_of(&q, &[], &mut []).is_ok();
        let whole = q
            .data()
            .is_ok_and(|d| d.len() == rows * cols / block * q.dtype().type_size());
        (supported && whole && cols.is_multiple_of(block)).then_some(QuantRows { q, rows, cols })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Rows `ids` de-quantised into `out` (ids.len() x cols values), side by side on the
    /// worker threads.
    pub fn read(&self, ids: &[u32], out: &mut [f32]) -> candle_core::Result<()> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {}", self.rows);
        }
        rows_of(&self.q, ids, out)
    }

    /// The whole matrix de-quantised (the head of a tied model asks for it at its first
    /// logits).
    pub fn dense(&self, device: &Device) -> candle_core::Result<Tensor> {
        dequantize(&self.q, device)
    }
}

/// `$f::<T>($args)` with the block type T of `$dtype` (the k-quants and the legacy 4-, 5-
/// and 8-bit types: those de-quantised block by block), else `$other`.
macro_rules! by_block_type {
    ($dtype:expr, $f:ident($($arg:expr),*), $other:pat => $fallback:expr) => {{
        use candle_core::quantized::k_quants::*;
        use candle_core::quantized::GgmlDType as G;
        match $dtype {
            G::Q4_0 => $f::<BlockQ4_0>($($arg),*),
            G::Q4_1 => $f::<BlockQ4_1>($($arg),*),
            G::Q5_0 => $f::<BlockQ5_0>($($arg),*),
            G::Q5_1 => $f::<BlockQ5_1>($($arg),*),
            G::Q8_0 => $f::<BlockQ8_0>($($arg),*),
            G::Q2K => $f::<BlockQ2K>($($arg),*),
            G::Q3K => $f::<BlockQ3K>($($arg),*),
            G::Q4K => $f::<BlockQ4K>($($arg),*),
            G::Q5K => $f::<BlockQ5K>($($arg),*),
            G::Q6K => $f::<BlockQ6K>($($arg),*),
            $other => $fallback,
        }
    }};
}

/// [`QuantRows::read`] for the block type of `q` (an error for other types, or bytes that are
/// not the blocks' storage).
fn rows_of(q: &QTensor, ids: &[u32], out: &mut [f32]) -> candle_core::Result<()> {
    fn typed<T: candle_core::quantized::k_quants::GgmlType + Sync>(
        q: &QTensor,
        ids: &[u32],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let data = q.data()?;
        let Some(blocks) = as_blocks::<T>(&data) else {
            candle_core::bail!("quantised blocks not aligned");
        };
        let cols = q.shape().dims().last().copied().unwrap_or(0);
        let per_row = cols / T::BLCK_SIZE;
        out.par_chunks_mut(cols.max(1) * 16)
            .zip(ids.par_chunks(16))
            .for_each(|(ys, ids)| {
                for (y, &i) in ys.chunks_mut(cols).zip(ids) {
                    let i = i as usize;
                    T::to_float(&blocks[i * per_row..(i + 1) * per_row], y);
                }
            });
        Ok(())
    }
    by_block_type!(q.dtype(), typed(q, ids, out), other => {
        candle_core::bail!("{other:?} rows are not read one by one")
    })
}

/// `data` (a quantised tensor's storage) as the blocks of type T it holds, if it is aligned
/// for T (whole blocks: any bytes past the last are not read).
fn as_blocks<T>(data: &[u8]) -> Option<&[T]> {
    if !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return None;
    }
    let count = data.len() / std::mem::size_of::<T>();
    // SAFETY: aligned for T (checked above), `count` whole blocks within `data`, which the
    // returned slice borrows; the storage is a Vec<T> of k-quant or legacy blocks (plain data).
    Some(unsafe { std::slice::from_raw_parts(data.as_ptr() as *const T, count) })
}

/// Blocks of a quantised tensor de-quantised per task by [`dequantize`] (~256 K values).
const DEQUANTIZE_BLOCKS: usize = 1024;

/// A GGUF tensor de-quantised to f32: on the CPU, its blocks split among the worker threads
/// (each block is de-quantised on its own by candle's `to_float`, so the values are those of
/// `QTensor::dequantize`, which runs on one thread and zero-fills the buffer first); other
/// devices and types use candle's own.
fn dequantize(q: &QTensor, device: &Device) -> candle_core::Result<Tensor> {
    fn blocks<T: candle_core::quantized::k_quants::GgmlType + Sync>(
        q: &QTensor,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = q.data()?;
        let n = q.shape().elem_count();
        let Some(blocks) = as_blocks::<T>(&data).filter(|b| b.len() * T::BLCK_SIZE == n) else {
            return q.dequantize(device);
        };
        let mut out: Vec<f32> = Vec::with_capacity(n);
        let chunk = DEQUANTIZE_BLOCKS * T::BLCK_SIZE;
        // Each task's values set to zero (`to_float` takes initialised values) and de-quantised
        // right after, while they are in its cache: one pass over the memory instead of two.
        out.spare_capacity_mut()
            .par_chunks_mut(chunk)
            .zip(blocks.par_chunks(DEQUANTIZE_BLOCKS))
            .for_each(|(ys, xs)| {
                ys.iter_mut().for_each(|v| _ = v.write(0.0));
                // SAFETY: every value of `ys` was written just above.
                let ys = unsafe { &mut *(ys as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                T::to_float(xs, ys);
            });
        // SAFETY: all n values were written above (the chunks cover the n values).
        unsafe { out.set_len(n) };
        Tensor::from_vec(out, q.shape(), device)
    }
    if !device.is_cpu() {
        return q.dequantize(device);
    }
    by_block_type!(q.dtype(), blocks(q, device), _ => q.dequantize(device))
}

/// A de-quantised GGUF tensor in the HF layout: llama-arch Q/K rows un-permuted, Gemma's norm
/// scales back to w (llama.cpp stores 1 + w).
fn fix_layout(
    tensor: Tensor,
    name: &str,
    arch: &str,
    (heads, kv_heads): (usize, usize),
) -> candle_core::Result<Tensor> {
    Ok(if arch == "llama" && name.ends_with("attn_q.weight") {
        unpermute_rope(&tensor, heads)?
    } else if arch == "llama" && name.ends_with("attn_k.weight") {
        unpermute_rope(&tensor, kv_heads)?
    } else if arch == "gemma3" && name.ends_with("norm.weight") {
        (tensor - 1.0)?
    } else {
        tensor
    })
}

/// llama.cpp's converter reorders each head's rows of Q and K for interleaved RoPE:
/// w.reshape(h, 2, d / 2, in).swapaxes(1, 2). This undoes it: reshape(h, d / 2, 2, in).swapaxes(1, 2).
pub fn unpermute_rope(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, input) = w.dims2()?;
    let half = out / heads / 2;
    w.reshape((heads, half, 2, input))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, input))
}

/// The HF name of a GGUF tensor (`None` for tensors we do not use, such as `rope_freqs`).
pub fn hf_name(gguf: &str, arch: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" if arch == "gemma3" => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

#[cfg(test)]
mod dequantize_tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// The split de-quantisation gives candle's values bit for bit, for every block type the
    /// fetched models use and more, on tensors of several tasks' worth of blocks.
    #[test]
    fn parallel_dequantization_equals_candles() {
        let n = 3 * DEQUANTIZE_BLOCKS * 256 + 512;
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 2.0).collect();
        let t = Tensor::from_vec(values, (n / 512, 512), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let ours = dequantize(&q, &Device::Cpu).unwrap();
            let theirs = q.dequantize(&Device::Cpu).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert!(bits(&ours) == bits(&theirs), "{dtype:?}");
        }
    }
    /// Rows read one by one from the quantised blocks equal those rows of the whole table
    /// de-quantised (candle's values), bit for bit; ids outside the table and types that are
    /// not read by rows are refused.
    #[test]
    fn quantised_rows_equal_the_rows_of_the_whole_table() {
        let (rows, cols) = (40, 512);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32) * 0.61).cos() * 3.0)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let ids: Vec<u32> = (0..37).map(|i| (i * 7 + 3) % rows as u32).collect();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let whole = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let table = QuantRows::new(q).expect("read by rows");
            assert_eq!(table.dims(), (rows, cols));
            let mut out = vec![f32::NAN; ids.len() * cols];
            table.read(&ids, &mut out).unwrap();
            for (row, &id) in out.chunks(cols).zip(&ids) {
                let want = &whole[id as usize];
                assert!(
                    row.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?} row {id}"
                );
            }
            let err = table
                .read(&[3, rows as u32], &mut out[..2 * cols])
                .unwrap_err();
            assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        }
        // F16 is not read by blocks; a legacy type reads rows of any multiple of its 32.
        assert!(QuantRows::new(QTensor::quantize(&t, GgmlDType::F16).unwrap()).is_none());
        let narrow = Tensor::zeros((4, 96), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&narrow, GgmlDType::Q8_0).unwrap();
        assert!(QuantRows::new(q).is_some());
    }
}
