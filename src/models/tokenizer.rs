//! Tokenizers: HF `tokenizer.json` files, or built from GGUF metadata.
//!
//! GGUF files carry the vocabulary, merges and special tokens but not the pre-processing, which
//! llama.cpp names by `tokenizer.ggml.pre`. We rebuild the pipeline of the original tokenizer:
//! - `qwen2`: NFC, then Qwen2's split regex (isolated), then byte-level mapping;
//! - `smollm`: every digit on its own, then GPT-2's byte-level regex;
//! - `gpt2` / `default` with a BPE vocabulary: GPT-2's byte-level regex;
//! - SentencePiece vocabularies (`tokenizer.ggml.model = llama`, e.g. Gemma): spaces become `▁`,
//!   BPE with byte fallback over merges derived from the vocabulary order.

use super::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashSet;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

/// Qwen2's pre-tokenizer regex (as published in its tokenizer.json).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the ids a model needs for decoding.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    /// Whether the model expects a BOS token before the text.
    pub add_bos: bool,
    /// Whether `tokenizer.json`'s post-processor adds the special tokens ([CLS]/[SEP], BOS) itself;
    /// otherwise (GGUF) we add BOS.
    pub post_processor_adds_specials: bool,
    pub description: String,
}

impl Tokenizer {
    /// Token ids of `text` as the model expects its input: with BOS (decoders that want one) or
    /// [CLS] ... [SEP] (BERT), as tokenizer.json's post-processor or the GGUF metadata say.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.post_processor_adds_specials {
            let encoding = self
                .inner
                .encode(text, true)
                .map_err(|e| anyhow!("tokenizing: {e}"))?;
            return Ok(encoding.get_ids().to_vec());
        }
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` alone (no BOS), e.g. for a continuation.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A `tokenizer.json` file; special ids from the `config.json` / `tokenizer_config.json` beside it.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        // Some tokenizer.json files pad every text to a fixed length (all-MiniLM-L6-v2: 128 [PAD]
        // tokens). We pad batches ourselves, with a mask; padded ids would count as real tokens.
        inner.with_padding(None);
        let read_json = |name: &str| -> Option<serde_json::Value> {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
        };
        let config = read_json("config.json").unwrap_or_default();
        let tok_config = read_json("tokenizer_config.json").unwrap_or_default();
        let id_of = |key: &str| -> Option<u32> {
            config
                .get(format!("{key}_token_id"))
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .or_else(|| {
                    let token = tok_config.get(format!("{key}_token"))?;
                    let text = token
                        .as_str()
                        .or_else(|| token.get("content").and_then(|c| c.as_str()))?;
                    inner.token_to_id(text)
                })
        };
        let add_bos = tok_config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Tokenizer {
            bos_id: id_of("bos"),
            eos_ids: id_of("eos").into_iter().collect(),
            pad_id: id_of("pad"),
            add_bos,
            post_processor_adds_specials: true,
            description: format!("tokenizer.json ({} tokens)", inner.get_vocab_size(true)),
            inner,
        })
    }

    /// Built from GGUF metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let source = file.path.display().to_string();
        let model = file.meta_str("tokenizer.ggml.model").ok_or_else(|| {
            anyhow!("{source}: no tokenizer in the GGUF metadata (`tokenizer.ggml.model`)")
        })?;
        let tokens = string_array(file, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match file.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let pre = file.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let mut inner = match model {
            "gpt2" => {
                let merges = string_array(file, "tokenizer.ggml.merges")?;
                byte_level_bpe(&tokens, &merges, pre).with_context(|| source.clone())?
            }
            "llama" => sentencepiece_bpe(&tokens, &types).with_context(|| source.clone())?,
            other => bail!("{source}: tokenizer model `{other}` is not supported (gpt2, llama)"),
        };
        // Control (3) and user-defined (4) tokens are matched whole, never split.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || (t == 4 && model == "gpt2"))
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow!("{source}: adding special tokens: {e}"))?;
        let id = |key: &str| file.meta_u64(key).map(|v| v as u32);
        let add_bos = file
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        Ok(Tokenizer {
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            add_bos,
            post_processor_adds_specials: false,
            description: format!(
                "GGUF {model} tokenizer (pre: {pre}, {} tokens)",
                tokens.len()
            ),
            inner,
        })
    }
}

fn string_array(file: &GgufFile, key: &str) -> Result<Vec<String>> {
    match file.meta(key) {
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| anyhow!("{key}: {e}")))
            .collect(),
        _ => bail!(
            "{}: metadata `{key}` is missing or not an array",
            file.path.display()
        ),
    }
}

fn byte_level_bpe(
    tokens: &[String],
    merges: &[String],
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("merge `{m}` is not two tokens separated by a space"))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("building BPE: {e}"))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let byte_level_regex = ByteLevel::new(false, true, true);
    let (normalizer, pre_tokenizer): (Option<NormalizerWrapper>, PreTokenizerWrapper) = match pre {
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_PATTERN.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("{e}"))?;
            let steps = vec![split.into(), ByteLevel::new(false, false, false).into()];
            (Some(NFC.into()), Sequence::new(steps).into())
        }
        "smollm" => {
            let steps = vec![Digits::new(true).into(), byte_level_regex.into()];
            (None, Sequence::new(steps).into())
        }
        "gpt2" | "default" => (None, byte_level_regex.into()),
        other => bail!("pre-tokenizer `{other}` is not supported (qwen2, smollm, gpt2, default)"),
    };
    if let Some(normalizer) = normalizer {
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| anyhow!("{e}"))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(DecoderWrapper::from(ByteLevel::default())));
    Ok(tokenizer)
}

/// SentencePiece BPE (Gemma): `▁` marks spaces; unknown bytes fall back to `<0xNN>` tokens; merges
/// are every split of a vocabulary token into two vocabulary tokens, ranked by the vocabulary
/// order of the merged token.
fn sentencepiece_bpe(tokens: &[String], types: &[i64]) -> Result<tokenizers::Tokenizer> {
    let pieces: Vec<String> = tokens.iter().map(|t| t.replace(' ', "▁")).collect();
    let vocab: Vocab = pieces
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mergeable: HashSet<&str> = pieces
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == 1 || t == 4)
        .map(|(p, _)| p.as_str())
        .collect();
    let mut merges = Vec::new();
    for (piece, &kind) in pieces.iter().zip(types) {
        if kind != 1 && kind != 4 {
            continue;
        }
        let mut local: Vec<(u32, u32, String, String)> = Vec::new();
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if mergeable.contains(left) && mergeable.contains(right) {
                local.push((
                    vocab[left],
                    vocab[right],
                    left.to_string(),
                    right.to_string(),
                ));
            }
        }
        local.sort();
        merges.extend(local.into_iter().map(|(_, _, l, r)| (l, r)));
    }
    let unk = tokens
        .iter()
        .position(|t| t == "<unk>")
        .map(|i| pieces[i].clone());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| anyhow!("building BPE: {e}"))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerWrapper::from(
            Replace::new(" ", "▁").map_err(|e| anyhow!("{e}"))?,
        )))
        .map_err(|e| anyhow!("{e}"))?;
    let split = Split::new(
        SplitPattern::String(" ".into()),
        SplitDelimiterBehavior::MergedWithPrevious,
        false,
    )
    .map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::from(split)));
    let decoders: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            Replace::new("▁", " ").map_err(|e| anyhow!("{e}"))?,
        ),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    tokenizer.with_decoder(Some(DecoderWrapper::from(DecoderSequence::new(decoders))));
    Ok(tokenizer)
}
