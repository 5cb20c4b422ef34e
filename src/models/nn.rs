//! Differentiable building blocks of the architectures.
//!
//! Everything here is written with candle operations that have a backward pass (STACK.md, trap 1:
//! candle-nn's fused norms, `softmax_last_dim` and RoPE kernels silently stop gradients).

use super::params::{Params, Trainable};
use crate::ops::bf16x2::{self, Bf16Weight};
use crate::ops::int8::{self, Epilogue, Int8Weight, QuantizedInput};
use crate::ops::Precision;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use std::sync::{Arc, OnceLock};

/// A large negative number used as an additive mask: finite, so that a fully masked row gives a
/// uniform distribution instead of NaN.
pub const MASK_VALUE: f64 = -1e9;

/// LoRA adapter: y += scale * dropout(x) A^T B^T, with A [r, in] and B [out, r].
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
}

/// y = x W^T + b (+ LoRA). `weight` is [out, in], as in PyTorch's nn.Linear.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// The weight in int8 for inference ([`Linear::set_precision`]); used instead of `weight`
    /// when the layer has no adapter.
    pub packed: Option<Arc<Int8Weight>>,
    /// The weight in bf16 for inference in [`Precision::Bf16x2`]; used instead of `weight` when
    /// the layer has no adapter.
    pub split: Option<Arc<Bf16Weight>>,
    /// The precision whose packed copy replaced the f32 weight ([`Linear::pack_dropping_f32`]):
    /// `weight` is then a placeholder of its shape, and the layer runs in that precision only.
    f32_dropped: Option<Precision>,
    /// W^T [in, out], contiguous, made on first use by [`Linear::transposed`] (shared by clones,
    /// like the weight).
    transposed: Arc<OnceLock<Tensor>>,
}

