//! The convex probe solver: exact reformulations, known optima, and scikit-learn's
//! LogisticRegressionCV on a committed fixture.

use candle_core::Tensor;
use ws2s::losses;
use ws2s::rng::Rng;
use ws2s::train::convex::{
    fit_cv, row_space, solve, EvalPoint, LinearModel, Matrix, Objective, SoftXent, SolverConfig,
};
use ws2s::train::lbfgs::lbfgs;
use ws2s::train::probe::{ProbeLoss, Step, TensorObjective};

fn gaussian(rng: &mut Rng) -> f64 {
    // Box-Muller.
    let u = rng.next_f64().max(1e-300);
    let v = rng.next_f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// n rows of d standard normal features; labels from a noisy linear rule over `classes`.
fn problem(n: usize, d: usize, classes: usize, seed: u64) -> (Matrix, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let data: Vec<f64> = (0..n * d).map(|_| gaussian(&mut rng)).collect();
    let x = Matrix::new(n, d, data).unwrap();
    let w: Vec<f64> = (0..classes * d).map(|_| gaussian(&mut rng)).collect();
    let labels = (0..n)
        .map(|i| {
            let scores: Vec<f64> = (0..classes)
                .map(|c| {
                    let s: f64 = x.row(i).iter().zip(&w[c * d..]).map(|(a, b)| a * b).sum();
                    s + 2.0 * gaussian(&mut rng)
                })
                .collect();
            ws2s::eval::classify::argmax(&scores)
        })
        .collect();
    (x, labels)
}

fn one_hot(labels: &[usize], k: usize) -> Vec<Vec<f64>> {
    labels
        .iter()
        .map(|&y| (0..k).map(|c| f64::from(c == y)).collect())
        .collect()
}

fn tight() -> SolverConfig {
    SolverConfig {
        tol: 1e-9,
        max_iter: 5000,
        ..SolverConfig::default()
    }
}

fn rows_of(n: usize) -> Vec<usize> {
    (0..n).collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn row_space_reconstructs_the_rows_with_an_orthonormal_basis() {
    let (mut x, _) = problem(12, 30, 2, 1);
    // A repeated row and a combination of two rows: the basis has rank 10.
    let copy = x.row(3).to_vec();
    x.data[5 * 30..6 * 30].copy_from_slice(&copy);
    let combo: Vec<f64> = x
        .row(0)
        .iter()
        .zip(x.row(1))
        .map(|(a, b)| 2.0 * a - b)
        .collect();
    x.data[7 * 30..8 * 30].copy_from_slice(&combo);
    let (basis, coords) = row_space(&x);
    assert_eq!(basis.rows, 10);
    for i in 0..basis.rows {
        for j in 0..basis.rows {
            let d: f64 = basis
                .row(i)
                .iter()
                .zip(basis.row(j))
                .map(|(a, b)| a * b)
                .sum();
            assert!((d - f64::from(i == j)).abs() < 1e-12, "q{i}.q{j} = {d}");
        }
    }
    for i in 0..x.rows {
        for c in 0..x.cols {
            let v: f64 = (0..basis.rows)
                .map(|j| coords.row(i)[j] * basis.row(j)[c])
                .sum();
            assert!((v - x.row(i)[c]).abs() < 1e-10);
        }
    }
}

#[test]
fn solving_in_the_row_space_gives_the_same_model() {
    // n < d: the penalised optimum lies in the span of the rows.
    for classes in [2, 3] {
        let (x, labels) = problem(40, 90, classes, 2);
        let targets = one_hot(&labels, classes);
        let objective = SoftXent { targets: &targets };
        let zero = LinearModel::zeros(classes, x.cols);
        let (full, report) =
            solve(&x, &rows_of(40), classes, &objective, 0.3, &zero, &tight()).unwrap();
        assert!(report.converged, "{report:?}");
        let (basis, coords) = row_space(&x);
        let zero_r = LinearModel::zeros(classes, coords.cols);
        let (reduced, _) = solve(
            &coords,
            &rows_of(40),
            classes,
            &objective,
            0.3,
            &zero_r,
            &tight(),
        )
        .unwrap();
        let lifted = reduced.lift(&basis);
        assert!(max_diff(&full.weights, &lifted.weights) < 1e-6);
        assert!(max_diff(&full.bias, &lifted.bias) < 1e-6);
        let (test, _) = problem(10, 90, classes, 3);
        assert!(max_diff(&full.logits(&test), &lifted.logits(&test)) < 1e-6);
    }
}

/// The gradient of the objective F at a point, by central differences.
fn numeric_grad(f: &dyn Fn(&[f64]) -> f64, theta: &[f64]) -> Vec<f64> {
    (0..theta.len())
        .map(|j| {
            let h = 1e-6;
            let mut a = theta.to_vec();
            let mut b = theta.to_vec();
            a[j] += h;
            b[j] -= h;
            (f(&a) - f(&b)) / (2.0 * h)
        })
        .collect()
}

#[test]
fn native_soft_xent_equals_the_candle_loss_in_value_and_gradient() {
    let (x, labels) = problem(25, 4, 3, 4);
    let mut rng = Rng::new(9);
    // Soft, unnormalised targets (as the naive multi-weak sum of weighted labels).
    let targets: Vec<Vec<f64>> = labels
        .iter()
        .map(|_| (0..3).map(|_| 0.7 * rng.next_f64()).collect())
        .collect();
    let flat: Vec<f64> = targets.iter().flatten().copied().collect();
    let tensor = Tensor::from_vec(flat, (25, 3), &candle_core::Device::Cpu).unwrap();
    let loss = |logits: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        let idx: Vec<u32> = step.batch.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &candle_core::Device::Cpu)?;
        let t = tensor.index_select(&idx, 0)?;
        // Unnormalised targets: sum_k t_k * CE(onehot_k) = xent with mass.
        Ok(losses::xent(logits, &t)?)
    };
    let tensor_objective = TensorObjective {
        loss: &loss,
        classes: 3,
        staged: false,
    };
    let native = SoftXent { targets: &targets };
    let model = LinearModel {
        classes: 3,
        dim: 4,
        weights: (0..12).map(|i| (i as f64 * 0.37).sin()).collect(),
        bias: vec![0.1, -0.2, 0.3],
    };
    let z = model.logits(&x);
    let rows: Vec<usize> = (0..25).rev().collect();
    // Logits in the order of `rows`.
    let z_rows: Vec<f64> = rows
        .iter()
        .flat_map(|&i| z[i * 3..i * 3 + 3].to_vec())
        .collect();
    let point = EvalPoint {
        rows: &rows,
        progress: 1.0,
        anchor: &z_rows,
    };
    let (v1, g1) = native.loss(&z_rows, &point).unwrap();
    let (v2, g2) = tensor_objective.loss(&z_rows, &point).unwrap();
    assert!((v1 - v2).abs() < 1e-12, "{v1} {v2}");
    assert!(max_diff(&g1, &g2) < 1e-12);
    // And the gradient is the derivative of the value.
    let f = |zz: &[f64]| native.loss(zz, &point).unwrap().0;
    assert!(max_diff(&g1, &numeric_grad(&f, &z_rows)) < 1e-7);
}

