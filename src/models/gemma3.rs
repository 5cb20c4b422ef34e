//! Gemma 3 text decoders (Gemma-3-270M and larger text stacks).
//!
//! Differences from Llama: embeddings scaled by sqrt(hidden); RMSNorm scales by (1 + w); four
//! norms per block (before and after attention and MLP); RMSNorm on each query and key head
//! before RoPE; attention scale query_pre_attn_scalar^-1/2; GELU (tanh) gated MLP; sliding-window
//! layers (window w: a query sees the w most recent keys, itself included) with their own RoPE base,
//! and full-attention layers every `sliding_window_pattern`-th layer (or as `layer_types` says).

use super::cache::KvCache;
use super::config::ConfigJson;
use super::nn::{self, Linear, RmsNorm, Rope};
use super::params::Params;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Gemma3Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: usize,
    /// Per layer: true for sliding-window attention.
    pub sliding: Vec<bool>,
    pub rope_theta_global: f64,
    pub rope_theta_local: f64,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
}

impl Gemma3Config {
    pub fn from_json(c: &ConfigJson) -> Result<Self> {
        let activation = c.str_or("hidden_activation", "gelu_pytorch_tanh");
        if activation != "gelu_pytorch_tanh" {
            bail!(
                "{}: hidden_activation `{activation}` is not supported",
                c.source
            );
        }
        if c.opt_f64("attn_logit_softcapping").is_some() {
            bail!(
                "{}: attention logit soft-capping is not supported",
                c.source
            );
        }
        for section in ["rope_scaling", "rope_parameters"] {
            if let Some(Value::Object(map)) = c.value.get(section) {
                for (kind, inner) in map {
                    let kind_type = inner
                        .get("rope_type")
                        .and_then(Value::as_str)
                        .unwrap_or("default");
                    if inner.is_object() && kind_type != "default" {
                        bail!(
                            "{}: RoPE scaling `{kind_type}` for {kind} is not supported",
                            c.source
                        );
                    }
                }
            }
        }
        let num_layers = c.count("num_hidden_layers")?;
        let sliding: Vec<bool> = match c.value.get("layer_types").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect(),
            None => {
                let pattern = c.usize_or("sliding_window_pattern", 6)?;
                (0..num_layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        if sliding.len() != num_layers {
            bail!(
                "{}: `layer_types` has {} entries for {num_layers} layers",
                c.source,
                sliding.len()
            );
        }
        let (num_heads, num_kv_heads, head_dim) = c.attention(
            "hidden_size",
            "num_attention_heads",
            Some(("num_key_value_heads", Some(1))),
            Some(256),
        )?;
        Ok(Gemma3Config {
            hidden_size: c.count("hidden_size")?,
            intermediate_size: c.count("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.count("vocab_size")?,
            rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
            query_pre_attn_scalar: c.f64_or("query_pre_attn_scalar", head_dim as f64)?,
            sliding_window: c.usize_or("sliding_window", 4096)?,
            sliding,
            rope_theta_global: c.rope_theta(Some("full_attention"), 1_000_000.0)?,
            rope_theta_local: match c
                .value
                .get("rope_parameters")
                .and_then(|p| p.get("sliding_attention"))
            {
                Some(section) => section
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(10_000.0),
                None => c.f64_or("rope_local_base_freq", 10_000.0)?,
            },
            final_logit_softcapping: c.opt_f64("final_logit_softcapping"),
            attn_logit_softcapping: None,
        })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Gemma3 {
    pub config: Gemma3Config,
    embed_tokens: std::sync::Arc<nn::Table>,
    pub(crate) head: nn::Head,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rope_global: Rope,
    rope_local: Rope,
}

impl Gemma3 {
    pub fn load(config: Gemma3Config, params: &mut Params) -> Result<Self> {
        let c = &config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let norm = |params: &mut Params, name: &str, dim: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: params.weight(name, &[dim])?,
                eps: c.rms_norm_eps,
                add_unit_offset: true,
            })
        };
        let embed =
            std::sync::Arc::new(params.table("model.embed_tokens.weight", &[c.vocab_size, h])?);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_layernorm: norm(params, &format!("{p}.input_layernorm.weight"), h)?,
                q_proj: params.linear(&format!("{p}.self_attn.q_proj"), h, q_dim, false)?,
                k_proj: params.linear(&format!("{p}.self_attn.k_proj"), h, kv_dim, false)?,
                v_proj: params.linear(&format!("{p}.self_attn.v_proj"), h, kv_dim, false)?,
                o_proj: params.linear(&format!("{p}.self_attn.o_proj"), q_dim, h, false)?,
                q_norm: norm(params, &format!("{p}.self_attn.q_norm.weight"), c.head_dim)?,
                k_norm: norm(params, &format!("{p}.self_attn.k_norm.weight"), c.head_dim)?,
                post_attention_layernorm: norm(
                    params,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                )?,
                pre_feedforward_layernorm: norm(
                    params,
                    &format!("{p}.pre_feedforward_layernorm.weight"),
                    h,
                )?,
                post_feedforward_layernorm: norm(
                    params,
                    &format!("{p}.post_feedforward_layernorm.weight"),
                    h,
                )?,
                gate_proj: params.linear(
                    &format!("{p}.mlp.gate_proj"),
                    h,
                    c.intermediate_size,
                    false,
                )?,
                up_proj: params.linear(
                    &format!("{p}.mlp.up_proj"),
                    h,
                    c.intermediate_size,
                    false,
                )?,
                down_proj: params.linear(
                    &format!("{p}.mlp.down_proj"),
                    c.intermediate_size,
                    h,
                    false,
                )?,
            });
        }
        let norm = norm(params, "model.norm.weight", h)?;
        Ok(Gemma3 {
            rope_global: Rope::new(c.head_dim, c.rope_theta_global),
            rope_local: Rope::new(c.head_dim, c.rope_theta_local),
            config,
            head: nn::Head::of(embed.clone()),
            embed_tokens: embed,
            layers,
            norm,
        })
    }

    /// Final hidden states of the new tokens; see [`super::llama::Llama::forward`].
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let device = ids.device();
        let (_, t) = ids.dims2()?;
        let (full_mask, positions) = cache.extend(mask, t);
        let positions = Tensor::new(positions, device)?;
        let global_tables = self.rope_global.tables(&positions)?;
        let local_tables = self.rope_local.tables(&positions)?;
        let global_mask = nn::additive_mask(&full_mask, t, true, None, device)?;
        let local_mask = nn::additive_mask(&full_mask, t, true, Some(c.sliding_window), device)?;
        let scale = 1.0 / c.query_pre_attn_scalar.sqrt();
        let embed_scale = (c.hidden_size as f32).sqrt() as f64;
        let mut x = (self.embed_tokens.embed(ids)? * embed_scale)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let ((cos, sin), attn_mask) = if c.sliding[i] {
                (&local_tables, &local_mask)
            } else {
                (&global_tables, &global_mask)
            };
            let n = layer.input_layernorm.forward(&x)?;
            // q and k are normed per head: RMSNorm over each head's D values, heads side by side.
            let (b, t, _) = n.dims3()?;
            let per_head = |norm: &nn::RmsNorm, x: Tensor, heads: usize| -> Result<Tensor> {
                Ok(norm
                    .forward(&x.reshape((b, t, heads, c.head_dim))?)?
                    .reshape((b, t, heads * c.head_dim))?)
            };
            let [q, k, v] = nn::project_shared(&n, [&layer.q_proj, &layer.k_proj, &layer.v_proj])?;
            let q = per_head(&layer.q_norm, q, c.num_heads)?;
            let k = per_head(&layer.k_norm, k, c.num_kv_heads)?;
            let attn = nn::rotary_gqa_attention(
                &q,
                &k,
                &v,
                (c.num_heads, c.num_kv_heads),
                (cos, sin),
                cache,
                i,
                attn_mask,
                scale,
            )?;
            let (attn, residual) = nn::kept_positions(attn, x, keep.filter(|_| i == last))?;
            x = (residual
                + layer
                    .post_attention_layernorm
                    .forward(&layer.o_proj.forward(&attn)?)?)?;
            let n = layer.pre_feedforward_layernorm.forward(&x)?;
            let mlp = nn::gated_mlp(
                &n,
                (&layer.gate_proj, &layer.up_proj, &layer.down_proj),
                crate::ops::activation::Gate::GeluTanh,
                None,
            )?;
            x = (x + layer.post_feedforward_layernorm.forward(&mlp)?)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.head.logits(hidden)?;
        Ok(match self.config.final_logit_softcapping {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// Packs every projection and the (tied) head for `precision` (or unpacks them: f32).
    pub fn set_precision(&mut self, precision: crate::ops::Precision) -> Result<()> {
        let layers = self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]
        });
        Ok(nn::set_precision_all(
            precision,
            layers,
            Some(&mut self.head),
        )?)
    }
}