thread_local! {
    /// While training: the generator of dropout masks (seeded by the trainer for each step, so a
    /// run is reproducible); `None` outside training, where dropout is off.
    static DROPOUT_RNG: std::cell::RefCell<Option<crate::rng::Rng>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` in training mode: dropout is active, its masks drawn from `seed`.
pub fn with_training<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    DROPOUT_RNG.with(|r| *r.borrow_mut() = Some(crate::rng::Rng::derived(seed, "dropout")));
    let out = f();
    DROPOUT_RNG.with(|r| *r.borrow_mut() = None);
    out
}

/// Whether [`dropout`] with probability `p` changes its input (p > 0 inside [`with_training`]).
pub fn dropout_active(p: f32) -> bool {
    p > 0.0 && DROPOUT_RNG.with(|r| r.borrow().is_some())
}

/// Inverted dropout with a seeded mask; the identity outside [`with_training`].
pub fn dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = DROPOUT_RNG.with(|r| {
        r.borrow_mut().as_mut().map(|rng| {
            let keep = 1.0 / (1.0 - p);
            (0..x.elem_count())
                .map(|_| {
                    if rng.next_f64() < p as f64 {
                        0f32
                    } else {
                        keep
                    }
                })
                .collect::<Vec<f32>>()
        })
    });
    match mask {
        None => Ok(x.clone()),
        Some(mask) => x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?,
    }
}

/// Packs (or unpacks) every layer of `linears` and the head for `precision`.
pub fn set_precision_all<'a>(
    precision: Precision,
    linears: impl IntoIterator<Item = &'a mut Linear>,
    head: Option<&mut Head>,
) -> Result<()> {
    for linear in linears {
        linear.set_precision(precision)?;
    }
    head.map_or(Ok(()), |h| h.set_precision(precision))
}

/// The value of `cell`, made by `make` the first time (fallible, unlike `OnceLock::get_or_init`;
/// two threads may both make it, one value is kept).
fn once<T>(cell: &OnceLock<T>, make: impl FnOnce() -> Result<T>) -> Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let made = make()?;
    Ok(cell.get_or_init(|| made))
}

/// A language-model head's weight [V, H], with its int8 copy for inference.
#[derive(Debug, Clone)]
pub struct Head {
    /// The weight (a tied model's embedding table, which may be quantised rows until the
    /// first logits).
    table: Arc<Table>,
    /// Whether logits come from an int8 copy of the weight (precision int8).
    int8: bool,
    /// That copy, packed at the first logits: a model loaded for its hidden states alone
    /// (features) never packs its head, often its largest matrix (Gemma-3's 262,144 x 640).
    packed: OnceLock<Arc<Int8Weight>>,
    /// The int8 copy of an f32 head that screens decoding's next tokens
    /// ([`crate::ops::head`]), made at the first step where [`Head::screens`] holds.
    screen: OnceLock<Option<Arc<Int8Weight>>>,
    /// Screening forced on or off for this head (studies, tests); `None`: [`screening`].
    screening: Option<bool>,
}

impl Head {
    pub fn new(weight: Tensor) -> Head {
        Head::of(Arc::new(Table::Dense(weight)))
    }

    /// A head whose weight is `table` (shared with the embeddings of a tied model).
    pub fn of(table: Arc<Table>) -> Head {
        Head {
            table,
            int8: false,
            packed: OnceLock::new(),
            screen: OnceLock::new(),
            screening: None,
        }
    }

    /// The weight [V, H] in f32.
    pub fn weight(&self) -> Result<&Tensor> {
        self.table.dense()
    }

    /// Packs the head in int8 for `precision` int8; f32 and bf16x2 keep the f32 head (decoding
    /// screens it in int8 where [`Head::screens`] holds, scoring's whole rows stay f32).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.int8 = precision == Precision::Int8 && !self.table.trained();
        self.packed = OnceLock::new();
        self.screen = OnceLock::new();
        Ok(())
    }

    /// hidden W^T: logits [.., V].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if !self.int8 {
            return crate::ops::linear::linear(hidden, self.weight()?, None);
        }
        let packed = once(&self.packed, || {
            Ok(Arc::new(int8::pack_tensor(self.weight()?)?))
        })?;
        int8::linear(hidden, packed, None)
    }

    /// Forces screening on (`Some(true)`: any f32 head on the CPU that is not trained) or off,
    /// or leaves it to the default (`None`, [`Head::screens`]).
    pub fn set_screening(&mut self, on: Option<bool>) {
        self.screening = on;
        self.screen = OnceLock::new();
    }

    /// Whether decoding's next tokens are screened in int8 ([`crate::ops::head`]): an f32 head
    /// on the CPU that is not trained, with a vocabulary of at least [`SCREEN_MIN_VOCAB`], on a
    /// CPU with 8-bit dot products (AVX-512 VNNI; elsewhere int8 is not faster than f32);
    /// `WS2S_HEAD_SCREEN=0` turns it off, `=1` on for every f32 head.
    pub fn screens(&self) -> bool {
        !self.int8
            && self.table.frozen_cpu_f32()
            && match self.screening.map_or(screening(), |on| {
                if on {
                    Screening::Always
                } else {
                    Screening::Off
                }
            }) {
                Screening::Off => false,
                Screening::Always => true,
                Screening::Auto => self.table.vocabulary().is_ok_and(|v| v >= SCREEN_MIN_VOCAB),
            }
    }

    fn screen(&self) -> Result<Option<&Arc<Int8Weight>>> {
        let screen = once(&self.screen, || {
            Ok(if self.screens() {
                Some(Arc::new(int8::pack_tensor(self.weight()?)?))
            } else {
                None
            })
        })?;
        Ok(screen.as_ref())
    }

    /// For each row of `hidden` [rows, H]: the `keep` most likely next tokens with their
    /// log-probabilities, best first; `cap` soft-caps the logits (Gemma). Screened in int8
    /// where [`Head::screens`] holds (the kept tokens and logits are f32's), else from the
    /// whole logit rows.
    pub fn top_logprobs(
        &self,
        hidden: &Tensor,
        keep: usize,
        cap: Option<f64>,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        use rayon::prelude::*;
        let (rows, _) = hidden.dims2()?;
        if let Some(screen) = self.screen()? {
            let x = hidden
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let weight = self.weight()?.contiguous()?;
            let guard = weight.storage_and_layout();
            let w = crate::ops::real::operand_values::<f32, _>(&guard, "screened head")?;
            let (top, _) =
                crate::ops::head::screened_top(&x, rows, (w, screen), keep, cap.map(|c| c as f32));
            return Ok(top);
        }
        let mut logits = self.logits(hidden)?;
        if let Some(c) = cap {
            logits = ((logits / c)?.tanh()? * c)?;
        }
        Ok(logits
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?
            .par_iter()
            .map(|row| crate::ops::head::top_logprobs(row, keep))
            .collect())
    }
}

/// The smallest vocabulary whose head is screened (smaller heads are a small part of a step).
pub const SCREEN_MIN_VOCAB: usize = 4096;

/// When heads are screened: `WS2S_HEAD_SCREEN=0` never, `1` always (any CPU, any vocabulary:
/// for tests), else where it pays (a CPU with 8-bit dot products: AMX, AVX-512 VNNI or
/// AVX-VNNI; a vocabulary of at least [`SCREEN_MIN_VOCAB`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Screening {
    Off,
    Always,
    Auto,
}

fn screening() -> Screening {
    static MODE: OnceLock<Screening> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("WS2S_HEAD_SCREEN").as_deref() {
        Ok("0") => Screening::Off,
        Ok("1") => Screening::Always,
        _ if int8::Kernel::detected().has_dot_products() => Screening::Auto,
        _ => Screening::Off,
    })
}

/// x W^T for x of any rank: the leading dimensions are flattened so that the product is one
/// large matrix multiplication rather than a batch of small ones.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims[dims.len() - 1];
    let rows = x.elem_count() / last;
    let y = x.reshape((rows, last))?.matmul(&w.t()?)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out_dims)
}

impl Linear {
    /// A layer without adapter and without a packed copy.
    pub fn new(weight: Tensor, bias: Option<Tensor>, lora: Option<Lora>) -> Linear {
        Linear {
            weight,
            bias,
            lora,
            packed: None,
            split: None,
            f32_dropped: None,
            transposed: Arc::default(),
        }
    }

    /// The frozen weight transposed, W^T [in, out] contiguous, made once and kept (as much
    /// memory again as the weight): for layers trained through, whose products then read it in
    /// gemm's faster orientation ([`crate::ops::linear::Weight`]). `None` for a trained weight (it
    /// changes every step) or one that is not f32 on the CPU.
    pub fn transposed(&self) -> Result<Option<&Tensor>> {
        if self.weight.track_op()
            || self.f32_dropped.is_some()
            || !self.weight.device().is_cpu()
            || self.weight.dtype() != candle_core::DType::F32
        {
            return Ok(None);
        }
        if let Some(t) = self.transposed.get() {
            return Ok(Some(t));
        }
        let t = self.weight.t()?.contiguous()?;
        Ok(Some(self.transposed.get_or_init(|| t)))
    }

    /// Packs a frozen layer for `precision` (int8 or bf16x2) and lets go of its f32 weight (a
    /// zero-stride placeholder of the same shape takes its place): a model loaded for inference
    /// in such a precision never holds all its f32 weights at once. The layer can then run in
    /// that precision only. Layers that are trained keep their f32 weight and are not packed.
    pub fn pack_dropping_f32(&mut self, precision: Precision) -> Result<()> {
        if !self.is_frozen() || !precision.packs() {
            return Ok(());
        }
        if self.f32_dropped.is_none() {
            self.set_precision(precision)?;
            if !self.is_packed() {
                return Ok(()); // not packable here (a GPU's weight): keep f32
            }
            let zero = Tensor::zeros((), self.weight.dtype(), self.weight.device())?;
            self.weight = zero.broadcast_as(self.weight.shape())?;
            self.f32_dropped = Some(precision);
        }
        Ok(())
    }

    /// The int8 weight, when packed and used (no adapter).
    pub fn int8(&self) -> Option<&Int8Weight> {
        self.packed.as_deref().filter(|_| self.lora.is_none())
    }

    /// The bf16 weight, when packed and used (no adapter).
    fn bf16(&self) -> Option<&Bf16Weight> {
        self.split.as_deref().filter(|_| self.lora.is_none())
    }

    /// Whether the layer runs from a packed copy (int8 or bf16) rather than its f32 weight:
    /// fused f32 paths must not take it.
    pub fn is_packed(&self) -> bool {
        self.int8().is_some() || self.bf16().is_some()
    }

    /// Packs the weight for `precision` (int8, or bf16x2 on the CPU), or drops the packed copies
    /// (f32). Layers with an adapter or a trained weight stay in f32.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if let Some(kept) = self.f32_dropped {
            if precision == kept {
                return Ok(());
            }
            candle_core::bail!(
                "this model was loaded for {} inference and kept no f32 weights; load it again \
                 for {} (Model::load_as)",
                kept.name(),
                precision.name()
            );
        }
        self.packed = match precision {
            Precision::Int8 if self.is_frozen() => Some(Arc::new(int8::pack_tensor(&self.weight)?)),
            _ => None,
        };
        self.split = match precision {
            Precision::Bf16x2 if self.is_frozen() && self.weight.device().is_cpu() => {
                Some(Arc::new(bf16x2::pack_tensor(&self.weight)?))
            }
            _ => None,
        };
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(w) = self.int8() {
            return int8::linear(x, w, self.bias.as_ref());
        }
        if let Some(w) = self.bf16() {
            return bf16x2::linear(x, w, self.bias.as_ref());
        }
        if let Some(lora) = self
            .lora
            .as_ref()
            .filter(|l| !dropout_active(l.dropout) && l.a.dtype() == x.dtype())
        {
            return crate::ops::lora::lora_linear(
                x,
                &self.weight,
                self.bias.as_ref(),
                (&lora.a, &lora.b, lora.scale),
            );
        }
        let mut y = crate::ops::linear::linear(x, &self.weight, self.bias.as_ref())?;
        if let Some(lora) = &self.lora {
            // The adapter computes in its own type (f32; a GPU's base is bf16), added in x's.
            let input = dropout(&x.to_dtype(lora.a.dtype())?, lora.dropout)?;
            let delta = (matmul_t(&matmul_t(&input, &lora.a)?, &lora.b)? * lora.scale)?;
            y = (y + delta.to_dtype(x.dtype())?)?;
        }
        Ok(y)
    }
}

/// Several layers applied to the same input: the input is quantized once when all of them
/// are packed in int8.
pub fn project_shared<const N: usize>(x: &Tensor, layers: [&Linear; N]) -> Result<[Tensor; N]> {
    let packed: Option<Vec<&Int8Weight>> = layers.iter().map(|l| l.int8()).collect();
    let outputs: Vec<Tensor> = match packed {
        Some(weights) => {
            let q = QuantizedInput::new(x)?;
            weights
                .iter()
                .zip(&layers)
                .map(|(w, l)| q.linear(w, l.bias.as_ref()))
                .collect::<Result<_>>()?
        }
        None => layers.iter().map(|l| l.forward(x)).collect::<Result<_>>()?,
    };
    Ok(outputs.try_into().expect("N outputs"))
}

impl Linear {
    /// forward(x) followed by `then` (GELU, a residual, a gate): in int8, inside the product
    /// ([`crate::ops::int8::Epilogue`]); otherwise as separate operations, with the same values.
    pub fn forward_then(&self, x: &Tensor, then: Epilogue<&Tensor>) -> Result<Tensor> {
        if let Some(w) = self.int8() {
            return QuantizedInput::new(x)?.linear_then(w, self.bias.as_ref(), then);
        }
        let y = self.forward(x)?;
        match then {
            Epilogue::None => Ok(y),
            Epilogue::Gelu => crate::ops::activation::gelu_erf(&y),
            Epilogue::Add(r) => r + y,
            Epilogue::Gated(act, g) => crate::ops::activation::gated(g, &y, act),
        }
    }

    /// Whether nothing of this layer is trained: no adapter, frozen weight and bias.
    pub fn is_frozen(&self) -> bool {
        self.lora.is_none()
            && !self.weight.track_op()
            && self.bias.as_ref().is_none_or(|b| !b.track_op())
    }
}

/// Bytes of one intermediate product of a gated MLP in int8, at most, per chunk of rows: 32
/// MB, a whole half of the demo's batch (512 rows) of Qwen2.5-1.5B (18 MB) in one chunk. Each
/// chunk reads all three weights of the MLP (41 MB for Qwen2.5-1.5B) again; against chunks of
/// 8 MB (224 + 224 + 64 rows), both in turn in one process (40 forwards of 32 x 32 tokens,
/// Intel Xeon with AMX; docs/results/inference.md, session 26), Qwen2.5-1.5B's forward was
/// 4.2-4.4% faster in two runs and Qwen2.5-0.5B's 2.9%.
const MLP_CHUNK_BYTES: usize = 32 << 20;

/// down(act(gate x) * up x) (Llama, Qwen2, Gemma), plus `residual` when given: one fused op
/// when the three layers are frozen and have no bias ([`crate::ops::mlp::frozen_mlp`]), else
/// layer by layer. In int8 the gating and the residual run in the products' epilogues.
pub fn gated_mlp(
    x: &Tensor,
    (gate, up, down): (&Linear, &Linear, &Linear),
    act: crate::ops::activation::Gate,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(y) = int8_gated_mlp(x, (gate, up, down), act, residual, MLP_CHUNK_BYTES)? {
        return Ok(y);
    }
    let y = gated_mlp_unpacked(x, (gate, up, down), act)?;
    match residual {
        Some(r) => r + y,
        None => Ok(y),
    }
}

/// [`gated_mlp`] when the three layers are packed in int8 (None otherwise): rows in chunks whose intermediate
/// products hold at most `chunk_bytes` (rows are independent: the values do not change). Two
/// [rows, intermediate] outputs of 36 MB each (1,024 rows of Qwen2.5-1.5B) were once fresh
/// memory mappings on every call, past glibc's reuse limit (chunks of 8 MB were then 5-12%
/// faster); the binary's allocator settings (`runtime::tune_allocator`) since keep such
/// buffers for reuse, and chunks now only bound the intermediate memory.
fn int8_gated_mlp(
    x: &Tensor,
    (gate, up, down): (&Linear, &Linear, &Linear),
    act: crate::ops::activation::Gate,
    residual: Option<&Tensor>,
    chunk_bytes: usize,
) -> Result<Option<Tensor>> {
    let (Some(g), Some(u), Some(d)) = (gate.int8(), up.int8(), down.int8()) else {
        return Ok(None);
    };
    let mlp = |x: &Tensor, residual: Option<&Tensor>| -> Result<Tensor> {
        let q = QuantizedInput::new(x)?;
        let (gb, ub) = (gate.bias.as_ref(), up.bias.as_ref());
        let then = residual.map_or(Epilogue::None, Epilogue::Add);
        // One product for both projections, quantized for the down projection as it goes
        // where its weights fit in L2 (else beside the down projection's tiles), where the
        // kernel allows it; else the gated output in f32, then quantized.
        if let Some(y) =
            q.gated_then_linear((g, u), (gb, ub), act, (d, down.bias.as_ref()), then)?
        {
            return Ok(y);
        }
        if let Some(h) = q.gated_quantized((g, u), (gb, ub), act)? {
            return h.linear_then(d, down.bias.as_ref(), then);
        }
        // Else the two products, the gate's output in the up projection's epilogue.
        let a = q.linear(g, gb)?;
        let h = q.linear_then(u, ub, Epilogue::Gated(act, &a))?;
        QuantizedInput::new(&h)?.linear_then(d, down.bias.as_ref(), then)
    };
    let k = x.dim(D::Minus1)?;
    let m = x.elem_count() / k.max(1);
    let chunk = (chunk_bytes / (4 * g.rows().max(1)) / 16 * 16).max(16);
    if m <= chunk {
        return mlp(x, residual).map(Some);
    }
    let x2 = x.reshape((m, k))?;
    let r2 = residual.map(|r| r.reshape((m, ()))).transpose()?;
    let parts = (0..m)
        .step_by(chunk)
        .map(|r0| {
            let len = chunk.min(m - r0);
            let r = r2.as_ref().map(|r| r.narrow(0, r0, len)).transpose()?;
            mlp(&x2.narrow(0, r0, len)?, r.as_ref())
        })
        .collect::<Result<Vec<_>>>()?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("a last dimension") = d.rows();
    Tensor::cat(&parts, 0)?.reshape(dims).map(Some)
}

fn gated_mlp_unpacked(
    x: &Tensor,
    (gate, up, down): (&Linear, &Linear, &Linear),
    act: crate::ops::activation::Gate,
) -> Result<Tensor> {
    use crate::ops::mlp::{frozen_mlp, MlpKind};
    let layers = [gate, up, down];
    if layers
        .iter()
        .all(|l| l.is_frozen() && l.bias.is_none() && !l.is_packed())
    {
        let fused = frozen_mlp(
            x,
            MlpKind::Gated(act),
            (&gate.weight, None),
            Some(&up.weight),
            (&down.weight, None),
        )?;
        if let Some(y) = fused {
            return Ok(y);
        }
    }
    down.forward(&crate::ops::activation::gated(
        &gate.forward(x)?,
        &up.forward(x)?,
        act,
    )?)
}

/// down(gelu_erf(up x)) (BERT's feed-forward block): one fused op when both layers are frozen;
/// else the up projection, then the GELU and the down projection as one op
/// ([`crate::ops::mlp::gelu_linear`]) when the down projection has a bias and no adapter.
pub fn gelu_mlp(x: &Tensor, up: &Linear, down: &Linear) -> Result<Tensor> {
    use crate::ops::mlp::{frozen_mlp, MlpKind};
    if up.int8().is_some() && down.int8().is_some() {
        return down.forward(&up.forward_then(x, Epilogue::Gelu)?);
    }
    if up.is_frozen() && down.is_frozen() && !up.is_packed() && !down.is_packed() {
        let fused = frozen_mlp(
            x,
            MlpKind::GeluErf,
            (&up.weight, up.bias.as_ref()),
            None,
            (&down.weight, down.bias.as_ref()),
        )?;
        if let Some(y) = fused {
            return Ok(y);
        }
    }
    let h = up.forward(x)?;
    if let (None, Some(bias), false) = (&down.lora, &down.bias, down.is_packed()) {
        if let Some(y) = crate::ops::mlp::gelu_linear(&h, &down.weight, bias)? {
            return Ok(y);
        }
    }
    down.forward(&crate::ops::activation::gelu_erf(&h)?)
}

/// Self-attention's output (no output projection), quantized for that projection: in int8
/// with the AMX kernel, tasks of whole sequences (at least 64 rows) project
/// their rows to queries, keys and values, attend and quantize the result while all of it is
/// in the core's L2, so none of the four [m, hidden] f32 tensors is written whole and read
/// back. `x` [B, T, hidden], `mask` the additive [B, 1, T, T], `layers` the query, key and
/// value projections (as many heads each). The same values as the separate steps
/// ([`project_shared`], [`crate::ops::attention::attention`], [`QuantizedInput::new`]); None
/// where the layers are not packed in int8 or the shapes or kernel do not allow it.
pub fn int8_self_attention(
    x: &Tensor,
    quantized: Option<QuantizedInput>,
    layers: [&Linear; 3],
    mask: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<QuantizedInput>> {
    let [Some(wq), Some(wk), Some(wv)] = layers.map(|l| l.int8()) else {
        return Ok(None);
    };
    let (b, t, _) = x.dims3()?;
    let width = wq.rows();
    let d = width / heads.max(1);
    if heads == 0
        || d * heads != width
        || wk.rows() != width
        || wv.rows() != width
        || !crate::ops::attention_infer::supports(d)
        || mask.dims() != [b, 1, t, t]
    {
        return Ok(None);
    }
    // Whole sequences per task, at least 64 rows (all of them where there are fewer).
    let per_task = 64usize.div_ceil(t.max(1)).min(b.max(1));
    let mask = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let biases = layers.map(|l| l.bias.as_ref());
    let weights = [(wq, biases[0]), (wk, biases[1]), (wv, biases[2])];
    let x = quantized.map_or_else(|| QuantizedInput::new(x), Ok)?;
    x.products_then(weights, (per_task * t, width), |r0, [q, k, v], out| {
        let (b0, seqs) = (r0 / t, out.len() / (t * width));
        let dims = crate::ops::attention::Dims {
            b: seqs,
            tq: t,
            tk: t,
            heads,
            kv_heads: heads,
            d,
        };
        let mask = &mask[b0 * t * t..(b0 + seqs) * t * t];
        crate::ops::attention_infer::forward_serial((q, k, v), mask, dims, scale as f32, out);
    })
}

/// norm([`gelu_mlp`](x) + x) (BERT's feed-forward block, its residual and post-norm): in int8
/// the up projection's output reaches the down projection quantized
/// ([`QuantizedInput::linear_quantized`]), and the down projection's tasks add the residual and
/// norm their rows ([`QuantizedInput::linear_add_norm`]), with `quantize` also quantizing them
/// for the next product (the second result). `quantized`: x already quantized, if it is.
pub fn gelu_mlp_norm(
    x: &Tensor,
    quantized: Option<QuantizedInput>,
    (up, down): (&Linear, &Linear),
    norm: &LayerNorm,
    quantize: bool,
) -> Result<(Tensor, Option<QuantizedInput>)> {
    if let (Some(u), Some(d)) = (up.int8(), down.int8()) {
        let x_rows = quantized.map_or_else(|| QuantizedInput::new(x), Ok)?;
        let h = x_rows.linear_quantized(u, up.bias.as_ref(), Epilogue::Gelu)?;
        return norm.after_int8(&h, (d, down.bias.as_ref()), x, quantize);
    }
    Ok((norm.forward_residual(&gelu_mlp(x, up, down)?, x)?, None))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
}

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// From checkpoint tensors `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(params: &mut Params, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: params.weight(&format!("{prefix}.weight"), &[dim])?,
            bias: params.weight(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::norm::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// LN(x + residual), the sum formed inside one op (post-norm blocks).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        crate::ops::norm::layer_norm_residual(x, residual, &self.weight, &self.bias, self.eps)
    }

    /// Weight, bias and parameters of the norm row by row, as [`crate::ops::norm::layer_norm`]
    /// applies it.
    pub fn row_norm(&self) -> (&Tensor, Option<&Tensor>, crate::ops::simd::NormParams) {
        let params = crate::ops::norm::Norm::layer(self.eps).simd();
        (&self.weight, Some(&self.bias), params)
    }

    /// LN(x W^T + b + residual) for int8 rows x (W, b: `layer`): the product's tasks add the
    /// residual and norm their rows ([`QuantizedInput::linear_add_norm`]), with `quantize` also
    /// quantized for the next product; where that path does not run, the residual added in
    /// the product's epilogue, then the norm (not quantized).
    pub fn after_int8(
        &self,
        x: &QuantizedInput,
        layer: (&Int8Weight, Option<&Tensor>),
        residual: &Tensor,
        quantize: bool,
    ) -> Result<(Tensor, Option<QuantizedInput>)> {
        if let Some(made) = x.linear_add_norm(layer, residual, self.row_norm(), quantize)? {
            return Ok(made);
        }
        let y = x.linear_then(layer.0, layer.1, Epilogue::Add(residual))?;
        Ok((self.forward(&y)?, None))
    }

    /// LN(layer(x) + residual): in int8 the residual is added in the product's epilogue
    /// (`Epilogue::Add`: the same sums, whose two terms commute) and the norm reads the
    /// product's output, with no pass of its own for the sum; otherwise the layer, then
    /// [`Self::forward_residual`].
    pub fn forward_after(&self, layer: &Linear, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if layer.int8().is_some() {
            return self.forward(&layer.forward_then(x, Epilogue::Add(residual))?);
        }
        self.forward_residual(&layer.forward(x)?, residual)
    }
}

/// RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * scale, where scale is `w`
/// (Llama, Qwen2) or `1 + w` (Gemma).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub add_unit_offset: bool,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::norm::rms_norm(x, &self.weight, self.eps, self.add_unit_offset)
    }
}

