//! lgamma and digamma on tensors, written from basic (differentiable) operations: neither candle
//! nor burn has them (STACK.md trap 6). For x > 0: shift to z = x + 6 with the recurrences
//! lgamma(x) = lgamma(x + 6) - log(x (x+1) ... (x+5)) and psi(x) = psi(x + 6) - sum_k 1/(x + k),
//! then the Stirling / asymptotic series, whose first omitted terms are below 1e-9 at z >= 6.
//!
//! On the CPU in f32 / f64, [`lgamma`] and [`digamma`] run as one fused elementwise pass each
//! (the same formulas on scalars, accumulated in f64) whose backward uses the exact derivative
//! (digamma, trigamma); elsewhere they are the decomposed tensor forms, which autograd
//! differentiates.

pub use crate::ops::special::{digamma_scalar, lgamma_scalar, trigamma_scalar};
use crate::ops::special::{special, Special, SHIFT};
use candle_core::{Result, Tensor};

/// log Gamma(x) for x > 0, any float dtype; the gradient is digamma.
pub fn lgamma(x: &Tensor) -> Result<Tensor> {
    match special(x, Special::Lgamma)? {
        Some(y) => Ok(y),
        None => lgamma_decomposed(x),
    }
}

/// The digamma function psi(x) = d/dx log Gamma(x) for x > 0; the gradient is trigamma.
pub fn digamma(x: &Tensor) -> Result<Tensor> {
    match special(x, Special::Digamma)? {
        Some(y) => Ok(y),
        None => digamma_decomposed(x),
    }
}

/// [`lgamma`] from basic tensor operations (any device and float dtype).
pub fn lgamma_decomposed(x: &Tensor) -> Result<Tensor> {
    // log(x (x+1) ... (x+5)) as a sum of logs: the product overflows f32 near x = 3e6.
    let mut log_product = x.log()?;
    for k in 1..SHIFT {
        log_product = (log_product + (x + k as f64)?.log()?)?;
    }
    let z = (x + SHIFT as f64)?;
    let z2 = z.sqr()?;
    let inv = z.recip()?;
    let inv2 = z2.recip()?;
    // 1/(12 z) - 1/(360 z^3) + 1/(1260 z^5) - 1/(1680 z^7)
    let series =
        (((((&inv2 * (-1.0 / 1680.0))? + 1.0 / 1260.0)? * &inv2)? - 1.0 / 360.0)? * &inv2)?;
    let series = ((series + 1.0 / 12.0)? * inv)?;
    let half_log_two_pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    let stirling = ((((&z - 0.5)? * z.log()?)? - &z)? + half_log_two_pi)?;
    (stirling + series)? - log_product
}

