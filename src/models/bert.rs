//! BERT-family encoders (all-MiniLM-L6-v2 and other sentence-transformers BERT checkpoints).
//!
//! Post-LayerNorm blocks: a = LN(x + o(attn(x))), out = LN(a + down(gelu(up(a)))), bidirectional
//! attention with a key-padding mask, absolute learned positions, token type 0. Checkpoint names
//! with or without the `bert.` prefix both load.

use super::config::ConfigJson;
use super::nn::{self, LayerNorm, Linear};
use super::params::Params;
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub vocab_size: usize,
    pub layer_norm_eps: f64,
}

impl BertConfig {
    pub fn from_json(c: &ConfigJson) -> Result<Self> {
        let activation = c.str_or("hidden_act", "gelu");
        if activation != "gelu" {
            bail!(
                "{}: hidden_act `{activation}` is not supported (gelu only)",
                c.source
            );
        }
        let embedding_type = c.str_or("position_embedding_type", "absolute");
        if embedding_type != "absolute" {
            bail!(
                "{}: position_embedding_type `{embedding_type}` is not supported",
                c.source
            );
        }
        let (num_heads, _, _) = c.attention("hidden_size", "num_attention_heads", None, None)?;
        Ok(BertConfig {
            hidden_size: c.count("hidden_size")?,
            num_layers: c.count("num_hidden_layers")?,
            num_heads,
            intermediate_size: c.count("intermediate_size")?,
            max_positions: c.count("max_position_embeddings")?,
            type_vocab_size: c.usize_or("type_vocab_size", 2)?,
            vocab_size: c.count("vocab_size")?,
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-12)?,
        })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output_dense: Linear,
    attention_output_layer_norm: LayerNorm,
    intermediate_dense: Linear,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
}

impl Layer {
    /// The whole layer as one op ([`crate::ops::encoder::post_norm_layer`]) when no projection
    /// has an adapter and the op supports the device and dtype; `None` otherwise.
    fn fused(&self, x: &Tensor, mask: &Tensor, c: &BertConfig) -> Result<Option<Tensor>> {
        let linears = [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output_dense,
            &self.intermediate_dense,
            &self.output_dense,
        ];
        if linears.iter().any(|l| l.is_packed()) {
            return Ok(None);
        }
        let biases: Option<Vec<&Tensor>> = linears
            .iter()
            .map(|l| l.bias.as_ref().filter(|_| l.lora.is_none()))
            .collect();
        let Some(b) = biases else {
            return Ok(None);
        };
        let params = crate::ops::encoder::PostNormParams {
            query: (&self.query.weight, b[0]),
            key: (&self.key.weight, b[1]),
            value: (&self.value.weight, b[2]),
            attn_out: (&self.attention_output_dense.weight, b[3]),
            attn_norm: (
                &self.attention_output_layer_norm.weight,
                &self.attention_output_layer_norm.bias,
            ),
            up: (&self.intermediate_dense.weight, b[4]),
            down: (&self.output_dense.weight, b[5]),
            out_norm: (&self.output_layer_norm.weight, &self.output_layer_norm.bias),
        };
        Ok(crate::ops::encoder::post_norm_layer(
            x,
            &params,
            mask,
            c.num_heads,
            c.layer_norm_eps,
        )?)
    }
}