#[test]
fn lbfgs_finds_the_minimum_of_a_quadratic_and_of_rosenbrock() {
    // f = sum_i i (x_i - i)^2 / 2: minimum at x_i = i.
    let quad = |x: &[f64]| -> anyhow::Result<(f64, Vec<f64>)> {
        let f = x
            .iter()
            .enumerate()
            .map(|(i, v)| (i + 1) as f64 * (v - i as f64).powi(2) / 2.0)
            .sum();
        let g = x
            .iter()
            .enumerate()
            .map(|(i, v)| (i + 1) as f64 * (v - i as f64))
            .collect();
        Ok((f, g))
    };
    let (x, report) = lbfgs(quad, vec![0.0; 20], 1e-7, 1000).unwrap();
    assert!(report.converged);
    for (i, v) in x.iter().enumerate() {
        assert!((v - i as f64).abs() < 1e-6, "{i}: {v}");
    }
    let rosenbrock = |x: &[f64]| -> anyhow::Result<(f64, Vec<f64>)> {
        let (a, b) = (x[0], x[1]);
        let f = (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2);
        let g = vec![
            -2.0 * (1.0 - a) - 400.0 * a * (b - a * a),
            200.0 * (b - a * a),
        ];
        Ok((f, g))
    };
    let (x, report) = lbfgs(rosenbrock, vec![-1.2, 1.0], 1e-7, 1000).unwrap();
    assert!(report.converged, "{report:?}");
    assert!(
        (x[0] - 1.0).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6,
        "{x:?}"
    );
}

