//! The f64 probe objectives (`train::objectives`, formulas in `losses::native`) against the candle
//! losses they replace in the probe solver (differentiated by candle's autograd through
//! `TensorObjective`), and their gradients against finite differences: every method, K = 2 and
//! K = 3, both evidence functions, several points of the continuation, logits past the clamp.

use candle_core::{Device, Tensor};
use ws2s::losses::{self, native, Evidence};
use ws2s::rng::Rng;
use ws2s::train::convex::{
    fit_cv, stratified_folds, EvalPoint, Matrix, Objective, SoftXent, SolverConfig,
};
use ws2s::train::objectives::MethodObjective;
use ws2s::train::probe::{Step, TensorObjective};

type Rows = Vec<Vec<f64>>;

fn random_probs(rng: &mut Rng, n: usize, k: usize) -> Rows {
    (0..n)
        .map(|_| {
            let raw: Vec<f64> = (0..k).map(|_| rng.next_f64() + 0.02).collect();
            let s: f64 = raw.iter().sum();
            raw.iter().map(|v| v / s).collect()
        })
        .collect()
}

fn random_logits(rng: &mut Rng, len: usize, scale: f64) -> Vec<f64> {
    (0..len)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) * scale)
        .collect()
}

fn tensor(rows: &Rows) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn pick(t: &Tensor, step: &Step) -> anyhow::Result<Tensor> {
    let idx: Vec<u32> = step.batch.iter().map(|&i| i as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
    Ok(t.index_select(&idx, 0)?)
}

fn numeric_grad(f: &dyn Fn(&[f64]) -> f64, z: &[f64]) -> Vec<f64> {
    (0..z.len())
        .map(|j| {
            let h = 1e-6;
            let (mut a, mut b) = (z.to_vec(), z.to_vec());
            a[j] += h;
            b[j] -= h;
            (f(&a) - f(&b)) / (2.0 * h)
        })
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Value and gradient of both objectives agree at random logits (rows in shuffled order, a
/// random anchor) for each progress; the native gradient matches finite differences.
fn compare(native: &dyn Objective, reference: &dyn Objective, n: usize, k: usize, what: &str) {
    assert_eq!(native.staged(), reference.staged(), "{what}: staged");
    let mut rng = Rng::new(31 + k as u64);
    let mut rows: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut rows);
    rows.truncate(n - 3);
    for (trial, progress) in [0.0, 0.3, 0.75, 1.0].into_iter().enumerate() {
        let z = random_logits(&mut rng, rows.len() * k, 1.0 + 2.0 * trial as f64);
        let anchor = random_logits(&mut rng, rows.len() * k, 2.0);
        let point = EvalPoint {
            rows: &rows,
            progress,
            anchor: &anchor,
        };
        let (v1, g1) = native.loss(&z, &point).unwrap();
        let (v2, g2) = reference.loss(&z, &point).unwrap();
        assert!(
            (v1 - v2).abs() <= 1e-11 * v2.abs().max(1.0),
            "{what} progress {progress}: value {v1} vs candle {v2}"
        );
        let scale = g2.iter().fold(1e-3f64, |m, g| m.max(g.abs()));
        assert!(
            max_diff(&g1, &g2) <= 1e-10 * scale,
            "{what} progress {progress}: gradient differs by {}",
            max_diff(&g1, &g2)
        );
        let f = |zz: &[f64]| native.loss(zz, &point).unwrap().0;
        let numeric = numeric_grad(&f, &z);
        assert!(
            max_diff(&g1, &numeric) <= 1e-6 * scale.max(1.0),
            "{what} progress {progress}: gradient vs finite differences {}",
            max_diff(&g1, &numeric)
        );
    }
}

#[test]
fn logconf_and_product_equal_their_candle_forms() {
    for k in [2, 3] {
        let n = 40;
        let mut rng = Rng::new(5);
        let weak = random_probs(&mut rng, n, k);
        let y = tensor(&weak);
        let (a_max, warmup) = (0.75, 0.5);
        let logconf = |logits: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
            let a = losses::ramp(step.progress, a_max, warmup);
            Ok(losses::logconf_anchored(
                logits,
                step.anchor.unwrap(),
                &pick(&y, step)?,
                a,
            )?)
        };
        let product = |logits: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
            Ok(losses::product_anchored(
                logits,
                step.anchor.unwrap(),
                &pick(&y, step)?,
            )?)
        };
        let reference = |loss| TensorObjective {
            loss,
            classes: k,
            staged: true,
        };
        compare(
            &MethodObjective::Logconf {
                weak: &weak,
                a_max,
                warmup,
            },
            &reference(&logconf),
            n,
            k,
            &format!("logconf K={k}"),
        );
        compare(
            &MethodObjective::Product { weak: &weak },
            &reference(&product),
            n,
            k,
            &format!("product K={k}"),
        );
    }
}