/// [`digamma`] from basic tensor operations (any device and float dtype).
pub fn digamma_decomposed(x: &Tensor) -> Result<Tensor> {
    let mut correction = x.recip()?;
    for k in 1..SHIFT {
        correction = (correction + (x + k as f64)?.recip()?)?;
    }
    let z = (x + SHIFT as f64)?;
    let inv = z.recip()?;
    let inv2 = inv.sqr()?;
    // -1/(12 z^2) + 1/(120 z^4) - 1/(252 z^6) + 1/(240 z^8) - 1/(132 z^10)
    let series = (((((((((&inv2 * (-1.0 / 132.0))? + 1.0 / 240.0)? * &inv2)?
        - 1.0 / 252.0)?
        * &inv2)?
        + 1.0 / 120.0)?
        * &inv2)?
        - 1.0 / 12.0)?
        * &inv2)?;
    let asymptotic = ((z.log()? - (inv * 0.5)?)? + series)?;
    asymptotic - correction
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn eval(f: fn(&Tensor) -> Result<Tensor>, xs: &[f64]) -> Vec<f64> {
        let t = Tensor::new(xs, &Device::Cpu).unwrap();
        f(&t).unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn lgamma_known_values() {
        // ln Gamma at 0.5 (ln sqrt(pi)), 1, 2, 3 (ln 2), 10 (ln 9!), 100 (ln 99!), 1e-3, 2.5
        let cases = [
            (0.5, 0.572_364_942_924_700_1),
            (1.0, 0.0),
            (2.0, 0.0),
            (3.0, std::f64::consts::LN_2),
            (10.0, 12.801_827_480_081_469),
            (100.0, 359.134_205_369_575_4),
            (1e-3, 6.907_178_885_383_853),
            (2.5, 0.284_682_870_472_919_2),
        ];
        let got = eval(lgamma, &cases.map(|c| c.0));
        for ((x, expected), g) in cases.iter().zip(got) {
            assert!(
                (g - expected).abs() < 1e-6,
                "lgamma({x}) = {g}, expected {expected}"
            );
        }
    }

    #[test]
    fn digamma_known_values() {
        let euler = 0.577_215_664_901_532_9;
        let cases = [
            (1.0, -euler),
            (0.5, -euler - 2.0 * std::f64::consts::LN_2),
            (2.0, 1.0 - euler),
            (10.0, 2.251_752_589_066_721),
            (100.0, 4.600_161_852_738_087),
            (0.01, -100.560_885_457_868_66),
        ];
        let got = eval(digamma, &cases.map(|c| c.0));
        for ((x, expected), g) in cases.iter().zip(got) {
            assert!(
                (g - expected).abs() < 1e-6,
                "digamma({x}) = {g}, expected {expected}"
            );
        }
    }

    #[test]
    fn fused_and_decomposed_agree_in_values_and_gradients() {
        let xs: Vec<f64> = (0..200)
            .map(|i| 10f64.powf(-3.0 + 8.0 * i as f64 / 199.0))
            .collect();
        for (fused, decomposed) in [
            (
                lgamma as fn(&Tensor) -> Result<Tensor>,
                lgamma_decomposed as fn(&Tensor) -> Result<Tensor>,
            ),
            (digamma, digamma_decomposed),
        ] {
            let x = candle_core::Var::new(xs.as_slice(), &Device::Cpu).unwrap();
            let a = fused(x.as_tensor()).unwrap();
            let b = decomposed(x.as_tensor()).unwrap();
            let grad = |y: &Tensor| {
                let g = y.sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap()
            };
            let (ga, gb) = (grad(&a), grad(&b));
            let (a, b) = (a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
            for i in 0..xs.len() {
                let scale = 1.0 + b[i].abs();
                assert!(
                    (a[i] - b[i]).abs() < 1e-12 * scale,
                    "{}: {} vs {}",
                    xs[i],
                    a[i],
                    b[i]
                );
                let gscale = 1.0 + gb[i].abs();
                assert!(
                    (ga[i] - gb[i]).abs() < 1e-7 * gscale,
                    "grad at {}: {} vs {}",
                    xs[i],
                    ga[i],
                    gb[i]
                );
            }
        }
    }

    #[test]
    fn huge_arguments_stay_finite_in_f32() {
        // A Dirichlet total over a vocabulary: 151,936 parameters up to e^10 + 1 each.
        let s: f64 = 151_936.0 * 22_027.0;
        let fs: [fn(&Tensor) -> Result<Tensor>; 4] =
            [lgamma, lgamma_decomposed, digamma, digamma_decomposed];
        for f in fs {
            let y = f(&Tensor::new(&[s as f32, 1e30f32], &Device::Cpu).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
        }
        // Stirling: lgamma(s) = (s - 1/2) ln s - s + ln(2 pi)/2 + 1/(12 s) + ...
        let expected = (s - 0.5) * s.ln() - s + 0.5 * (2.0 * std::f64::consts::PI).ln();
        assert!((lgamma_scalar(s) - expected).abs() < 1e-9 * expected);
        assert!((digamma_scalar(s) - (s.ln() - 0.5 / s)).abs() < 1e-9);
    }

    /// The fused pair shares one logarithm and gives both functions' values bit for bit, on
    /// both sides of the shift's threshold.
    #[test]
    fn lgamma_digamma_pair_equals_each_function() {
        for x in [
            1e-300, 1e-3, 0.5, 1.0, 2.0, 6.5, 63.999, 64.0, 1e3, 1e51, 1e300,
        ] {
            let (l, d) = crate::ops::special::lgamma_digamma(x);
            assert_eq!(l.to_bits(), lgamma_scalar(x).to_bits(), "lgamma {x}");
            assert_eq!(d.to_bits(), digamma_scalar(x).to_bits(), "digamma {x}");
        }
    }

    #[test]
    fn trigamma_known_values_and_finite_differences() {
        let pi2 = std::f64::consts::PI.powi(2);
        // psi'(1) = pi^2 / 6, psi'(1/2) = pi^2 / 2, psi'(2) = pi^2 / 6 - 1, psi'(x) ~ 1/x^2 near 0
        assert!((trigamma_scalar(1.0) - pi2 / 6.0).abs() < 1e-9);
        assert!((trigamma_scalar(0.5) - pi2 / 2.0).abs() < 1e-9);
        assert!((trigamma_scalar(2.0) - (pi2 / 6.0 - 1.0)).abs() < 1e-9);
        for x in [1e-3, 0.2, 1.3, 7.0, 55.0, 1e4] {
            let h = 1e-5 * x;
            let fd = (digamma_scalar(x + h) - digamma_scalar(x - h)) / (2.0 * h);
            assert!((trigamma_scalar(x) - fd).abs() < 1e-5 * fd.abs(), "{x}");
        }
    }

    #[test]
    fn lgamma_gradient_is_digamma_and_f32_works() {
        let x = candle_core::Var::new(&[0.3f64, 1.7, 4.0, 25.0], &Device::Cpu).unwrap();
        let grads = lgamma(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let expected = digamma(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for (g, e) in grad.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
        let x32 = Tensor::new(&[0.5f32, 10.0], &Device::Cpu).unwrap();
        let y = lgamma(&x32).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let y = y.to_vec1::<f32>().unwrap();
        assert!((y[1] - 12.801_827).abs() < 1e-4);
    }
}