fn matrix(rows: &serde_json::Value) -> Matrix {
    let rows = rows.as_array().unwrap();
    let cols = rows[0].as_array().unwrap().len();
    let data: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    Matrix::new(rows.len(), cols, data).unwrap()
}

fn numbers<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Vec<T> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn cross_validation_agrees_with_scikit_learns_logistic_regression_cv() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/logreg_cv/logreg_cv.json"
    ))
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let config = SolverConfig {
        folds: 5,
        c_min: 1e-4,
        c_max: 1e2,
        c_steps: 13,
        tol: 1e-7,
        max_iter: 20000,
        stages: 1,
    };
    for (k, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let classes = case["classes"].as_u64().unwrap() as usize;
        let x = matrix(&case["x_train"]);
        let x_test = matrix(&case["x_test"]);
        let labels: Vec<usize> = numbers(&case["y_train"]);
        let fold: Vec<usize> = numbers(&case["fold"]);
        let grid: Vec<f64> = numbers(&case["grid"]);
        let scores: Vec<f64> = numbers(&case["cv_log_loss"]);
        let probs: Vec<Vec<f64>> = numbers(&case["test_probs"]);
        for (a, b) in config.grid().iter().zip(&grid) {
            assert!((a / b - 1.0).abs() < 1e-12, "grid {a} vs {b}");
        }
        let targets = one_hot(&labels, classes);
        let objective = SoftXent { targets: &targets };
        // Fewer rows than features: solve on row-space coordinates, as probes do.
        let (model, report) = if x.rows < x.cols {
            let (basis, coords) = row_space(&x);
            let (m, r) = fit_cv(&coords, classes, &objective, &targets, &fold, &config).unwrap();
            (m.lift(&basis), r)
        } else {
            fit_cv(&x, classes, &objective, &targets, &fold, &config).unwrap()
        };
        assert_eq!(report.unconverged, 0, "case {k}");
        for (j, (a, b)) in report.scores.iter().zip(&scores).enumerate() {
            // Relative: at the weakest regularisation of a separable case the optimum is flat.
            // There (case 2, C = 100, 48 rows per fold) the penalty's curvature is 1 / (C n) =
            // 2e-4, so a gradient of at most tol = 1e-7 on 80 weights leaves them up to
            // ~sqrt(80) 1e-7 / 2e-4 = 4.5e-3 from the optimum: held-out losses within 3e-4 of
            // scikit-learn's (solved to 1e-10) are as close as the tolerance can promise.
            assert!(
                (a - b).abs() < 3e-4 * b.abs().max(1.0),
                "case {k}, C {}: {a} vs {b}",
                grid[j]
            );
        }
        assert_eq!(
            report.chosen_c,
            case["chosen_c"].as_f64().unwrap(),
            "case {k}"
        );
        for (i, row) in model.probs(&x_test).iter().enumerate() {
            for (a, b) in row.iter().zip(&probs[i]) {
                assert!((a - b).abs() < 1e-5, "case {k}, test row {i}: {a} vs {b}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Every loss's probe solve on a problem with a known optimum: features that are all zero leave
// only the bias, so the solution is the constant logit vector that minimises the loss (found
// here by brute force over the logit s of class 1, logits [0, s]) or, for the losses solved by
// continuation, the known result of the stages (each stage's optimum for a constant predictor
// is the mean of its frozen targets).
// ---------------------------------------------------------------------------------------------

fn tensor(rows: &[Vec<f64>]) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &candle_core::Device::Cpu).unwrap()
}

fn pick(t: &Tensor, step: &Step) -> anyhow::Result<Tensor> {
    let idx: Vec<u32> = step.batch.iter().map(|&i| i as u32).collect();
    let idx = Tensor::new(idx.as_slice(), &candle_core::Device::Cpu)?;
    Ok(t.index_select(&idx, 0)?)
}

/// The solved constant logit s of class 1 with zero features (bias only).
fn solved_bias(loss: &ProbeLoss, n: usize, staged: bool, stages: usize) -> f64 {
    let x = Matrix::new(n, 1, vec![0.0; n]).unwrap();
    let objective = TensorObjective {
        loss,
        classes: 2,
        staged,
    };
    let config = SolverConfig {
        tol: 1e-8,
        max_iter: 10000,
        stages,
        ..SolverConfig::default()
    };
    let zero = LinearModel::zeros(2, 1);
    let (model, report) = solve(&x, &rows_of(n), 2, &objective, 1.0, &zero, &config).unwrap();
    assert!(report.converged, "{report:?}");
    model.bias[0]
}

/// argmin over s of `h` by a grid over [-12, 12] then golden-section search.
fn brute_force(h: &dyn Fn(f64) -> f64) -> f64 {
    let mut best = -12.0;
    for i in 0..=24000 {
        let s = -12.0 + i as f64 * 1e-3;
        if h(s) < h(best) {
            best = s;
        }
    }
    let (mut a, mut b) = (best - 1e-3, best + 1e-3);
    let r = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..100 {
        let c = b - r * (b - a);
        let d = a + r * (b - a);
        if h(c) < h(d) {
            b = d;
        } else {
            a = c;
        }
    }
    (a + b) / 2.0
}

/// The loss of `loss` for constant logits [0, s] on all n rows.
fn at_constant(loss: &ProbeLoss, n: usize, s: f64, anchor_s: f64) -> f64 {
    let rows: Vec<Vec<f64>> = vec![vec![0.0, s]; n];
    let anchors: Vec<Vec<f64>> = vec![vec![0.0, anchor_s]; n];
    let a = tensor(&anchors);
    let batch = rows_of(n);
    let step = Step {
        batch: &batch,
        progress: 1.0,
        anchor: Some(&a),
    };
    loss(&tensor(&rows), &step)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn weak_sets() -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let a: Vec<Vec<f64>> = [0.9, 0.8, 0.3, 0.95, 0.6, 0.7]
        .iter()
        .map(|&p| vec![1.0 - p, p])
        .collect();
    let b: Vec<Vec<f64>> = [0.6, 0.4, 0.2, 0.9, 0.55, 0.65]
        .iter()
        .map(|&p| vec![1.0 - p, p])
        .collect();
    (a, b)
}

#[test]
fn xent_and_naive_probe_solves_reach_the_mean_target() {
    let (a, b) = weak_sets();
    let (ta, tb) = (tensor(&a), tensor(&b));
    let xent = |z: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        Ok(losses::xent(z, &pick(&ta, step)?)?)
    };
    let mean1 = a.iter().map(|r| r[1]).sum::<f64>() / 6.0;
    let s = solved_bias(&xent, 6, false, 0);
    assert!((s - (mean1 / (1.0 - mean1)).ln()).abs() < 1e-6, "{s}");
    let weights = [0.7, 0.3];
    let naive = |z: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        let t = [pick(&ta, step)?, pick(&tb, step)?];
        Ok(losses::naive_multi(z, &t, &weights)?)
    };
    let m1 = (0..6).map(|i| 0.7 * a[i][1] + 0.3 * b[i][1]).sum::<f64>() / 6.0;
    let s = solved_bias(&naive, 6, false, 0);
    assert!((s - (m1 / (1.0 - m1)).ln()).abs() < 1e-6, "{s}");
}

