//! Custom operations with their own backward pass.

pub mod activation;
pub mod aligned;
pub mod attention;
pub mod attention_infer;
pub mod bf16x2;
pub mod decoder;
pub mod encoder;
pub mod head;
pub mod int8;
pub mod linear;
pub mod lora;
pub mod mlp;
pub mod norm;
pub mod real;
pub mod rope;
pub mod rowgrad;
pub mod simd;
pub mod skinny;
pub mod softmax;
pub mod special;

/// The number type of the frozen products of inference (feature extraction, scoring,
/// decoding). Training always computes in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 weights and products: the reference.
    F32,
    /// int8 weights (a scale per output column) and activations (a scale per row), both
    /// rotated first (random signs and a Walsh-Hadamard transform), exact integer dot products
    /// ([`int8`]).
    Int8,
    /// bf16 weights and activations on a GPU (candle's CUDA kernels; models loaded on a GPU
    /// get bf16 frozen weights, see `runtime::frozen_dtype`). Nothing is packed.
    Bf16,
    /// On a CPU with AVX512-BF16 or Intel AMX-BF16: bf16 weights (lossless for checkpoints
    /// stored in bf16) and each activation as a pair of bf16 (hi + lo, 16 significant bits),
    /// products by `vdpbf16ps` or on the AMX tiles with f32 sums ([`bf16x2`]).
    Bf16x2,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
            Precision::Bf16x2 => "bf16x2",
        }
    }

    /// The kernel that computes this precision's products here: for f32, gemm and the
    /// few-rows kernel of decoding ("gemm-f32+rows-avx512", see [`skinny`]); for int8 the
    /// kernel detected at run time ("amx", "vnni512", "avxvnni", "avx2", "scalar").
    pub fn kernel(self) -> &'static str {
        match self {
            Precision::F32 => skinny::Kernel::detected().label(),
            Precision::Int8 => int8::Kernel::detected().name(),
            Precision::Bf16 => "cuda",
            Precision::Bf16x2 => bf16x2::Kernel::detected().name(),
        }
    }

    /// Whether frozen linear layers are packed for this precision (int8, bf16x2: the CPU's
    /// packed products); f32 and a GPU's bf16 use the weights as loaded.
    pub fn packs(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Bf16x2)
    }

    /// The type the frozen weights are loaded in (bf16 for [`Precision::Bf16`], else f32; int8
    /// packs f32 weights after loading).
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F32 | Precision::Int8 | Precision::Bf16x2 => candle_core::DType::F32,
        }
    }

    /// The fastest precision on this CPU that passes the accuracy check of `purpose`
    /// (docs/results/inference.md): for features, int8 where the CPU has 8-bit dot products
    /// (AVX-512 VNNI, AMX or AVX-VNNI; probes on int8 features are within 0.01 of f32's
    /// accuracy), else f32 (int8 by widening to 16 bits is not faster than f32's FMA there);
    /// for decoding and scoring,
    /// bf16x2 where the CPU has AVX512-BF16 or AMX-BF16 (its greedy continuations are f32's on
    /// 96-99 of 100 prompts; faster than f32 on both: its weights are half the bytes), else f32
    /// (int8's greedy continuations are not identical often enough); decoding screens the head
    /// in int8 where the CPU has VNNI, which keeps f32's tokens, see [`head`].
    pub fn fastest_for(purpose: Purpose) -> Precision {
        match purpose {
            Purpose::Features if int8::Kernel::dot_products_available() => Precision::Int8,
            Purpose::Decoding if bf16x2::available() => Precision::Bf16x2,
            _ => Precision::F32,
        }
    }
}

/// The environment variables that choose kernels (`WS2S_MAX_ISA`, `WS2S_INT8_KERNEL`),
/// checked: an error that names the variable and what it accepts instead of a silent fallback.
pub fn check_env() -> Result<(), String> {
    simd::check_max_isa()?;
    int8::Kernel::check_env()
}

/// What a forward pass is for: each use has its own accuracy check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Hidden states for probes (feature extraction).
    Features,
    /// Token log-probabilities and continuations (decoding, scoring).
    Decoding,
}

/// Helpers shared by the ops' tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::rng::Rng;
    use candle_core::{Device, Tensor};

    /// f64 values uniform in (-scale, scale), seeded.
    pub fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// f32 values uniform in (-scale, scale), seeded, as a vector.
    pub fn random_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// f64 values uniform in (-1, 1), seeded.
    pub fn random_unit(shape: &[usize], seed: u64) -> Tensor {
        random(shape, seed, 1.0)
    }

    /// x W^T + b by candle's own ops (the reference for the fused products).
    pub fn plain_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    /// A scalar loss that weights every output element differently.
    pub fn probe_loss(y: &Tensor, seed: u64) -> Tensor {
        let p = random(y.dims(), seed, 1.0);
        (y * p).unwrap().sum_all().unwrap()
    }

    /// The largest absolute elementwise difference of two f64 tensors.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}