/// The positions of `x` [B, T, D] at `rows` (indices into its B x T positions, row-major), as
/// [1, N, D]: the last layer of a forward whose pooling reads N positions runs its
/// position-wise part (projections after attention, MLP, norms) on those alone.
fn gather_positions(x: &Tensor, rows: &Tensor) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    x.reshape((b * t, d))?.index_select(rows, 0)?.unsqueeze(0)
}

/// `(attn, residual)` at the `keep` positions ([`gather_positions`]) in a forward's last layer,
/// else as they are.
pub fn kept_positions(
    attn: Tensor,
    residual: Tensor,
    keep: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    Ok(match keep {
        Some(rows) => (
            gather_positions(&attn, rows)?,
            gather_positions(&residual, rows)?,
        ),
        None => (attn, residual),
    })
}

/// The index of each row's last real token (its last 1) in the B x T positions of a batch
/// with 0/1 `mask` rows of T values, row-major, as a u32 tensor of B values.
pub fn last_positions(mask: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(mask.len());
    for (b, row) in mask.iter().enumerate() {
        match row.iter().rposition(|&m| m == 1) {
            Some(i) => rows.push((b * row.len() + i) as u32),
            None => candle_core::bail!("a sequence without any real token has no last position"),
        }
    }
    Tensor::new(rows, device)
}