#[test]
fn edl_and_dirichlet_multinomial_probe_solves_reach_the_brute_force_optimum() {
    let (a, b) = weak_sets();
    let (ta, tb) = (tensor(&a), tensor(&b));
    let weights = [0.5, 0.5];
    let evidence = losses::Evidence::Exp { clamp: 10.0 };
    for c in [0.0, 0.1] {
        let edl = |z: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
            let t = [pick(&ta, step)?, pick(&tb, step)?];
            let lambda = losses::ramp(step.progress, c, 1.0);
            Ok(losses::edl(z, &t, &weights, lambda, evidence)?)
        };
        let s = solved_bias(&edl, 6, true, 4);
        let best = brute_force(&|s| at_constant(&edl, 6, s, 0.0));
        assert!(
            (s - best).abs() < 1e-5,
            "c {c}: solved {s}, brute force {best}"
        );
    }
    let counts = tensor(
        &(0..6)
            .map(|i| {
                let ya = usize::from(a[i][1] > 0.5);
                let yb = usize::from(b[i][1] > 0.5);
                let mut c = vec![0.0, 0.0];
                c[ya] += 1.0;
                c[yb] += 1.0;
                c
            })
            .collect::<Vec<_>>(),
    );
    let dm = |z: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        Ok(losses::dirichlet_multinomial(
            z,
            &pick(&counts, step)?,
            evidence,
        )?)
    };
    let s = solved_bias(&dm, 6, false, 0);
    let best = brute_force(&|s| at_constant(&dm, 6, s, 0.0));
    assert!((s - best).abs() < 1e-5, "solved {s}, brute force {best}");
}