#[test]
fn edl_and_edl_step_equal_their_candle_forms() {
    for k in [2, 3] {
        for evidence in [Evidence::Exp { clamp: 10.0 }, Evidence::Softplus] {
            let n = 30;
            let mut rng = Rng::new(k as u64);
            let weak: Vec<Rows> = (0..3).map(|_| random_probs(&mut rng, n, k)).collect();
            let tensors: Vec<Tensor> = weak.iter().map(tensor).collect();
            let weights = [0.5, 0.2, 0.3];
            let c = 0.4;
            for step_mix in [None, Some((0.2, 0.25))] {
                let loss = |logits: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
                    let ys: Vec<Tensor> = tensors
                        .iter()
                        .map(|t| pick(t, step))
                        .collect::<anyhow::Result<_>>()?;
                    let lambda = losses::ramp(step.progress, c, 1.0);
                    Ok(match step_mix {
                        None => losses::edl(logits, &ys, &weights, lambda, evidence)?,
                        Some((a_max, warmup)) => losses::edl_step_anchored(
                            logits,
                            step.anchor.unwrap(),
                            &ys,
                            &weights,
                            lambda,
                            losses::ramp(step.progress, a_max, warmup),
                            evidence,
                        )?,
                    })
                };
                compare(
                    &MethodObjective::Edl {
                        weak: &weak,
                        weights: &weights,
                        c,
                        evidence,
                        step: step_mix,
                    },
                    &TensorObjective {
                        loss: &loss,
                        classes: k,
                        staged: true,
                    },
                    n,
                    k,
                    &format!("edl K={k} {evidence:?} step {step_mix:?}"),
                );
            }
        }
    }
}

#[test]
fn dirichlet_multinomial_equals_its_candle_form() {
    for k in [2, 3] {
        for evidence in [Evidence::Exp { clamp: 10.0 }, Evidence::Softplus] {
            let n = 25;
            let mut rng = Rng::new(77);
            // Hard-label counts of four weak models.
            let counts: Rows = (0..n)
                .map(|_| {
                    let mut c = vec![0.0; k];
                    for _ in 0..4 {
                        c[(rng.next_f64() * k as f64) as usize % k] += 1.0;
                    }
                    c
                })
                .collect();
            let t = tensor(&counts);
            let loss = |logits: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
                Ok(losses::dirichlet_multinomial(
                    logits,
                    &pick(&t, step)?,
                    evidence,
                )?)
            };
            compare(
                &MethodObjective::DirichletMultinomial {
                    counts: &counts,
                    evidence,
                },
                &TensorObjective {
                    loss: &loss,
                    classes: k,
                    staged: false,
                },
                n,
                k,
                &format!("dirichlet-multinomial K={k} {evidence:?}"),
            );
        }
    }
}

#[test]
fn exp_evidence_passes_no_gradient_past_its_clamp() {
    let evidence = Evidence::Exp { clamp: 3.0 };
    // Logits past +-3 on class 1 of both rows: only class 0's logits move the loss.
    let z = [0.5, 4.0, -0.2, -5.0];
    let weak = vec![vec![0.3, 0.7, 0.6, 0.4]];
    let (_, g) = native::edl(&z, 2, (&weak, &[1.0]), 0.5, evidence);
    assert_eq!(g[1], 0.0);
    assert_eq!(g[3], 0.0);
    assert!(g[0] != 0.0 && g[2] != 0.0);
    // At the bound exactly, half of it (as candle's maximum / minimum).
    let (a, d) = native::alpha_of(3.0, evidence);
    assert_eq!(a, 3f64.exp() + 1.0);
    assert_eq!(d, 0.5 * 3f64.exp());
}