/// A token embedding table: f32 values, or (a GGUF model loaded for inference on the CPU)
/// the quantised rows of its file, de-quantised as a forward reads them; the whole table is
/// de-quantised only when a tied head first needs it ([`Table::dense`]).
pub enum Table {
    Dense(Tensor),
    Rows {
        rows: super::gguf::QuantRows,
        dense: OnceLock<Tensor>,
    },
}

impl Table {
    pub fn rows(rows: super::gguf::QuantRows) -> Table {
        Table::Rows {
            rows,
            dense: OnceLock::new(),
        }
    }

    /// The embeddings [B, T, H] of `ids` [B, T].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Table::Dense(table) => embed(table, ids),
            Table::Rows { rows, .. } => {
                let (b, t) = ids.dims2()?;
                let h = rows.dims().1;
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * h];
                rows.read(&ids, &mut out)?;
                // Quantised rows live on the CPU.
                Tensor::from_vec(out, (b, t, h), &Device::Cpu)
            }
        }
    }

    /// The whole table in f32 (a quantised one de-quantised at the first call, then kept).
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Table::Dense(table) => Ok(table),
            Table::Rows { rows, dense } => once(dense, || rows.dense(&Device::Cpu)),
        }
    }

    /// Rows (the vocabulary).
    pub fn vocabulary(&self) -> Result<usize> {
        match self {
            Table::Dense(table) => table.dim(0),
            Table::Rows { rows, .. } => Ok(rows.dims().0),
        }
    }

    /// Whether the values are f32 on the CPU, with no gradient (what decoding's int8 screen
    /// needs).
    fn frozen_cpu_f32(&self) -> bool {
        match self {
            Table::Dense(t) => t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op(),
            Table::Rows { .. } => true,
        }
    }

    fn trained(&self) -> bool {
        matches!(self, Table::Dense(t) if t.track_op())
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Table::Dense(t) => write!(f, "Table::Dense({:?})", t.shape()),
            Table::Rows { rows, .. } => write!(f, "Table::Rows({:?})", rows.dims()),
        }
    }
}

