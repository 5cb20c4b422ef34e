//! Custom operations with their own backward pass.

pub mod attention;
pub mod decoder;
pub mod encoder;
pub mod fused;
pub mod int8;
pub mod linear;
pub mod simd;

/// The number type of the frozen products of inference (feature extraction, scoring,
/// decoding). Training always computes in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 weights and products: the reference.
    F32,
    /// int8 weights (a scale per output column) and activations (a scale per row and block of
    /// 64 inputs), exact integer dot products ([`int8`]).
    Int8,
}

impl Precision {
    pub const NAMES: &'static str = "auto, f32 or int8";

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }

    /// "f32", "int8", or "auto" (= [`Precision::fastest`]); `None` for anything else.
    pub fn parse(name: &str) -> Option<Precision> {
        match name {
            "f32" => Some(Precision::F32),
            "int8" => Some(Precision::Int8),
            "auto" => Some(Precision::fastest()),
            _ => None,
        }
    }

    /// The fastest precision on this CPU that passes the accuracy checks
    /// (docs/results/inference.md): int8 where the CPU has 8-bit dot products (AVX-512 VNNI),
    /// else f32 (int8 by widening to 16 bits is slower there than f32's FMA).
    pub fn fastest() -> Precision {
        if int8::Kernel::Vnni512.available() {
            Precision::Int8
        } else {
            Precision::F32
        }
    }
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
