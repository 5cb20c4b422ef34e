//! Custom operations with their own backward pass.

pub mod attention;
pub mod decoder;
pub mod encoder;
pub mod fused;
pub mod linear;
pub mod simd;

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