/// Token embeddings by row lookup.
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    crate::ops::rope::embedding(table, ids)
}

/// Rotary position embedding tables for given positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        Rope { inv_freq }
    }

    /// cos and sin of shape [B, 1, T, D] for `positions` [B, T] (u32 or i64).
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let half = self.inv_freq.len();
        let inv = Tensor::from_slice(&self.inv_freq, (1, 1, half), positions.device())?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}

/// Applies RoPE in the half-split layout of HF transformers: x cos + rotate_half(x) sin, with
/// rotate_half([x1, x2]) = [-x2, x1]. `x` is [B, H, T, D].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::ops::rope::rope(x, cos, sin)
}

/// The unfused attention and its head plumbing live with the fused op (ops::attention).
pub use crate::ops::attention::{attention_decomposed as attention, repeat_kv, split_heads};

/// Attention of one decoder layer from its projections q [B, T, H * D], k and v [B, T, KVH * D]:
/// RoPE on q and k, keys and values appended to the layer's cache, then grouped-query
/// [`crate::ops::attention::attention`] (one fused op on the CPU). Returns [B, T, H * D].
#[allow(clippy::too_many_arguments)]
pub fn rotary_gqa_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    cache: &mut super::cache::KvCache,
    layer: usize,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let q = crate::ops::rope::rope_bthd(q, cos, sin, heads)?;
    let k = crate::ops::rope::rope_bthd(k, cos, sin, kv_heads)?;
    // The cache keeps [B, T, KVH D], the layout the attention reads.
    let (k, v) = cache.update(layer, &k, v, 1)?;
    crate::ops::attention::attention(&q, &k, &v, mask, (heads, kv_heads), scale)
}

