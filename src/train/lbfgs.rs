//! L-BFGS with a strong-Wolfe line search: the solver of the linear probes' convex objectives
//! ([`super::convex`]).

/// a . b: [`crate::ops::simd::dot_f64`] (one summation order on every CPU).
pub(crate) use crate::ops::simd::dot_f64 as dot;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// L-BFGS (memory 10) with a strong-Wolfe line search; stops when max |g| <= tol, or (also
/// counted as converged, as scipy's L-BFGS-B does) when three steps in a row reduce f by no more
/// than 64 machine epsilons relative to max(|f|, 1): the objective cannot be resolved further.
pub fn lbfgs(
    f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>)>,
    x0: Vec<f64>,
    tol: f64,
    max_iter: usize,
) -> Result<(Vec<f64>, SolveReport)> {
    lbfgs_traced(f, x0, (tol, max_iter), &[], &mut |_, _, _| {})
}

/// [`lbfgs`], calling `on_iteration(iteration, f, max |g|)` after every accepted step. Where
/// `unscale` is not empty, x holds scaled variables x_i = unscale_i * theta_i: f's gradient in x
/// is theta's divided by `unscale`, and the stopping test, the reported max |g| and
/// `on_iteration` use theta's, g_i * unscale_i.
pub fn lbfgs_traced(
    mut f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>)>,
    x0: Vec<f64>,
    (tol, max_iter): (f64, usize),
    unscale: &[f64],
    on_iteration: &mut dyn FnMut(usize, f64, f64),
) -> Result<(Vec<f64>, SolveReport)> {
    const MEMORY: usize = 10;
    let mut x = x0;
    let (mut fx, mut g) = f(&x)?;
    let mut evaluations = 1;
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::new();
    let gmax = |g: &[f64]| {
        if unscale.is_empty() {
            g.iter().fold(0.0f64, |m, v| m.max(v.abs()))
        } else {
            g.iter()
                .zip(unscale)
                .fold(0.0f64, |m, (v, s)| m.max((v * s).abs()))
        }
    };
    let mut iterations = 0;
    let mut stalled = 0;
    let mut at_precision = false;
    while gmax(&g) > tol && iterations < max_iter {
        if !fx.is_finite() {
            bail!("the probe objective is not finite ({fx})");
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = history
            .back()
            .map_or(1.0 / dot(&g, &g).sqrt().max(1e-12), |(s, y, _)| {
                dot(s, y) / dot(y, y)
            });
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (non-convex loss): restart from steepest descent.
            history.clear();
            let scale = 1.0 / dot(&g, &g).sqrt().max(1e-12);
            d = g.iter().map(|v| -v * scale).collect();
            slope = dot(&g, &d);
        }
        let (step, fnew, gnew, used) = wolfe(&mut f, &x, fx, slope, &d)?;
        evaluations += used;
        iterations += 1;
        if step == 0.0 {
            // No decrease found along d.
            if history.is_empty() {
                break;
            }
            history.clear();
            continue;
        }
        let s: Vec<f64> = d.iter().map(|v| v * step).collect();
        let xnew: Vec<f64> = x.iter().zip(&s).map(|(a, b)| a + b).collect();
        let y: Vec<f64> = gnew.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).sqrt() * dot(&s, &s).sqrt() {
            if history.len() == MEMORY {
                history.pop_front();
            }
            history.push_back((s, y, 1.0 / sy));
        }
        let decrease = fx - fnew;
        x = xnew;
        g = gnew;
        if decrease <= 64.0 * f64::EPSILON * fx.abs().max(1.0) {
            stalled += 1;
            if stalled >= 3 {
                fx = fnew;
                at_precision = true;
                on_iteration(iterations, fx, gmax(&g));
                break;
            }
        } else {
            stalled = 0;
        }
        fx = fnew;
        on_iteration(iterations, fx, gmax(&g));
    }
    let grad_max = gmax(&g);
    Ok((
        x,
        SolveReport {
            iterations,
            evaluations,
            grad_max,
            converged: grad_max <= tol || at_precision,
            objective: fx,
        },
    ))
}