#[test]
fn balanced_hardening_keeps_the_weak_class_rate() {
    // Weak rate of class 1: 0.25 -> the top quarter of p_1 (one row of four) is class 1.
    let probs = [0.9, 0.1, 0.2, 0.8, 0.6, 0.4, 0.7, 0.3];
    let weak = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0];
    let hard = native::balanced_hard(&probs, &weak, 2);
    assert_eq!(hard, vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]);
    // K = 3: the argmax, the first on ties.
    let hard = native::balanced_hard(&[0.2, 0.4, 0.4, 0.5, 0.3, 0.2], &[0.0; 6], 3);
    assert_eq!(hard, vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
    // candle's argmax (edl_step's anchor) breaks ties the same way.
    let tied = Tensor::new(&[[0.2f64, 0.4, 0.4], [0.5, 0.5, 0.5]], &Device::Cpu).unwrap();
    let idx = tied.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(idx, vec![1, 0]);
    let mixed = native::step_targets(&[0.2, 0.4, 0.4, 0.5, 0.5, 0.5], &[0.0; 6], 3, 1.0);
    assert_eq!(mixed, vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn a_probe_solved_natively_equals_the_candle_solve() {
    // The whole cross-validated fit (every fold, grid value and stage) with the native EDL
    // objective and with candle's: same chosen C, weights equal to the solver's tolerance.
    let (n, d, k) = (60, 5, 2);
    let mut rng = Rng::new(3);
    let x = Matrix::new(n, d, random_logits(&mut rng, n * d, 1.0)).unwrap();
    let weak: Vec<Rows> = (0..2).map(|_| random_probs(&mut rng, n, k)).collect();
    let tensors: Vec<Tensor> = weak.iter().map(tensor).collect();
    let weights = [0.6, 0.4];
    let evidence = Evidence::Exp { clamp: 10.0 };
    let loss = |logits: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        let ys: Vec<Tensor> = tensors
            .iter()
            .map(|t| pick(t, step))
            .collect::<anyhow::Result<_>>()?;
        let lambda = losses::ramp(step.progress, 0.5, 1.0);
        Ok(losses::edl(logits, &ys, &weights, lambda, evidence)?)
    };
    let reference = TensorObjective {
        loss: &loss,
        classes: k,
        staged: true,
    };
    let objective = MethodObjective::Edl {
        weak: &weak,
        weights: &weights,
        c: 0.5,
        evidence,
        step: None,
    };
    let targets = ws2s::supervision::weighted_average(&weak, &weights);
    let strata: Vec<usize> = targets.iter().map(|t| usize::from(t[1] > t[0])).collect();
    let folds = stratified_folds(&strata, 3, 1);
    let config = SolverConfig {
        folds: 3,
        c_steps: 4,
        c_min: 1e-2,
        tol: 1e-9,
        stages: 2,
        ..SolverConfig::default()
    };
    let (m1, r1) = fit_cv(&x, k, &objective, &targets, &folds, &config).unwrap();
    let (m2, r2) = fit_cv(&x, k, &reference, &targets, &folds, &config).unwrap();
    assert_eq!(r1.chosen_c, r2.chosen_c);
    assert!(max_diff(&r1.scores, &r2.scores) < 1e-8, "{r1:?} {r2:?}");
    assert!(max_diff(&m1.weights, &m2.weights) < 1e-6);
    assert!(max_diff(&m1.bias, &m2.bias) < 1e-6);
    // SoftXent on the average is a different loss: a sanity check that the comparison can fail.
    let (m3, _) = fit_cv(
        &x,
        k,
        &SoftXent { targets: &targets },
        &targets,
        &folds,
        &config,
    )
    .unwrap();
    assert!(max_diff(&m1.weights, &m3.weights) > 1e-3);
}

#[test]
fn a_cross_entropy_needs_no_anchor_and_a_staged_loss_rejects_a_wrong_one() {
    let targets = vec![vec![0.3, 0.7], vec![1.0, 0.0]];
    let rows = [1usize, 0];
    let z = [0.0, 0.4, 0.0, -1.0];
    let bare = EvalPoint {
        rows: &rows,
        progress: 1.0,
        anchor: &[],
    };
    let (value, grad) = SoftXent { targets: &targets }.loss(&z, &bare).unwrap();
    // Row 0 is target [1, 0] at logits [0, 0.4]; row 1 is [0.3, 0.7] at [0, -1].
    let lse = |s: f64| (1.0 + s.exp()).ln();
    let want = (lse(0.4) + lse(-1.0) + 0.7) / 2.0;
    assert!((value - want).abs() < 1e-15, "{value} {want}");
    assert_eq!(grad.len(), 4);
    let staged = MethodObjective::Product { weak: &targets };
    let err = staged.loss(&z, &bare).unwrap_err().to_string();
    assert!(err.contains("anchor"), "{err}");
}