#[test]
fn product_and_logconf_continuations_reach_their_stagewise_optima() {
    let (a, _) = weak_sets();
    let ta = tensor(&a);
    let stages = 4;
    // Product: each stage's target is p_anchor * y normalised; a constant predictor's optimum is
    // its mean. From the uniform start: p <- mean_i normalise(p * y_i), `stages` + 1 times.
    let product = |z: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        Ok(losses::product_anchored(
            z,
            step.anchor.unwrap(),
            &pick(&ta, step)?,
        )?)
    };
    let mut p1 = 0.5;
    for _ in 0..=stages {
        p1 = a
            .iter()
            .map(|y| p1 * y[1] / (p1 * y[1] + (1.0 - p1) * y[0]))
            .sum::<f64>()
            / 6.0;
    }
    let s = solved_bias(&product, 6, true, stages);
    assert!((s - (p1 / (1.0 - p1)).ln()).abs() < 1e-6, "{s} vs p1 {p1}");
    // Logconf: with every row's prediction equal, the class-balanced hardening puts every row in
    // class 0 (none is above the threshold); the final stage has a = a_max: target
    // (1 - a) y + a e_0, optimum its mean.
    let (a_max, warmup) = (0.5, 0.2);
    let logconf = |z: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        let w = losses::ramp(step.progress, a_max, warmup);
        Ok(losses::logconf_anchored(
            z,
            step.anchor.unwrap(),
            &pick(&ta, step)?,
            w,
        )?)
    };
    let mean1 = a.iter().map(|r| r[1]).sum::<f64>() / 6.0;
    let q1 = (1.0 - a_max) * mean1;
    let s = solved_bias(&logconf, 6, true, stages);
    assert!((s - (q1 / (1.0 - q1)).ln()).abs() < 1e-6, "{s}");
}

#[test]
fn edl_step_continuation_reaches_the_optimum_of_its_last_stage() {
    let (a, b) = weak_sets();
    let (ta, tb) = (tensor(&a), tensor(&b));
    let weights = [0.5, 0.5];
    let evidence = losses::Evidence::Exp { clamp: 10.0 };
    let (c, a_max, warmup) = (0.01, 0.2, 0.25);
    let edl_step = |z: &Tensor, step: &Step| -> anyhow::Result<Tensor> {
        let t = [pick(&ta, step)?, pick(&tb, step)?];
        let lambda = losses::ramp(step.progress, c, 1.0);
        let w = losses::ramp(step.progress, a_max, warmup);
        Ok(losses::edl_step_anchored(
            z,
            step.anchor.unwrap(),
            &t,
            &weights,
            lambda,
            w,
            evidence,
        )?)
    };
    // The weak labels favour class 1, so from stage 1 on the anchor's argmax is class 1: the last
    // stage minimises the loss with progress 1 and an anchor of class 1.
    let s = solved_bias(&edl_step, 6, true, 4);
    assert!(s > 0.0);
    let best = brute_force(&|v| at_constant(&edl_step, 6, v, 1.0));
    assert!((s - best).abs() < 1e-5, "solved {s}, brute force {best}");
}