pub use super::cache::positions_from_mask;

/// The additive attention mask [B, 1, Tq, Tk] for queries at the last `tq` of `tk` key positions:
/// a key is visible when it is a real token (mask 1), and, for causal models, not after the
/// query; with a sliding window w, only keys with q - k < w are visible, q and k counted in
/// real tokens (position ids), so that padding inside a row (a shared prefix padded to the
/// batch's longest, then the rest) does not narrow the window.
pub fn additive_mask(
    key_mask: &[Vec<u32>],
    tq: usize,
    causal: bool,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = key_mask.len();
    let tk = key_mask.first().map_or(0, |r| r.len());
    let offset = tk - tq;
    let mut values = Vec::with_capacity(b * tq * tk);
    for row in key_mask {
        let positions = window.map(|_| positions_from_mask(std::slice::from_ref(row)).remove(0));
        for q in 0..tq {
            let qpos = q + offset;
            for (k, &m) in row.iter().enumerate() {
                let in_window = match (window, &positions) {
                    (Some(w), Some(p)) => p[qpos] < p[k] + w as u32,
                    _ => true,
                };
                let visible = m == 1 && (!causal || k <= qpos) && in_window;
                values.push(if visible { 0f32 } else { MASK_VALUE as f32 });
            }
        }
    }
    Tensor::from_vec(values, (b, 1, tq, tk), device)
}

/// A [B, T] 0/1 mask as nested vectors (from a u32/i64 tensor).
pub fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    mask.to_dtype(DType::U32)?.to_vec2::<u32>()
}