/// Strong-Wolfe line search (Nocedal & Wright, algorithms 3.5 and 3.6; c1 = 1e-4, c2 = 0.9)
/// from step 1 with bracketing and safeguarded cubic interpolation. Returns (step, f, g,
/// evaluations); step 0 when no acceptable step was found.
#[allow(clippy::type_complexity)]
fn wolfe(
    f: &mut impl FnMut(&[f64]) -> Result<(f64, Vec<f64>)>,
    x: &[f64],
    f0: f64,
    d0: f64,
    d: &[f64],
) -> Result<(f64, f64, Vec<f64>, usize)> {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    let mut evaluations = 0;
    let mut eval = |a: f64| -> Result<(f64, f64, Vec<f64>)> {
        let point: Vec<f64> = x.iter().zip(d).map(|(xi, di)| xi + a * di).collect();
        let (fa, ga) = f(&point)?;
        let slope = dot(&ga, d);
        Ok((fa, slope, ga))
    };
    let (mut a_lo, mut f_lo, mut d_lo) = (0.0, f0, d0);
    let mut a = 1.0;
    let mut best: Option<(f64, f64, Vec<f64>)> = None;
    let mut hi: Option<(f64, f64, f64)> = None;
    for _ in 0..20 {
        let (fa, da, ga) = eval(a)?;
        evaluations += 1;
        if !fa.is_finite() || fa > f0 + C1 * a * d0 || fa >= f_lo && a_lo > 0.0 {
            hi = Some((a, if fa.is_finite() { fa } else { f64::MAX }, da));
            break;
        }
        if da.abs() <= -C2 * d0 {
            return Ok((a, fa, ga, evaluations));
        }
        best = Some((a, fa, ga));
        if da >= 0.0 {
            hi = Some((a_lo, f_lo, d_lo));
            a_lo = a;
            f_lo = fa;
            d_lo = da;
            break;
        }
        a_lo = a;
        f_lo = fa;
        d_lo = da;
        a *= 2.0;
    }
    let Some((mut a_hi, mut f_hi, mut d_hi)) = hi else {
        // Kept extending: take the last point that decreased enough.
        return Ok(match best {
            Some((a, fa, ga)) => (a, fa, ga, evaluations),
            None => (0.0, f0, vec![], evaluations),
        });
    };
    for _ in 0..30 {
        let a_j = interpolate(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi);
        let (fa, da, ga) = eval(a_j)?;
        evaluations += 1;
        if !fa.is_finite() || fa > f0 + C1 * a_j * d0 || fa >= f_lo {
            a_hi = a_j;
            f_hi = if fa.is_finite() { fa } else { f64::MAX };
            d_hi = da;
        } else {
            if da.abs() <= -C2 * d0 {
                return Ok((a_j, fa, ga, evaluations));
            }
            if da * (a_hi - a_lo) >= 0.0 {
                a_hi = a_lo;
                f_hi = f_lo;
                d_hi = d_lo;
            }
            a_lo = a_j;
            f_lo = fa;
            d_lo = da;
            best = Some((a_j, fa, ga));
        }
        if (a_hi - a_lo).abs() < 1e-16 * a_lo.abs().max(1e-16) {
            break;
        }
    }
    // The interval collapsed: accept the best sufficient-decrease point seen, if any.
    Ok(match best {
        Some((a, fa, ga)) if a == a_lo => (a, fa, ga, evaluations),
        _ => (0.0, f0, vec![], evaluations),
    })
}

/// Minimiser of the cubic through (a, fa, da) and (b, fb, db), kept within the middle 80% of the
/// interval (bisection when the cubic has no usable minimiser).
fn interpolate(a: f64, fa: f64, da: f64, b: f64, fb: f64, db: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let margin = 0.1 * (hi - lo);
    let mid = 0.5 * (a + b);
    if !(fb.is_finite() && fb < f64::MAX) {
        return mid;
    }
    let d1 = da + db - 3.0 * (fa - fb) / (a - b);
    let disc = d1 * d1 - da * db;
    if disc < 0.0 {
        return mid;
    }
    let d2 = (b - a).signum() * disc.sqrt();
    let t = b - (b - a) * (db + d2 - d1) / (db - da + 2.0 * d2);
    if t.is_finite() {
        t.clamp(lo + margin, hi - margin)
    } else {
        mid
    }
}

/// How one solve ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SolveReport {
    pub iterations: usize,
    pub evaluations: usize,
    /// Largest absolute gradient entry at the solution.
    pub grad_max: f64,
    pub converged: bool,
    pub objective: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f(theta) = sum_i a_i theta_i^2 / 2 - b_i theta_i with curvatures spread over six orders:
    /// minimised in theta, or in x = sqrt(a) theta (f's gradient in x is theta's / sqrt(a)),
    /// both reach theta = b / a; the scaled solve needs far fewer evaluations, and its stopping
    /// test and reported gradient are theta's.
    #[test]
    fn scaled_variables_reach_the_same_optimum_with_theta_gradient_reported() {
        let n = 40;
        let a: Vec<f64> = (0..n)
            .map(|i| 10f64.powf(6.0 * i as f64 / (n - 1) as f64 - 3.0))
            .collect();
        let b: Vec<f64> = (0..n).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
        let grad_theta = |t: &[f64]| -> Vec<f64> {
            t.iter()
                .zip(&a)
                .zip(&b)
                .map(|((t, a), b)| a * t - b)
                .collect()
        };
        let value = |t: &[f64]| -> f64 {
            t.iter()
                .zip(&a)
                .zip(&b)
                .map(|((t, a), b)| a * t * t / 2.0 - b * t)
                .sum()
        };
        let tol = 1e-8;
        let (plain, plain_report) = lbfgs(
            |t: &[f64]| Ok((value(t), grad_theta(t))),
            vec![0.0; n],
            tol,
            10_000,
        )
        .unwrap();
        let s: Vec<f64> = a.iter().map(|a| a.sqrt()).collect();
        let (x, report) = lbfgs_traced(
            |x: &[f64]| {
                let t: Vec<f64> = x.iter().zip(&s).map(|(x, s)| x / s).collect();
                let g = grad_theta(&t).iter().zip(&s).map(|(g, s)| g / s).collect();
                Ok((value(&t), g))
            },
            vec![0.0; n],
            (tol, 10_000),
            &s,
            &mut |_, _, _| {},
        )
        .unwrap();
        let scaled: Vec<f64> = x.iter().zip(&s).map(|(x, s)| x / s).collect();
        assert!(plain_report.converged && report.converged);
        let g = grad_theta(&scaled);
        let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(gmax <= tol, "{gmax}");
        assert!(
            (report.grad_max - gmax).abs() <= 1e-6 * gmax.max(1e-300),
            "{gmax}"
        );
        for i in 0..n {
            let exact = b[i] / a[i];
            assert!((scaled[i] - exact).abs() <= 2.0 * tol / a[i], "{i}");
            let plain_tol = plain_report.grad_max.max(tol);
            assert!((plain[i] - exact).abs() <= 2.0 * plain_tol / a[i], "{i}");
        }
        assert!(report.evaluations * 3 < plain_report.evaluations);
    }
}
