//! Rotary position embedding (RoPE) and the embedding lookup as CPU ops with their own
//! backward.

use super::real::*;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

// ---------------------------------------------------------------- RoPE

/// Rotary embedding in the half-split layout: with x = [x1, x2] and the angle's cos c and sin s
/// (the tables repeat their first half), y = [x1 c - x2 s, x2 c + x1 s]. Its backward is the
/// inverse rotation: dx = [g1 c + g2 s, g2 c - g1 s]. `inverse` applies that one.
struct Rope {
    /// [B, 1, T, D] each, contiguous, the same dtype as x.
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
    /// `None`: x is [B, H, T, D]; `Some(h)`: x is [B, T, h * D] (heads side by side).
    heads: Option<usize>,
}

/// Rotates every row of D values of `x`; `table_of(row)` is the row of the cos/sin tables (its
/// batch and position) that row `row` uses.
pub(crate) fn rope_rows<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    d: usize,
    table_of: impl Fn(usize) -> usize + Sync,
    inverse: bool,
) -> Vec<T> {
    let sign = if inverse { -1.0 } else { 1.0 };
    let rows = rows_per_task(d);
    par_blocks_out(x.len(), rows * d, |block, out: &mut [T]| {
        let x = &x[block * rows * d..block * rows * d + out.len()];
        let first = block * rows;
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
            // SAFETY: T is f32 (the same type, checked just above).
            let as_f32 = |v: &[T]| unsafe { &*(v as *const [T] as *const [f32]) };
            // SAFETY: as above.
            let out = unsafe { &mut *(out as *mut [T] as *mut [f32]) };
            let (cos, sin) = (as_f32(cos), as_f32(sin));
            rope_block_f32(as_f32(x), out, (cos, sin), (d, first, &table_of), sign);
        } else {
            rope_block(x, out, (cos, sin), (d, first, &table_of), sign);
        }
    })
}

/// Rows first.. of `x` (whole rows of d values) rotated into `out`: in f64, rounded once.
#[inline(always)]
fn rope_block<T: Real>(
    x: &[T],
    out: &mut [T],
    (cos, sin): (&[T], &[T]),
    (d, first, table_of): (usize, usize, &(dyn Fn(usize) -> usize + Sync)),
    sign: f64,
) {
    let half = d / 2;
    for (i, (out, x)) in out.chunks_mut(d).zip(x.chunks(d)).enumerate() {
        let table = table_of(first + i) * d;
        let (c, s) = (&cos[table..table + half], &sin[table..table + half]);
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        // Zipped slices (no bounds checks), so that the loop vectorizes.
        for ((o1, o2), ((&x1, &x2), (&c, &s))) in o1
            .iter_mut()
            .zip(o2.iter_mut())
            .zip(x1.iter().zip(x2).zip(c.iter().zip(s)))
        {
            let (c, s, x1, x2) = (c.to(), s.to() * sign, x1.to(), x2.to());
            *o1 = T::from(x1 * c - x2 * s);
            *o2 = T::from(x2 * c + x1 * s);
        }
        if d % 2 == 1 {
            out[d - 1] = x[d - 1];
        }
    }
}

super::simd::multiversion! {
    /// [`rope_block`] for f32, compiled for AVX-512 and AVX2 too (the same values: the same
    /// f64 operations, in vectors).
    pub fn rope_block_f32(
        x: &[f32],
        out: &mut [f32],
        tables: (&[f32], &[f32]),
        rows: (usize, usize, &(dyn Fn(usize) -> usize + Sync)),
        sign: f64,
    ) {
        rope_block(x, out, tables, rows, sign)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = self.cos.dims4()?;
        let (heads, heads_first) = match self.heads {
            None => (layout.shape().dims4()?.1, true),
            Some(h) => (h, false),
        };
        // Row r of D values: [B, H, T] order -> table (b, t) = (r / (H T), r % T); [B, T, H]
        // order -> table r / H.
        let table_of = move |r: usize| {
            if heads_first {
                r / (heads * t) * t + r % t
            } else {
                r / heads
            }
        };
        let (cos_s, cos_l) = self.cos.storage_and_layout();
        let (sin_s, sin_l) = self.sin.storage_and_layout();
        let name = self.name();
        let (cos_s, sin_s) = (cpu(&cos_s, name)?, cpu(&sin_s, name)?);
        let out = by_dtype!(storage.dtype(), name, |T| T::wrap(rope_rows::<T>(
            typed(storage, layout, name)?,
            typed(cos_s, cos_l, name)?,
            typed(sin_s, sin_l, name)?,
            d,
            table_of,
            self.inverse,
        )));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
            heads: self.heads,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(inverse)?))
    }
}

