//! Every loss against a plain f64 implementation written here from the formulas of METHOD.md,
//! gradients against finite differences (or, for losses with detached targets, against the
//! closed form p - t), and the edge cases: one-hot and uniform labels, huge logits, K = 2 and
//! K = 50,000.

use candle_core::{DType, Device, Tensor, Var};
use ws2s::losses::{self, Evidence};
use ws2s::rng::Rng;

type M = Vec<Vec<f64>>;

fn tensor(m: &M) -> Tensor {
    let rows = m.len();
    let cols = m[0].len();
    Tensor::from_vec(
        m.iter().flatten().copied().collect::<Vec<f64>>(),
        (rows, cols),
        &Device::Cpu,
    )
    .unwrap()
}

fn random_logits(rng: &mut Rng, b: usize, k: usize, scale: f64) -> M {
    (0..b)
        .map(|_| {
            (0..k)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) * scale)
                .collect()
        })
        .collect()
}

fn random_probs(rng: &mut Rng, b: usize, k: usize) -> M {
    (0..b)
        .map(|_| {
            let raw: Vec<f64> = (0..k).map(|_| rng.next_f64() + 0.05).collect();
            let s: f64 = raw.iter().sum();
            raw.iter().map(|v| v / s).collect()
        })
        .collect()
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

fn softmax(z: &[f64]) -> Vec<f64> {
    log_softmax(z).iter().map(|v| v.exp()).collect()
}

/// Lanczos approximation (g = 7, 9 coefficients) with reflection: independent of the series used
/// by the library.
fn lgamma_ref(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - lgamma_ref(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

fn digamma_ref(x: f64) -> f64 {
    let h = 1e-5 * x.max(1.0);
    (lgamma_ref(x + h) - lgamma_ref(x - h)) / (2.0 * h)
}

fn kl_dir_ref(alpha: &[f64]) -> f64 {
    let k = alpha.len() as f64;
    let s: f64 = alpha.iter().sum();
    lgamma_ref(s) - lgamma_ref(k) - alpha.iter().map(|&a| lgamma_ref(a)).sum::<f64>()
        + alpha
            .iter()
            .map(|&a| (a - 1.0) * (digamma_ref(a) - digamma_ref(s)))
            .sum::<f64>()
}

fn edl_ref(z: &[f64], y: &[f64], lambda: f64) -> f64 {
    let alpha: Vec<f64> = z.iter().map(|v| v.clamp(-10.0, 10.0).exp() + 1.0).collect();
    let s: f64 = alpha.iter().sum();
    let fit: f64 = y
        .iter()
        .zip(&alpha)
        .map(|(yk, ak)| yk * (s.ln() - ak.ln()))
        .sum();
    let alpha_tilde: Vec<f64> = y
        .iter()
        .zip(&alpha)
        .map(|(yk, ak)| yk + (1.0 - yk) * ak)
        .collect();
    fit + lambda * kl_dir_ref(&alpha_tilde)
}

/// mean_b -sum_k t_bk log softmax(z_b)_k
fn mean_cross_entropy(z: &M, targets: &M) -> f64 {
    let total: f64 = z
        .iter()
        .zip(targets)
        .map(|(zr, tr)| {
            -tr.iter()
                .zip(log_softmax(zr))
                .map(|(a, b)| a * b)
                .sum::<f64>()
        })
        .sum();
    total / z.len() as f64
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs {b}");
}

/// Checks the autograd gradient of `f` at `z` against central finite differences.
fn check_gradient(z: &M, f: impl Fn(&Tensor) -> Tensor, what: &str) {
    let var = Var::from_tensor(&tensor(z)).unwrap();
    let grads = f(var.as_tensor()).backward().unwrap();
    let grad = grads
        .get(var.as_tensor())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let h = 1e-6;
    for i in 0..z.len() {
        for k in 0..z[0].len() {
            let mut plus = z.clone();
            plus[i][k] += h;
            let mut minus = z.clone();
            minus[i][k] -= h;
            let numeric = (scalar(&f(&tensor(&plus))) - scalar(&f(&tensor(&minus)))) / (2.0 * h);
            close(grad[i][k], numeric, 1e-5, &format!("{what} d/dz[{i}][{k}]"));
        }
    }
}

#[test]
fn xent_value_gradient_and_label_edge_cases() {
    let mut rng = Rng::new(1);
    let z = random_logits(&mut rng, 4, 3, 3.0);
    let y = random_probs(&mut rng, 4, 3);
    let expected = mean_cross_entropy(&z, &y);
    close(
        scalar(&losses::xent(&tensor(&z), &tensor(&y)).unwrap()),
        expected,
        1e-12,
        "xent",
    );
    check_gradient(&z, |t| losses::xent(t, &tensor(&y)).unwrap(), "xent");
    // one-hot: -log p_y; uniform: mean of -log p
    let onehot = vec![vec![0.0, 1.0, 0.0]; 4];
    let expected: f64 = z.iter().map(|zr| -log_softmax(zr)[1]).sum::<f64>() / 4.0;
    close(
        scalar(&losses::xent(&tensor(&z), &tensor(&onehot)).unwrap()),
        expected,
        1e-12,
        "xent one-hot",
    );
    let uniform = vec![vec![1.0 / 3.0; 3]; 4];
    let expected: f64 = z
        .iter()
        .map(|zr| -log_softmax(zr).iter().sum::<f64>() / 3.0)
        .sum::<f64>()
        / 4.0;
    close(
        scalar(&losses::xent(&tensor(&uniform), &tensor(&uniform)).unwrap()),
        3f64.ln(),
        1e-12,
        "uniform logits",
    );
    close(
        scalar(&losses::xent(&tensor(&z), &tensor(&uniform)).unwrap()),
        expected,
        1e-12,
        "xent uniform",
    );
}

/// The autograd gradient of a loss CE(t, p) with a detached target t is (p - t) / B.
fn check_detached_gradient(z: &M, target: &M, f: impl Fn(&Tensor) -> Tensor, what: &str) {
    let var = Var::from_tensor(&tensor(z)).unwrap();
    let grads = f(var.as_tensor()).backward().unwrap();
    let grad = grads
        .get(var.as_tensor())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let b = z.len() as f64;
    for (i, zr) in z.iter().enumerate() {
        for (k, pk) in softmax(zr).iter().enumerate() {
            close(grad[i][k], (pk - target[i][k]) / b, 1e-10, what);
        }
    }
}

#[test]
fn logconf_hardens_with_the_weak_class_balance() {
    // p_1 of the 6 rows: increasing with the row; weak positive rate 1/3 -> the top 2 rows are class 1.
    let z: M = (0..6).map(|i| vec![0.0, -1.0 + 0.4 * i as f64]).collect();
    let weak: M = vec![
        vec![0.9, 0.1],
        vec![0.8, 0.2],
        vec![0.3, 0.7],
        vec![0.7, 0.3],
        vec![0.6, 0.4],
        vec![0.7, 0.3],
    ];
    let hard = losses::balanced_hard_predictions(
        &candle_nn::ops::softmax(&tensor(&z), 1).unwrap(),
        &tensor(&weak),
    )
    .unwrap();
    let hard = hard.to_vec2::<f64>().unwrap();
    let classes: Vec<usize> = hard.iter().map(|r| usize::from(r[1] > 0.5)).collect();
    assert_eq!(classes, vec![0, 0, 0, 0, 1, 1]);
    let a = 0.5;
    let target: M = weak
        .iter()
        .zip(&hard)
        .map(|(w, h)| {
            w.iter()
                .zip(h)
                .map(|(wk, hk)| (1.0 - a) * wk + a * hk)
                .collect()
        })
        .collect();
    let expected = mean_cross_entropy(&z, &target);
    close(
        scalar(&losses::logconf(&tensor(&z), &tensor(&weak), a).unwrap()),
        expected,
        1e-12,
        "logconf",
    );
    check_detached_gradient(
        &z,
        &target,
        |t| losses::logconf(t, &tensor(&weak), a).unwrap(),
        "logconf",
    );
    // a = 0 is plain cross-entropy; the ramp is smooth and saturates.
    close(
        scalar(&losses::logconf(&tensor(&z), &tensor(&weak), 0.0).unwrap()),
        scalar(&losses::xent(&tensor(&z), &tensor(&weak)).unwrap()),
        1e-12,
        "a=0",
    );
    assert_eq!(losses::ramp(0.1, 0.5, 0.2), 0.25);
    assert_eq!(losses::ramp(0.5, 0.5, 0.2), 0.5);
    assert_eq!(losses::ramp(0.0, 0.5, 0.2), 0.0);
}

#[test]
fn product_loss_targets_the_normalised_product() {
    let mut rng = Rng::new(2);
    let z = random_logits(&mut rng, 5, 4, 2.0);
    let y = random_probs(&mut rng, 5, 4);
    let target: M = z
        .iter()
        .zip(&y)
        .map(|(zr, yr)| {
            let prod: Vec<f64> = softmax(zr).iter().zip(yr).map(|(p, q)| p * q).collect();
            let s: f64 = prod.iter().sum();
            prod.iter().map(|v| v / s).collect()
        })
        .collect();
    let expected = mean_cross_entropy(&z, &target);
    close(
        scalar(&losses::product(&tensor(&z), &tensor(&y)).unwrap()),
        expected,
        1e-12,
        "product",
    );
    check_detached_gradient(
        &z,
        &target,
        |t| losses::product(t, &tensor(&y)).unwrap(),
        "product",
    );
}

#[test]
fn naive_multi_weak_is_the_weighted_sum() {
    let mut rng = Rng::new(3);
    let z = random_logits(&mut rng, 3, 2, 2.0);
    let ys = [random_probs(&mut rng, 3, 2), random_probs(&mut rng, 3, 2)];
    let weights = [0.3, 0.7];
    let expected: f64 = ys
        .iter()
        .zip(weights)
        .map(|(y, w)| w * scalar(&losses::xent(&tensor(&z), &tensor(y)).unwrap()))
        .sum();
    let tensors: Vec<Tensor> = ys.iter().map(tensor).collect();
    close(
        scalar(&losses::naive_multi(&tensor(&z), &tensors, &weights).unwrap()),
        expected,
        1e-12,
        "naive",
    );
    check_gradient(
        &z,
        |t| losses::naive_multi(t, &tensors, &weights).unwrap(),
        "naive",
    );
}

#[test]
fn edl_matches_the_formula_and_its_gradient() {
    let mut rng = Rng::new(4);
    let z = random_logits(&mut rng, 3, 4, 2.0);
    let ys = [
        random_probs(&mut rng, 3, 4),
        vec![vec![0.0, 0.0, 1.0, 0.0]; 3],
    ];
    let weights = [0.4, 0.6];
    let lambda = 0.3;
    let expected: f64 = ys
        .iter()
        .zip(weights)
        .map(|(y, w)| {
            w * z
                .iter()
                .zip(y)
                .map(|(zr, yr)| edl_ref(zr, yr, lambda))
                .sum::<f64>()
                / 3.0
        })
        .sum();
    let tensors: Vec<Tensor> = ys.iter().map(tensor).collect();
    let evidence = Evidence::Exp { clamp: 10.0 };
    close(
        scalar(&losses::edl(&tensor(&z), &tensors, &weights, lambda, evidence).unwrap()),
        expected,
        1e-7,
        "edl",
    );
    check_gradient(
        &z,
        |t| losses::edl(t, &tensors, &weights, lambda, evidence).unwrap(),
        "edl",
    );
    // KL(Dir(1) || Dir(1)) = 0; and K = 2 against the reference implementation.
    let kl = losses::kl_to_uniform_dirichlet(&tensor(&vec![vec![1.0, 1.0, 1.0]])).unwrap();
    close(scalar(&kl.sum_all().unwrap()), 0.0, 1e-9, "KL at uniform");
    let kl = losses::kl_to_uniform_dirichlet(&tensor(&vec![vec![3.5, 1.0]])).unwrap();
    close(
        scalar(&kl.sum_all().unwrap()),
        kl_dir_ref(&[3.5, 1.0]),
        1e-7,
        "KL K=2",
    );
}

#[test]
fn edl_step_mixes_in_the_students_argmax() {
    let mut rng = Rng::new(5);
    let z = random_logits(&mut rng, 4, 3, 2.0);
    let y = random_probs(&mut rng, 4, 3);
    let a = 0.2;
    let mixed: M = z
        .iter()
        .zip(&y)
        .map(|(zr, yr)| {
            let best = zr
                .iter()
                .enumerate()
                .max_by(|p, q| p.1.total_cmp(q.1))
                .unwrap()
                .0;
            yr.iter()
                .enumerate()
                .map(|(k, v)| (1.0 - a) * v + if k == best { a } else { 0.0 })
                .collect()
        })
        .collect();
    let expected: f64 = z
        .iter()
        .zip(&mixed)
        .map(|(zr, mr)| edl_ref(zr, mr, 0.01))
        .sum::<f64>()
        / 4.0;
    let evidence = Evidence::Exp { clamp: 10.0 };
    let got = losses::edl_step(&tensor(&z), &[tensor(&y)], &[1.0], 0.01, a, evidence).unwrap();
    close(scalar(&got), expected, 1e-7, "edl_step");
}

#[test]
fn dirichlet_multinomial_matches_the_formula() {
    let mut rng = Rng::new(6);
    let z = random_logits(&mut rng, 3, 3, 2.0);
    let counts: M = vec![
        vec![2.0, 1.0, 0.0],
        vec![0.0, 0.0, 3.0],
        vec![1.0, 1.0, 1.0],
    ];
    let expected: f64 = z
        .iter()
        .zip(&counts)
        .map(|(zr, nr)| {
            let alpha: Vec<f64> = zr
                .iter()
                .map(|v| v.clamp(-10.0, 10.0).exp() + 1.0)
                .collect();
            let s: f64 = alpha.iter().sum();
            let j: f64 = nr.iter().sum();
            -(lgamma_ref(s) - lgamma_ref(s + j)
                + alpha
                    .iter()
                    .zip(nr)
                    .map(|(a, n)| lgamma_ref(a + n) - lgamma_ref(*a))
                    .sum::<f64>())
        })
        .sum::<f64>()
        / 3.0;
    let evidence = Evidence::Exp { clamp: 10.0 };
    close(
        scalar(&losses::dirichlet_multinomial(&tensor(&z), &tensor(&counts), evidence).unwrap()),
        expected,
        1e-7,
        "dirmult",
    );
    check_gradient(
        &z,
        |t| losses::dirichlet_multinomial(t, &tensor(&counts), evidence).unwrap(),
        "dirmult",
    );
    check_gradient(
        &z,
        |t| losses::dirichlet_multinomial(t, &tensor(&counts), Evidence::Softplus).unwrap(),
        "dirmult softplus",
    );
}

#[test]
fn token_losses_average_over_real_tokens_only() {
    let mut rng = Rng::new(7);
    let (b, t, v) = (2, 3, 5);
    let z: Vec<f64> = (0..b * t * v).map(|_| rng.next_f64() * 4.0 - 2.0).collect();
    let mut q: Vec<f64> = Vec::new();
    for _ in 0..b * t {
        let row = random_probs(&mut rng, 1, v).remove(0);
        q.extend(row);
    }
    q[0..v].copy_from_slice(&[0.0, 1.0, 0.0, 0.0, 0.0]); // a one-hot row: 0 log 0 terms
    let mask = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0];
    let zt = Tensor::from_vec(z.clone(), (b, t, v), &Device::Cpu).unwrap();
    let qt = Tensor::from_vec(q.clone(), (b, t, v), &Device::Cpu).unwrap();
    let mt = Tensor::from_vec(mask.to_vec(), (b, t), &Device::Cpu).unwrap();
    let mut kl_sum = 0.0;
    let mut edl_sum = 0.0;
    for pos in 0..b * t {
        if mask[pos] == 0.0 {
            continue;
        }
        let zr = &z[pos * v..(pos + 1) * v];
        let qr = &q[pos * v..(pos + 1) * v];
        kl_sum += qr
            .iter()
            .zip(log_softmax(zr))
            .map(|(qk, lp)| if *qk > 0.0 { qk * (qk.ln() - lp) } else { 0.0 })
            .sum::<f64>();
        edl_sum += edl_ref(zr, qr, 0.1);
    }
    close(
        scalar(&losses::token_soft_kl(&zt, &qt, &mt).unwrap()),
        kl_sum / 3.0,
        1e-10,
        "token KL",
    );
    let evidence = Evidence::Exp { clamp: 10.0 };
    close(
        scalar(&losses::token_edl(&zt, &qt, &mt, 0.1, evidence).unwrap()),
        edl_sum / 3.0,
        1e-7,
        "token EDL",
    );
    // KL of a distribution with itself is 0.
    let logq = candle_nn::ops::log_softmax(&zt, 2).unwrap();
    close(
        scalar(&losses::token_soft_kl(&zt, &logq.exp().unwrap(), &mt).unwrap()),
        0.0,
        1e-10,
        "KL(p||p)",
    );
}

#[test]
fn conservative_dpo_known_values_and_gradient() {
    let t = |v: &[f64]| Tensor::new(v, &Device::Cpu).unwrap();
    // policy = reference: h = 0, loss = log 2 for any eps.
    let same = losses::conservative_dpo(
        &t(&[-3.0, -5.0]),
        &t(&[-4.0, -2.0]),
        &t(&[-3.0, -5.0]),
        &t(&[-4.0, -2.0]),
        5.0,
        0.0,
    )
    .unwrap();
    close(scalar(&same), 2f64.ln(), 1e-12, "log 2");
    // eps = 0 is standard DPO: -log sigmoid(beta h); h = (pc - pr) - (rc - rr)
    let (pc, pr, rc, rr) = ([-2.0, -6.0], [-5.0, -4.0], [-3.0, -5.5], [-4.5, -4.2]);
    let beta = 0.7;
    let hs: Vec<f64> = (0..2).map(|i| (pc[i] - pr[i]) - (rc[i] - rr[i])).collect();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    for eps in [0.0, 0.1] {
        let expected: f64 = hs
            .iter()
            .map(|h| -(1.0 - eps) * sig(beta * h).ln() - eps * sig(-beta * h).ln())
            .sum::<f64>()
            / 2.0;
        let got = losses::conservative_dpo(&t(&pc), &t(&pr), &t(&rc), &t(&rr), beta, eps).unwrap();
        close(scalar(&got), expected, 1e-12, &format!("dpo eps {eps}"));
        // gradient with respect to the policy's chosen log-probabilities:
        // dL/dpc_i = [-(1 - eps) beta sigmoid(-beta h) + eps beta sigmoid(beta h)] / B
        let var = Var::new(&pc, &Device::Cpu).unwrap();
        let loss = losses::conservative_dpo(var.as_tensor(), &t(&pr), &t(&rc), &t(&rr), beta, eps)
            .unwrap();
        let grad = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (g, h) in grad.iter().zip(&hs) {
            close(
                *g,
                (-(1.0 - eps) * beta * sig(-beta * h) + eps * beta * sig(beta * h)) / 2.0,
                1e-10,
                "dpo grad",
            );
        }
    }
    // huge margins: no overflow
    let big = losses::conservative_dpo(&t(&[0.0]), &t(&[-1e4]), &t(&[0.0]), &t(&[0.0]), 5.0, 0.1)
        .unwrap();
    assert!(scalar(&big).is_finite());
}

#[test]
fn huge_logits_and_large_vocabularies_stay_finite() {
    for k in [2usize, 50_000] {
        let mut rng = Rng::new(k as u64);
        let mut z = random_logits(&mut rng, 2, k, 1.0);
        z[0][0] = 1e4;
        z[1][k - 1] = -1e4;
        let y = random_probs(&mut rng, 2, k);
        let zt = tensor(&z).to_dtype(DType::F32).unwrap();
        let yt = tensor(&y).to_dtype(DType::F32).unwrap();
        let evidence = Evidence::Exp { clamp: 10.0 };
        for (name, value) in [
            ("xent", losses::xent(&zt, &yt).unwrap()),
            ("logconf", losses::logconf(&zt, &yt, 0.5).unwrap()),
            ("product", losses::product(&zt, &yt).unwrap()),
            (
                "edl",
                losses::edl(&zt, std::slice::from_ref(&yt), &[1.0], 0.01, evidence).unwrap(),
            ),
            (
                "edl softplus",
                losses::edl(
                    &zt,
                    std::slice::from_ref(&yt),
                    &[1.0],
                    0.01,
                    Evidence::Softplus,
                )
                .unwrap(),
            ),
        ] {
            assert!(
                scalar(&value).is_finite(),
                "{name} at K = {k}: {}",
                scalar(&value)
            );
        }
        let var = Var::from_tensor(&zt).unwrap();
        let grads = losses::edl(
            var.as_tensor(),
            std::slice::from_ref(&yt),
            &[1.0],
            0.01,
            evidence,
        )
        .unwrap()
        .backward()
        .unwrap();
        let g = grads.get(var.as_tensor()).unwrap();
        assert!(
            scalar(&g.abs().unwrap().sum_all().unwrap()).is_finite(),
            "edl gradient at K = {k}"
        );
    }
}
