//! Llama-family decoders (SmolLM2, TinyLlama, Llama-2) and Qwen2, which is the same architecture
//! with biases on the q/k/v projections. Names follow HF transformers' `modeling_llama.py`.
//!
//! Block: h = x + o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x))); out = h + down(silu(gate(n2 h)) * up(n2 h)),
//! with RMSNorms n1, n2, grouped-query attention, causal + padding mask.

use super::cache::KvCache;
use super::config::ConfigJson;
use super::nn::{self, Linear, RmsNorm, Rope};
use super::params::Params;
use crate::ops::activation::Gate;
use crate::ops::int8::Epilogue;
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o (Llama with `attention_bias`).
    pub o_bias: bool,
}

impl LlamaConfig {
    pub fn from_json(c: &ConfigJson, qwen2: bool) -> Result<Self> {
        c.check_plain_rope()?;
        let (num_heads, num_kv_heads, head_dim) = c.attention(
            "hidden_size",
            "num_attention_heads",
            Some(("num_key_value_heads", None)),
            None,
        )?;
        let attention_bias = c.bool_or("attention_bias", false)?;
        Ok(LlamaConfig {
            hidden_size: c.count("hidden_size")?,
            intermediate_size: c.count("intermediate_size")?,
            num_layers: c.count("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.count("vocab_size")?,
            rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: c.rope_theta(None, 10_000.0)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
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
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Layer {
    /// The whole layer as one op ([`crate::ops::decoder::pre_norm_layer`]) when its base is
    /// frozen and adapters (without active dropout) sit on q and v only; `None` otherwise.
    fn fused(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Tensor,
        c: &LlamaConfig,
        scale: f64,
    ) -> Result<Option<crate::ops::decoder::PreNormOutput>> {
        use crate::ops::decoder::{pre_norm_layer, Adapter, PreNormParams};
        // A packed layer (int8, bf16x2) runs from its packed copy: the fused op, whose products
        // are f32, steps aside (with adapters on some layers, the others may be packed).
        let all = [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ];
        if all.iter().any(|l| l.is_packed()) {
            return Ok(None);
        }
        let others = [
            &self.k_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ];
        let plain_norms = [&self.input_layernorm, &self.post_attention_layernorm]
            .iter()
            .all(|n| !n.add_unit_offset && n.eps == self.input_layernorm.eps);
        if !plain_norms || others.iter().any(|l| l.lora.is_some()) {
            return Ok(None);
        }
        fn adapter(l: &Linear) -> Option<Option<Adapter<'_>>> {
            match &l.lora {
                None => Some(None),
                Some(lora) if !nn::dropout_active(lora.dropout) => Some(Some(Adapter {
                    a: &lora.a,
                    b: &lora.b,
                    scale: lora.scale,
                })),
                Some(_) => None,
            }
        }
        let (Some(q_lora), Some(v_lora)) = (adapter(&self.q_proj), adapter(&self.v_proj)) else {
            return Ok(None);
        };
        if [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .any(|l| l.bias.is_some())
        {
            return Ok(None);
        }
        // Trained through (an input or adapter with a gradient): the products read W^T, made
        // once per layer and kept (`WS2S_KEEP_TRANSPOSED=0`: not made, for less memory).
        let trained = x.track_op()
            || [q_lora, v_lora]
                .iter()
                .flatten()
                .any(|a| a.a.track_op() || a.b.track_op());
        let mut transposed = [None; 7];
        if trained && keep_transposed() {
            for (t, l) in transposed.iter_mut().zip(all) {
                *t = l.transposed()?;
            }
        }
        let params = PreNormParams {
            input_norm: &self.input_layernorm.weight,
            q: (&self.q_proj.weight, self.q_proj.bias.as_ref()),
            k: (&self.k_proj.weight, self.k_proj.bias.as_ref()),
            v: (&self.v_proj.weight, self.v_proj.bias.as_ref()),
            o: (&self.o_proj.weight, self.o_proj.bias.as_ref()),
            q_lora,
            v_lora,
            post_norm: &self.post_attention_layernorm.weight,
            gate: &self.gate_proj.weight,
            up: &self.up_proj.weight,
            down: &self.down_proj.weight,
            transposed,
        };
        Ok(pre_norm_layer(
            x,
            &params,
            rope,
            mask,
            (c.num_heads, c.num_kv_heads),
            self.input_layernorm.eps,
            scale,
        )?)
    }
}

/// Whether layers trained through keep their frozen projections' W^T: by default where gemm
/// runs its AVX-512 kernels (built with `gemm-avx512`, the CPU has AVX-512 and `WS2S_MAX_ISA`
/// allows it), where products from W^T are faster (Qwen2.5-0.5B LoRA step's forward 722
/// against 886 ms); with gemm's AVX2 kernels they are slower (987-996 against 1,136-1,159 ms,
/// docs/results/inference.md). `WS2S_KEEP_TRANSPOSED=0` / `1` decides instead (0 also saves
/// the memory).
fn keep_transposed() -> bool {
    static KEEP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEP.get_or_init(|| match std::env::var("WS2S_KEEP_TRANSPOSED").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => cfg!(feature = "gemm-avx512") && crate::ops::simd::has_avx512(),
    })
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: std::sync::Arc<nn::Table>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    pub(crate) lm_head: nn::Head,
    rope: Rope,
}

impl Llama {
    pub fn load(config: LlamaConfig, params: &mut Params) -> Result<Self> {
        let c = &config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let rms = |params: &mut Params, name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: params.weight(name, &[h])?,
                eps: c.rms_norm_eps,
                add_unit_offset: false,
            })
        };
        let embed =
            std::sync::Arc::new(params.table("model.embed_tokens.weight", &[c.vocab_size, h])?);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_layernorm: rms(params, &format!("{p}.input_layernorm.weight"))?,
                q_proj: params.linear(&format!("{p}.self_attn.q_proj"), h, q_dim, c.qkv_bias)?,
                k_proj: params.linear(&format!("{p}.self_attn.k_proj"), h, kv_dim, c.qkv_bias)?,
                v_proj: params.linear(&format!("{p}.self_attn.v_proj"), h, kv_dim, c.qkv_bias)?,
                o_proj: params.linear(&format!("{p}.self_attn.o_proj"), q_dim, h, c.o_bias)?,
                post_attention_layernorm: rms(
                    params,
                    &format!("{p}.post_attention_layernorm.weight"),
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
        let norm = rms(params, "model.norm.weight")?;
        let lm_head = if c.tie_word_embeddings || !params.contains("lm_head.weight") {
            nn::Head::of(embed.clone())
        } else {
            nn::Head::new(params.weight("lm_head.weight", &[c.vocab_size, h])?)
        };
        let rope = Rope::new(c.head_dim, c.rope_theta);
        Ok(Llama {
            config,
            embed_tokens: embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Final hidden states (after the last norm) of the new tokens `ids` [B, T], whose 0/1 mask
    /// rows are `mask`; earlier positions come from `cache`, which receives the new ones. With
    /// `keep` (N indices into the B x T positions), those positions alone, [1, N, H]: the last
    /// layer's work after attention runs for them only.
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
        // With nothing cached, a layer can run as one op (keys and values handed to the cache).
        let fresh = cache.is_empty();
        let (full_mask, positions) = cache.extend(mask, t);
        let positions = Tensor::new(positions, device)?;
        let (cos, sin) = self.rope.tables(&positions)?;
        let attn_mask = nn::additive_mask(&full_mask, t, true, None, device)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut x = self.embed_tokens.embed(ids)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let keep = keep.filter(|_| i == last);
            if fresh && keep.is_none() {
                let fused = layer.fused(&x, (&cos, &sin), &attn_mask, c, scale)?;
                if let Some(out) = fused {
                    cache.update(i, &out.k, &out.v, 1)?;
                    x = out.y;
                    continue;
                }
            }
            let n = layer.input_layernorm.forward(&x)?;
            let [q, k, v] = nn::project_shared(&n, [&layer.q_proj, &layer.k_proj, &layer.v_proj])?;
            let attn = nn::rotary_gqa_attention(
                &q,
                &k,
                &v,
                (c.num_heads, c.num_kv_heads),
                (&cos, &sin),
                cache,
                i,
                &attn_mask,
                scale,
            )?;
            let (attn, residual) = nn::kept_positions(attn, x, keep)?;
            x = layer.o_proj.forward_then(&attn, Epilogue::Add(&residual))?;
            let n = layer.post_attention_layernorm.forward(&x)?;
            x = nn::gated_mlp(
                &n,
                (&layer.gate_proj, &layer.up_proj, &layer.down_proj),
                Gate::Silu,
                Some(&x),
            )?;
        }
        Ok(self.norm.forward(&x)?)
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.logits(hidden)?)
    }

    /// Packs every frozen projection and the head for `precision` (or unpacks them: f32).
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
            Some(&mut self.lm_head),
        )?)
    }
}