/// RoPE for x [B, H, T, D] with tables cos, sin [B, 1, T, D] (fused on the CPU, with backward);
/// elsewhere x cos + rotate_half(x) sin.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let fits = cos.dims4().ok() == Some((b, 1, t, d)) && sin.dims4().ok() == Some((b, 1, t, d));
    if !fusable(x) || !fits {
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        // The tables are f32; a bf16 x (GPU) is rotated in its own type.
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        return x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?;
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
        inverse: false,
        heads: None,
    })
}

/// RoPE for x [B, T, H * D] (the projection's layout, heads side by side) with tables cos, sin
/// [B, 1, T, D]: the same rotation as [`rope`] on the split heads, without the transposes.
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let d = width / heads.max(1);
    let fits = heads * d == width
        && cos.dims4().ok() == Some((b, 1, t, d))
        && sin.dims4().ok() == Some((b, 1, t, d));
    if !fusable(x) || !fits {
        let split = x.reshape((b, t, heads, d))?.transpose(1, 2)?;
        let rotated = rope(&split, cos, sin)?;
        return rotated.transpose(1, 2)?.reshape((b, t, width));
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
        inverse: false,
        heads: Some(heads),
    })
}

// ---------------------------------------------------------------- embedding

/// Rows of a table picked by ids, with a backward that scatters the rows' gradients into one
/// zero-filled table gradient (filled in parallel). candle's index_select backward fills a zero
/// table, copies it once more inside index_add, and adds; this writes the table once.
struct Embedding {
    ids: Vec<u32>,
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (vocab, dim) = layout.shape().dims2()?;
        if let Some(&bad) = self.ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("embedding: id {bad} is outside the table of {vocab} rows");
        }
        let out = by_dtype!(storage.dtype(), name, |T| {
            let table = typed::<T>(storage, layout, name)?;
            let mut out = Vec::with_capacity(self.ids.len() * dim);
            for &id in &self.ids {
                let id = id as usize;
                out.extend_from_slice(&table[id * dim..(id + 1) * dim]);
            }
            T::wrap(out)
        });
        Ok((out, Shape::from((self.ids.len(), dim))))
    }

    fn bwd(&self, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let name = "embedding-grad";
        let (vocab, dim) = table.dims2()?;
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let dtable = by_dtype!(table.dtype(), name, |T| {
            let g = typed::<T>(cpu(&gs, name)?, gl, name)?;
            let mut d = Vec::new();
            d.par_extend(
                (0..vocab * dim)
                    .into_par_iter()
                    .map(|_| <T as Real>::from(0.0)),
            );
            for (row, &id) in g.chunks(dim.max(1)).zip(&self.ids) {
                let id = id as usize;
                for (t, v) in d[id * dim..(id + 1) * dim].iter_mut().zip(row) {
                    *t += *v;
                }
            }
            Tensor::from_vec(d, (vocab, dim), table.device())?
        });
        Ok(Some(dtable))
    }
}

