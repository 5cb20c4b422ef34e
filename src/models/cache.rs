//! Key/value cache for incremental decoding.

use candle_core::{Result, Tensor};

/// Per layer, the keys and values seen so far (after RoPE, before head repetition), in the
/// layout the model's attention reads, and the 0/1 mask of every position seen so far. Models
/// with rotary attention keep [B, T, KVH D] (what [`crate::ops::attention::attention`] takes:
/// no copy into heads and back per step), GPT-2 keeps [B, H, T, D]; [`KvCache::update`] is
/// told which dimension is time.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    mask: Vec<Vec<u32>>,
    /// Keep keys and values detached from the autograd graph. Decoding sets it: with trainable
    /// weights (LoRA), every cached tensor would otherwise hold the graph of every earlier step.
    pub detached: bool,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            mask: Vec::new(),
            detached: false,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the mask of new positions (one row per batch element) and returns the full mask.
    pub fn extend_mask(&mut self, new: &[Vec<u32>]) -> &[Vec<u32>] {
        if self.mask.is_empty() {
            self.mask = new.to_vec();
        } else {
            for (row, extra) in self.mask.iter_mut().zip(new) {
                row.extend_from_slice(extra);
            }
        }
        &self.mask
    }

    /// Appends the mask rows of `t` new positions; returns the full mask and the position ids of
    /// the new positions (see [`positions_from_mask`]).
    pub fn extend(&mut self, new: &[Vec<u32>], t: usize) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let full = self.extend_mask(new).to_vec();
        let positions = positions_from_mask(&full)
            .into_iter()
            .map(|row| row[row.len() - t..].to_vec())
            .collect();
        (full, positions)
    }

    /// Appends new keys and values of one layer along dimension `time` (the same for every call
    /// on a layer); returns all of them, contiguous.
    pub fn update(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        time: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = if self.detached {
            (k.detach(), v.detach())
        } else {
            (k.clone(), v.clone())
        };
        let (k, v) = match &self.layers[layer] {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], time)?, Tensor::cat(&[pv, &v], time)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Keeps (and repeats) batch rows: row i of the result is row `rows[i]` of the cache. Used by
    /// beam search when hypotheses are reordered.
    pub fn select(&mut self, rows: &[usize]) -> Result<()> {
        let device = match self.layers.iter().flatten().next() {
            Some((k, _)) => k.device().clone(),
            None => return Ok(()),
        };
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &device,
        )?;
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(&index, 0)?;
            *v = v.index_select(&index, 0)?;
        }
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        Ok(())
    }
}

/// Position ids from a 0/1 attention mask [B, T]: the number of real tokens before each real
/// position (cumsum - 1), so that left- and right-padded rows both count from 0. Padding
/// positions get the position of the previous real token (their value never matters: they are
/// masked as keys and their outputs are ignored).
pub fn positions_from_mask(mask: &[Vec<u32>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let mut seen = 0u32;
            row.iter()
                .map(|&m| {
                    seen += m;
                    seen.saturating_sub(1)
                })
                .collect()
        })
        .collect()
}