#[derive(Debug, Clone)]
pub struct Bert {
    pub config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_layer_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    pub fn load(config: BertConfig, params: &mut Params) -> Result<Self> {
        let c = &config;
        let root = if params.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let e = format!("{root}embeddings");
        let word_embeddings =
            params.weight(&format!("{e}.word_embeddings.weight"), &[c.vocab_size, h])?;
        let position_embeddings = params.weight(
            &format!("{e}.position_embeddings.weight"),
            &[c.max_positions, h],
        )?;
        let token_type_embeddings = params.weight(
            &format!("{e}.token_type_embeddings.weight"),
            &[c.type_vocab_size, h],
        )?;
        let embeddings_layer_norm = LayerNorm::load(params, &format!("{e}.LayerNorm"), h, eps)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("{root}encoder.layer.{i}");
            layers.push(Layer {
                query: params.linear(&format!("{p}.attention.self.query"), h, h, true)?,
                key: params.linear(&format!("{p}.attention.self.key"), h, h, true)?,
                value: params.linear(&format!("{p}.attention.self.value"), h, h, true)?,
                attention_output_dense: params.linear(
                    &format!("{p}.attention.output.dense"),
                    h,
                    h,
                    true,
                )?,
                attention_output_layer_norm: LayerNorm::load(
                    params,
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    eps,
                )?,
                intermediate_dense: params.linear(
                    &format!("{p}.intermediate.dense"),
                    h,
                    c.intermediate_size,
                    true,
                )?,
                output_dense: params.linear(
                    &format!("{p}.output.dense"),
                    c.intermediate_size,
                    h,
                    true,
                )?,
                output_layer_norm: LayerNorm::load(
                    params,
                    &format!("{p}.output.LayerNorm"),
                    h,
                    eps,
                )?,
            });
        }
        Ok(Bert {
            config,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_layer_norm,
            layers,
        })
    }

    /// Last hidden states [B, T, H] of `ids` [B, T] with 0/1 `mask` rows (right padding); with
    /// `keep` (N indices into the B x T positions), those positions alone, [1, N, H]: the last
    /// layer's work after attention runs for them only.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &[Vec<u32>],
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let device = ids.device();
        let (_, t) = ids.dims2()?;
        if t > c.max_positions {
            bail!(
                "input of {t} tokens is longer than BERT's {} positions",
                c.max_positions
            );
        }
        let positions = Tensor::arange(0u32, t as u32, device)?;
        let pos = self
            .position_embeddings
            .index_select(&positions, 0)?
            .unsqueeze(0)?;
        let token_type = self.token_type_embeddings.narrow(0, 0, 1)?.unsqueeze(0)?;
        let x = nn::embed(&self.word_embeddings, ids)?
            .broadcast_add(&pos)?
            .broadcast_add(&token_type)?;
        let mut x = self.embeddings_layer_norm.forward(&x)?;
        let attn_mask = nn::additive_mask(mask, t, false, None, device)?;
        let scale = 1.0 / ((c.hidden_size / c.num_heads) as f64).sqrt();
        let last = self.layers.len().saturating_sub(1);
        // x already rotated and quantized for the next layer's projections (int8: made by the
        // tasks of the previous layer's down projection).
        let mut x_rows = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let keep = keep.filter(|_| i == last);
            // The fused layer computes every position.
            let fused = match keep {
                None => layer.fused(&x, &attn_mask, c)?,
                Some(_) => None,
            };
            if let Some(y) = fused {
                x = y;
                x_rows = None;
                continue;
            }
            let attention = [&layer.query, &layer.key, &layer.value];
            let quantized = match keep {
                None => nn::int8_self_attention(
                    &x,
                    x_rows.take(),
                    attention,
                    &attn_mask,
                    c.num_heads,
                    scale,
                )?,
                Some(_) => None,
            };
            let dense = &layer.attention_output_dense;
            let norm = &layer.attention_output_layer_norm;
            let (a, a_rows) = match (quantized, dense.int8()) {
                // The attention's output already quantized for its projection, whose tasks add
                // the residual and norm their rows, quantized for the up projection too.
                (Some(attn), Some(w)) => {
                    norm.after_int8(&attn, (w, dense.bias.as_ref()), &x, true)?
                }
                _ => {
                    let [q, k, v] = nn::project_shared(&x, attention)?;
                    let attn = crate::ops::attention::attention(
                        &q,
                        &k,
                        &v,
                        &attn_mask,
                        (c.num_heads, c.num_heads),
                        scale,
                    )?;
                    let (attn, residual) = nn::kept_positions(attn, x, keep)?;
                    (norm.forward_after(dense, &attn, &residual)?, None)
                }
            };
            (x, x_rows) = nn::gelu_mlp_norm(
                &a,
                a_rows,
                (&layer.intermediate_dense, &layer.output_dense),
                &layer.output_layer_norm,
                i != last,
            )?;
        }
        Ok(x)
    }

    /// Packs every projection for `precision` (or unpacks them: f32).
    pub fn set_precision(&mut self, precision: crate::ops::Precision) -> Result<()> {
        let layers = self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attention_output_dense,
                &mut l.intermediate_dense,
                &mut l.output_dense,
            ]
        });
        Ok(nn::set_precision_all(precision, layers, None)?)
    }
}