/// table[ids] for a table [V, H] and ids [B, T] -> [B, T, H] (fused on the CPU in f32 and f64,
/// with the backward of [`Embedding`]); elsewhere index_select.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let dim = table.dim(1)?;
    if !fusable(table) || !ids.device().is_cpu() {
        return table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, dim));
    }
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    table
        .contiguous()?
        .apply_op1(Embedding { ids })?
        .reshape((b, t, dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, probe_loss, random};
    use candle_core::{Device, Var};

    #[test]
    fn the_vector_rotation_gives_the_values_of_f64_rounded_once() {
        // d = 64 and an odd d = 7 (the last value passes through); two table rows.
        for d in [64, 7] {
            let rows = 3;
            let x = crate::ops::testing::random_f32(rows * d, 5, 2.0);
            let cos = crate::ops::testing::random_f32(2 * d, 6, 1.0);
            let sin = crate::ops::testing::random_f32(2 * d, 7, 1.0);
            let table_of = |r: usize| r % 2;
            for sign in [1.0, -1.0] {
                let mut got = vec![0f32; rows * d];
                rope_block_f32(&x, &mut got, (&cos, &sin), (d, 0, &table_of), sign);
                let half = d / 2;
                for r in 0..rows {
                    let t = table_of(r) * d;
                    for k in 0..half {
                        let (c, s) = (cos[t + k] as f64, sin[t + k] as f64 * sign);
                        let (x1, x2) = (x[r * d + k] as f64, x[r * d + half + k] as f64);
                        assert_eq!(
                            got[r * d + k].to_bits(),
                            ((x1 * c - x2 * s) as f32).to_bits()
                        );
                        let want = (x2 * c + x1 * s) as f32;
                        assert_eq!(got[r * d + half + k].to_bits(), want.to_bits());
                    }
                    if d % 2 == 1 {
                        assert_eq!(got[r * d + d - 1], x[r * d + d - 1]);
                    }
                }
            }
        }
    }

    #[test]
    fn fused_rope_matches_the_decomposed_one_in_values_and_gradients() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let positions = Tensor::from_vec(
            (0..(b * t) as u32).map(|i| i % 7 + 2).collect::<Vec<_>>(),
            (b, t),
            &Device::Cpu,
        )
        .unwrap();
        let (cos, sin) = crate::models::nn::Rope::new(d, 10000.0)
            .tables(&positions)
            .unwrap();
        let (cos, sin) = (
            cos.to_dtype(DType::F64).unwrap(),
            sin.to_dtype(DType::F64).unwrap(),
        );
        // a non-contiguous input, as attention produces it
        let base = Var::from_tensor(&random(&[b, t, h, d], 61, 2.0)).unwrap();
        let x = base.as_tensor().transpose(1, 2).unwrap();
        let ours = rope(&x, &cos, &sin).unwrap();
        let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
        let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let plain =
            (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap();
        assert!(max_diff(&ours, &plain) < 1e-12);
        let g1 = probe_loss(&ours, 62).backward().unwrap();
        let g2 = probe_loss(&plain, 62).backward().unwrap();
        let diff = max_diff(
            g1.get(base.as_tensor()).unwrap(),
            g2.get(base.as_tensor()).unwrap(),
        );
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn embedding_matches_index_select_in_values_and_gradients() {
        let table = Var::from_tensor(&random(&[7, 5], 77, 1.0)).unwrap();
        // Repeated ids: their gradients add up in the table's row.
        let ids = Tensor::from_vec(vec![3u32, 0, 3, 6, 1, 3], (2, 3), &Device::Cpu).unwrap();
        let ours = embedding(table.as_tensor(), &ids).unwrap();
        let plain = table
            .as_tensor()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap()
            .reshape((2, 3, 5))
            .unwrap();
        assert_eq!(ours.dims(), &[2, 3, 5]);
        assert_eq!(max_diff(&ours, &plain), 0.0);
        let g1 = probe_loss(&ours, 4).backward().unwrap();
        let g2 = probe_loss(&plain, 4).backward().unwrap();
        let d = max_diff(
            g1.get(table.as_tensor()).unwrap(),
            g2.get(table.as_tensor()).unwrap(),
        );
        assert!(d < 1e-15, "table gradient differs by {d}");
        let f32_out = embedding(&table.as_tensor().to_dtype(DType::F32).unwrap(), &ids).unwrap();
        assert_eq!(f32_out.dtype(), DType::F32);
        let bad = Tensor::from_vec(vec![7u32], (1, 1), &Device::Cpu).unwrap();
        let err = embedding(table.as_tensor(), &bad).unwrap_err().to_string();
        assert!(err.contains("id 7") && err.contains("7 rows"), "{err}");
    }
}