/// Layers built from a model's parameters (here, beside the layers, so that the parameter
/// store does not depend on them).
impl Params {
    /// A linear layer from `{prefix}.weight` [out, in] and optionally `{prefix}.bias`, with a LoRA
    /// adapter when the module is a LoRA target.
    pub fn linear(
        &mut self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let once = self.packs(prefix);
        let weight = self.weight_as(&format!("{prefix}.weight"), &[out_dim, in_dim], once)?;
        let bias = if bias {
            Some(self.weight(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        let lora = self.lora_for(prefix, in_dim, out_dim)?;
        self.built(prefix, Linear::new(weight, bias, lora))
    }

    /// Whether the layer `prefix` is packed as it is built ([`Params::with_packing`]): frozen,
    /// without adapter.
    fn packs(&self, prefix: &str) -> bool {
        let adapted = match &self.trainable {
            Trainable::Lora(config) => {
                let module = prefix.rsplit('.').next().unwrap_or(prefix);
                config.targets.iter().any(|t| t == module)
            }
            _ => false,
        };
        !adapted && self.trainable != Trainable::All && self.packing().is_some_and(Precision::packs)
    }

    /// `linear` (the layer `prefix`), packed now when the parameters say so.
    fn built(&self, prefix: &str, mut linear: Linear) -> Result<Linear> {
        if let (true, Some(precision)) = (self.packs(prefix), self.packing()) {
            linear.pack_dropping_f32(precision)?;
        }
        Ok(linear)
    }

    /// A linear layer stored transposed, [in, out] (GPT-2's Conv1D).
    pub fn conv1d(&mut self, prefix: &str, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let once = self.packs(prefix);
        let weight = self
            .weight_as(&format!("{prefix}.weight"), &[in_dim, out_dim], once)?
            .t()?;
        let bias = Some(self.weight(&format!("{prefix}.bias"), &[out_dim])?);
        let lora = self.lora_for(prefix, in_dim, out_dim)?;
        self.built(prefix, Linear::new(weight, bias, lora))
    }

    fn lora_for(&mut self, prefix: &str, in_dim: usize, out_dim: usize) -> Result<Option<Lora>> {
        let Trainable::Lora(config) = &self.trainable else {
            return Ok(None);
        };
        let module = prefix.rsplit('.').next().unwrap_or(prefix);
        if !config.targets.iter().any(|t| t == module) {
            return Ok(None);
        }
        let config = config.clone();
        // A as nn.Linear's default (Kaiming-uniform, bound 1/sqrt(in)), B zero: the adapter starts as
        // the identity change.
        let a = self.new_var(
            &format!("{prefix}.lora_a"),
            &[config.rank, in_dim],
            1.0 / (in_dim as f64).sqrt(),
        )?;
        let b = self.new_var(&format!("{prefix}.lora_b"), &[out_dim, config.rank], 0.0)?;
        Ok(Some(Lora {
            a,
            b,
            scale: config.alpha / config.rank as f64,
            dropout: config.dropout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::activation::{gated, gelu_erf, Gate};
    use crate::ops::testing::random_f32;

    fn tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(random_f32(n, seed, scale), shape, &Device::Cpu).unwrap()
    }

    fn linear(n: usize, k: usize, seed: u64, precision: Precision) -> Linear {
        let w = tensor(&[n, k], seed, 0.2);
        let b = tensor(&[n], seed + 1, 0.5);
        let mut l = Linear::new(w, Some(b), None);
        l.set_precision(precision).unwrap();
        l
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The kept W^T: the weight transposed, made once (the same tensor on every call and in
    /// clones); none for a trained weight or a layer whose f32 weight was dropped.
    #[test]
    fn transposed_weight_is_made_once_and_only_for_frozen_f32_weights() {
        let l = linear(6, 5, 3, Precision::F32);
        let t = l.transposed().unwrap().expect("a frozen f32 weight");
        assert_eq!(t.dims(), &[5, 6]);
        assert!(t.is_contiguous());
        assert_eq!(bits(t), bits(&l.weight.t().unwrap().contiguous().unwrap()));
        let again = l.clone();
        let t2 = again.transposed().unwrap().unwrap();
        assert_eq!(t.id(), t2.id());
        let trained = Linear::new(
            candle_core::Var::from_tensor(&l.weight)
                .unwrap()
                .as_tensor()
                .clone(),
            None,
            None,
        );
        assert!(trained.transposed().unwrap().is_none());
        let mut dropped = linear(6, 5, 3, Precision::F32);
        dropped.pack_dropping_f32(Precision::Int8).unwrap();
        assert!(dropped.transposed().unwrap().is_none());
    }

    /// The GELU a product's epilogue applies: the int8 products' table ([`int8::gelu`]), else
    /// the float path's erf GELU.
    fn gelu_of(y: &Tensor, precision: Precision) -> Tensor {
        if precision != Precision::Int8 {
            return gelu_erf(y).unwrap();
        }
        let mut v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        int8::gelu::gelu_in_place(&mut v);
        Tensor::from_vec(v, y.shape(), y.device()).unwrap()
    }

    #[test]
    fn forward_then_equals_the_separate_operations_in_every_precision() {
        let (k, n) = (150, 70);
        let x = tensor(&[3, 5, k], 1, 2.0);
        let other = tensor(&[3, 5, n], 2, 3.0);
        for precision in [Precision::Int8, Precision::F32] {
            let l = linear(n, k, 3, precision);
            assert_eq!(l.int8().is_some(), precision == Precision::Int8);
            let y = l.forward(&x).unwrap();
            let cases = [
                (Epilogue::None, y.clone()),
                (Epilogue::Gelu, gelu_of(&y, precision)),
                (Epilogue::Add(&other), (&other + &y).unwrap()),
                (
                    Epilogue::Gated(Gate::Silu, &other),
                    gated(&other, &y, Gate::Silu).unwrap(),
                ),
            ];
            for (then, want) in cases {
                let got = l.forward_then(&x, then).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(bits(&got), bits(&want), "{precision:?} {then:?}");
            }
        }
        // An operand of another shape is an error, not a misread.
        let l = linear(n, k, 3, Precision::Int8);
        let wrong = tensor(&[3, 5, n + 1], 4, 1.0);
        assert!(l.forward_then(&x, Epilogue::Add(&wrong)).is_err());
    }

    #[test]
    fn a_norm_after_a_product_and_its_residual_equals_the_norm_of_the_sum() {
        // In int8 the residual is added in the product's epilogue (forward_after), or by the
        // product's tasks, which also norm the rows (after_int8, and BERT's feed-forward
        // block in gelu_mlp_norm): the same values as the sum's own op. Rows quantized by
        // those tasks give the same products as the values quantized afterwards. 3 x 5 rows
        // (fewer than a tile: no tasks) and 3 x 40.
        let (k, n) = (150, 70);
        for t in [5, 40] {
            let x = tensor(&[3, t, k], 21, 2.0);
            let residual = tensor(&[3, t, n], 22, 3.0);
            let norm = LayerNorm {
                weight: tensor(&[n], 23, 1.0),
                bias: tensor(&[n], 24, 1.0),
                eps: 1e-12,
            };
            let next = linear(k, n, 31, Precision::Int8);
            let same_rows = |got: Option<QuantizedInput>, values: &Tensor, what: &str| {
                let Some(got) = got else { return };
                let w = next.int8().unwrap();
                let want = QuantizedInput::new(values)
                    .unwrap()
                    .linear(w, None)
                    .unwrap();
                assert_eq!(bits(&got.linear(w, None).unwrap()), bits(&want), "{what}");
            };
            for precision in [Precision::Int8, Precision::F32] {
                let l = linear(n, k, 25, precision);
                let want = norm
                    .forward_residual(&l.forward(&x).unwrap(), &residual)
                    .unwrap();
                let got = norm.forward_after(&l, &x, &residual).unwrap();
                assert_eq!(bits(&got), bits(&want), "{precision:?}");
                if let Some(w) = l.int8() {
                    let rows = QuantizedInput::new(&x).unwrap();
                    for quantize in [false, true] {
                        let (got, q) = norm
                            .after_int8(&rows, (w, l.bias.as_ref()), &residual, quantize)
                            .unwrap();
                        assert_eq!(bits(&got), bits(&want), "after_int8 {t} {quantize}");
                        assert!(quantize || q.is_none());
                        same_rows(q, &want, "after_int8 rows");
                    }
                }
                // up [k, n] then down [n, k] with a GELU between, the block's input as residual.
                let (up, down) = (linear(k, n, 26, precision), linear(n, k, 27, precision));
                let block = LayerNorm {
                    weight: tensor(&[n], 28, 1.0),
                    bias: tensor(&[n], 29, 1.0),
                    eps: 1e-12,
                };
                let input = tensor(&[3, t, n], 30, 1.0);
                let mlp = gelu_mlp(&input, &up, &down).unwrap();
                let want = block.forward_residual(&mlp, &input).unwrap();
                let ahead = QuantizedInput::new(&input).unwrap();
                for quantized in [None, Some(ahead)] {
                    let (got, rows) =
                        gelu_mlp_norm(&input, quantized, (&up, &down), &block, true).unwrap();
                    assert_eq!(bits(&got), bits(&want), "{precision:?} {t}");
                    same_rows(rows, &want, "gelu_mlp_norm rows");
                }
            }
        }
    }

    #[test]
    fn int8_self_attention_equals_its_steps() {
        // Four heads of 16, padded keys. Sequences of 16 (tasks of four: 64 rows, then 32);
        // of 13 (tasks of five, 65 rows, starting off the tiles' rows, and a last one of 13,
        // below a tile); 2 x 5 rows: fewer than a tile, the separate steps.
        let (h, heads, scale) = (64, 4, 0.25);
        let [q, k, v] = [22, 24, 26].map(|seed| linear(h, h, seed, Precision::Int8));
        let out = linear(h, h, 28, Precision::Int8);
        for (b, t) in [(6, 16), (11, 13), (2, 5)] {
            let x = tensor(&[b, t, h], 21, 1.5);
            let key_mask: Vec<Vec<u32>> = (0..b)
                .map(|i| (0..t).map(|j| u32::from(j + i % 4 < t)).collect())
                .collect();
            let mask = additive_mask(&key_mask, t, false, None, &Device::Cpu).unwrap();
            let [qs, ks, vs] = project_shared(&x, [&q, &k, &v]).unwrap();
            let attn =
                crate::ops::attention::attention(&qs, &ks, &vs, &mask, (heads, heads), scale);
            let want = out.forward(&attn.unwrap()).unwrap();
            let fused = int8_self_attention(&x, None, [&q, &k, &v], &mask, heads, scale).unwrap();
            match fused {
                Some(a) => {
                    let got = a.linear(out.int8().unwrap(), out.bias.as_ref()).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(bits(&got), bits(&want), "{b} x {t}");
                }
                None => assert!(
                    b * t < 16 || !int8::Kernel::Amx.available(),
                    "{b} x {t}: the path runs with AMX"
                ),
            }
        }
        // An f32 layer among them: the separate steps.
        let x = tensor(&[6, 16, h], 29, 1.0);
        let mask = additive_mask(&vec![vec![1; 16]; 6], 16, false, None, &Device::Cpu).unwrap();
        let f = linear(h, h, 30, Precision::F32);
        let fused = int8_self_attention(&x, None, [&q, &k, &f], &mask, heads, scale).unwrap();
        assert!(fused.is_none());
    }

    #[test]
    fn int8_gated_mlp_with_large_weights_equals_its_steps() {
        // Gate and up weights beyond half of L2 (1.1 MB) and 200 rows: with AMX (and an L2 of
        // at most 2 MB) the down projection quantizes its rows beside its tiles in several
        // row groups (QuantizedInput::gated_then_linear); elsewhere the other paths. The same
        // bits as the separate steps either way.
        let (h, i) = (64, 8960);
        let x = tensor(&[5, 40, h], 31, 1.5);
        let residual = tensor(&[5, 40, h], 32, 1.0);
        let [gate, up, down] = [(i, h, 33), (i, h, 34), (h, i, 35)]
            .map(|(n, k, seed)| linear(n, k, seed, Precision::Int8));
        let act = Gate::Silu;
        let h_steps = gated(&gate.forward(&x).unwrap(), &up.forward(&x).unwrap(), act).unwrap();
        let steps = (&residual + &down.forward(&h_steps).unwrap()).unwrap();
        let fused = gated_mlp(&x, (&gate, &up, &down), act, Some(&residual)).unwrap();
        assert_eq!(fused.dims(), &[5, 40, h]);
        assert_eq!(bits(&fused), bits(&steps));
    }

    #[test]
    fn int8_gated_mlp_with_residual_equals_its_steps() {
        // 208 intermediate values: gate and up in one product where the kernel allows it
        // (QuantizedInput::gated_quantized); 200: two products.
        for i in [200, 208] {
            gated_mlp_steps(96, i);
        }
    }

    fn gated_mlp_steps(h: usize, i: usize) {
        let x = tensor(&[2, 7, h], 5, 1.5);
        let residual = tensor(&[2, 7, h], 6, 1.0);
        let [gate, up, down] = [(i, h, 7), (i, h, 9), (h, i, 11)]
            .map(|(n, k, seed)| linear(n, k, seed, Precision::Int8));
        for act in [Gate::Silu, Gate::GeluTanh] {
            let steps = down
                .forward(&gated(&gate.forward(&x).unwrap(), &up.forward(&x).unwrap(), act).unwrap())
                .unwrap();
            let fused = gated_mlp(&x, (&gate, &up, &down), act, None).unwrap();
            assert_eq!(bits(&fused), bits(&steps), "{act:?}");
            let with = gated_mlp(&x, (&gate, &up, &down), act, Some(&residual)).unwrap();
            assert_eq!(bits(&with), bits(&(&residual + &steps).unwrap()), "{act:?}");
            // In chunks of 16 rows (14 rows here: one chunk) and of 16 of 40 rows (three).
            let layers = (&gate, &up, &down);
            let chunked = int8_gated_mlp(&x, layers, act, Some(&residual), 16 * 4 * i);
            let chunked = chunked.unwrap().expect("packed in int8");
            assert_eq!(bits(&chunked), bits(&with), "{act:?}");
            let x40 = tensor(&[5, 8, h], 7, 1.5);
            let r40 = tensor(&[5, 8, h], 8, 1.0);
            let whole = int8_gated_mlp(&x40, layers, act, Some(&r40), usize::MAX);
            let whole = whole.unwrap().expect("packed in int8");
            let parts = int8_gated_mlp(&x40, layers, act, Some(&r40), 16 * 4 * i);
            let parts = parts.unwrap().expect("packed in int8");
            assert_eq!(parts.dims(), &[5, 8, h]);
            assert_eq!(bits(&parts), bits(&whole), "{act:?}");
        }
    }
}
