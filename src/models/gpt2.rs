//! GPT-2 (Radford et al. 2019), the classic weak model of the weak-to-strong literature.
//!
//! Learned absolute positions; pre-LayerNorm blocks; fused q/k/v projection `c_attn`; Conv1D
//! weights stored [in, out]; GELU with the tanh approximation (`gelu_new`); LM head tied to the
//! token embeddings. Checkpoint names with or without the `transformer.` prefix both load.

use super::cache::KvCache;
use super::config::ConfigJson;
use super::nn::{self, LayerNorm, Linear};
use super::params::Params;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Gpt2Config {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub inner_size: usize,
    pub max_positions: usize,
    pub vocab_size: usize,
    pub layer_norm_eps: f64,
}

impl Gpt2Config {
    pub fn from_json(c: &ConfigJson) -> Result<Self> {
        let hidden_size = c.count("n_embd")?;
        let (num_heads, _, _) = c.attention("n_embd", "n_head", None, None)?;
        let activation = c.str_or("activation_function", "gelu_new");
        if activation != "gelu_new" {
            bail!(
                "{}: activation_function `{activation}` is not supported (gelu_new only)",
                c.source
            );
        }
        Ok(Gpt2Config {
            hidden_size,
            num_layers: c.count("n_layer")?,
            num_heads,
            inner_size: c.usize_or("n_inner", 4 * hidden_size)?,
            max_positions: c.count("n_positions")?,
            vocab_size: c.count("vocab_size")?,
            layer_norm_eps: c.f64_or("layer_norm_epsilon", 1e-5)?,
        })
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_c_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub config: Gpt2Config,
    wte: Tensor,
    pub(crate) head: nn::Head,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt2 {
    pub fn load(config: Gpt2Config, params: &mut Params) -> Result<Self> {
        let c = &config;
        let root = if params.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let h = c.hidden_size;
        let wte = params.weight(&format!("{root}wte.weight"), &[c.vocab_size, h])?;
        let wpe = params.weight(&format!("{root}wpe.weight"), &[c.max_positions, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("{root}h.{i}");
            blocks.push(Block {
                ln_1: LayerNorm::load(params, &format!("{p}.ln_1"), h, c.layer_norm_eps)?,
                c_attn: params.conv1d(&format!("{p}.attn.c_attn"), h, 3 * h)?,
                attn_c_proj: params.conv1d(&format!("{p}.attn.c_proj"), h, h)?,
                ln_2: LayerNorm::load(params, &format!("{p}.ln_2"), h, c.layer_norm_eps)?,
                c_fc: params.conv1d(&format!("{p}.mlp.c_fc"), h, c.inner_size)?,
                mlp_c_proj: params.conv1d(&format!("{p}.mlp.c_proj"), c.inner_size, h)?,
            });
        }
        let ln_f = LayerNorm::load(params, &format!("{root}ln_f"), h, c.layer_norm_eps)?;
        Ok(Gpt2 {
            config,
            head: nn::Head::new(wte.clone()),
            wte,
            wpe,
            blocks,
            ln_f,
        })
    }

    /// Final hidden states (after `ln_f`) of the new tokens; see [`super::llama::Llama::forward`].
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let device = ids.device();
        let (b, t) = ids.dims2()?;
        let (full_mask, positions) = cache.extend(mask, t);
        let positions: Vec<u32> = positions.into_iter().flatten().collect();
        if let Some(&p) = positions
            .iter()
            .max()
            .filter(|&&p| p as usize >= c.max_positions)
        {
            bail!(
                "position {p} is beyond GPT-2's {} positions",
                c.max_positions
            );
        }
        let positions = Tensor::from_vec(positions, b * t, device)?;
        let pos_embed = self
            .wpe
            .index_select(&positions, 0)?
            .reshape((b, t, c.hidden_size))?;
        let mut x = (nn::embed(&self.wte, ids)? + pos_embed)?;
        let attn_mask = nn::additive_mask(&full_mask, t, true, None, device)?;
        let head_dim = c.hidden_size / c.num_heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let last = self.blocks.len().saturating_sub(1);
        for (i, block) in self.blocks.iter().enumerate() {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?;
            let part = |j: usize| qkv.narrow(D::Minus1, j * c.hidden_size, c.hidden_size);
            let q = nn::split_heads(&part(0)?, c.num_heads, head_dim)?;
            let k = nn::split_heads(&part(1)?, c.num_heads, head_dim)?;
            let v = nn::split_heads(&part(2)?, c.num_heads, head_dim)?;
            let (k, v) = cache.update(i, &k, &v, 2)?;
            let attn = nn::attention(&q, &k, &v, &attn_mask, scale)?;
            let (attn, residual) = nn::kept_positions(attn, x, keep.filter(|_| i == last))?;
            x = (residual + block.attn_c_proj.forward(&attn)?)?;
            let m = block.c_fc.forward(&block.ln_2.forward(&x)?)?.gelu()?;
            x = (x + block.mlp_c_proj.forward(&m)?)?;
        }
        Ok(self.ln_f.forward(&x)?)
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.head.logits(hidden)?)
    }

    /// Packs every projection and the (tied) head for `precision` (or unpacks them: f32).
    pub fn set_precision(&mut self, precision: crate::ops::Precision) -> Result<()> {
        let layers = self.blocks.iter_mut().flat_map(|b| {
            [
                &mut b.c_attn,
                &mut b.attn_c_proj,
                &mut b.c_fc,
                &mut b.mlp_c_proj,
            ]
        });
        Ok(nn::set_precision_all(
            precision,
            layers,
            Some(&mut self.head),
        )?)
    }
}
