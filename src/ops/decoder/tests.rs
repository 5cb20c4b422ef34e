//! The fused decoder layer against the same layer built from separate ops: values and
//! gradients.

use super::*;
use crate::ops::testing::{max_diff, random};
use candle_core::{Device, Var};

const EPS: f64 = 1e-6;

/// The layer from the model's other ops, one by one (each tested against its decomposed
/// form elsewhere).
fn layered(
    x: &Tensor,
    p: &PreNormParams,
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    (heads, kv_heads): (usize, usize),
    scale: f64,
) -> Tensor {
    use crate::ops::{activation, attention, linear, norm, rope};
    let project = |n: &Tensor, (w, b): (&Tensor, Option<&Tensor>), lora: Option<Adapter>| match lora
    {
        Some(l) => crate::ops::lora::lora_linear(n, w, b, (l.a, l.b, l.scale)).unwrap(),
        None => linear::linear(n, w, b).unwrap(),
    };
    let n1 = norm::rms_norm(x, p.input_norm, EPS, false).unwrap();
    let q = project(&n1, p.q, p.q_lora);
    let k = project(&n1, p.k, None);
    let v = project(&n1, p.v, p.v_lora);
    let q = rope::rope_bthd(&q, cos, sin, heads).unwrap();
    let k = rope::rope_bthd(&k, cos, sin, kv_heads).unwrap();
    let c = attention::attention(&q, &k, &v, mask, (heads, kv_heads), scale).unwrap();
    let s1 = (x + project(&c, p.o, None)).unwrap();
    let n2 = norm::rms_norm(&s1, p.post_norm, EPS, false).unwrap();
    let g = activation::gated(
        &linear::linear(&n2, p.gate, None).unwrap(),
        &linear::linear(&n2, p.up, None).unwrap(),
        Gate::Silu,
    )
    .unwrap();
    (s1 + linear::linear(&g, p.down, None).unwrap()).unwrap()
}

struct Case {
    b: usize,
    t: usize,
    h: usize,
    heads: usize,
    kv_heads: usize,
    i: usize,
    bias: bool,
}

fn tables(b: usize, t: usize, d: usize) -> (Tensor, Tensor) {
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for bi in 0..b {
        for pos in 0..t {
            for k in 0..d {
                let angle = (pos + bi) as f64 / 10f64.powf((k % (d / 2).max(1)) as f64 / d as f64);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (
        Tensor::from_vec(cos, (b, 1, t, d), &Device::Cpu).unwrap(),
        Tensor::from_vec(sin, (b, 1, t, d), &Device::Cpu).unwrap(),
    )
}

/// Causal mask with right padding: batch row r has `t - r` real tokens.
fn mask(b: usize, t: usize) -> Tensor {
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|r| (0..t).map(|j| u32::from(j + r < t)).collect())
        .collect();
    crate::models::nn::additive_mask(&rows, t, true, None, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

#[test]
fn values_and_gradients_match_the_layer_op_by_op() {
    let cases = [
        Case {
            b: 2,
            t: 5,
            h: 8,
            heads: 4,
            kv_heads: 2,
            i: 12,
            bias: true,
        },
        Case {
            b: 1,
            t: 7,
            h: 12,
            heads: 3,
            kv_heads: 1,
            i: 20,
            bias: false,
        },
        Case {
            b: 3,
            t: 1,
            h: 8,
            heads: 2,
            kv_heads: 2,
            i: 6,
            bias: true,
        },
        // More than one block of rows for the transposed products, in parallel.
        Case {
            b: 3,
            t: 50,
            h: 16,
            heads: 2,
            kv_heads: 1,
            i: 24,
            bias: true,
        },
    ];
    for (n, c) in cases.iter().enumerate() {
        let (h, d) = (c.h, c.h / c.heads);
        let (qw, kw) = (c.heads * d, c.kv_heads * d);
        let seed = 100 * n as u64;
        let w = |shape: &[usize], k: u64| random(shape, seed + k, 0.5);
        let norm = |k: u64| (random(&[h], seed + k, 0.3) + 1.0).unwrap();
        let (n1, n2) = (norm(1), norm(2));
        let (wq, wk, wv, wo) = (
            w(&[qw, h], 3),
            w(&[kw, h], 4),
            w(&[kw, h], 5),
            w(&[h, qw], 6),
        );
        let (bq, bk, bv) = (w(&[qw], 7), w(&[kw], 8), w(&[kw], 9));
        let (wg, wu, wd) = (w(&[c.i, h], 10), w(&[c.i, h], 11), w(&[h, c.i], 12));
        let r = 3;
        let vars: Vec<Var> = [
            w(&[r, h], 13),
            w(&[qw, r], 14),
            w(&[r, h], 15),
            w(&[kw, r], 16),
        ]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
        let ad: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let bias = |t: &Tensor| c.bias.then(|| t.clone());
        let (bq, bk, bv) = (bias(&bq), bias(&bk), bias(&bv));
        let p = PreNormParams {
            input_norm: &n1,
            q: (&wq, bq.as_ref()),
            k: (&wk, bk.as_ref()),
            v: (&wv, bv.as_ref()),
            o: (&wo, None),
            q_lora: Some(Adapter {
                a: &ad[0],
                b: &ad[1],
                scale: 2.0,
            }),
            v_lora: Some(Adapter {
                a: &ad[2],
                b: &ad[3],
                scale: 0.5,
            }),
            post_norm: &n2,
            gate: &wg,
            up: &wu,
            down: &wd,
            transposed: [None; 7],
        };
        let x = Var::from_tensor(&random(&[c.b, c.t, h], seed + 20, 1.0)).unwrap();
        let (cos, sin) = tables(c.b, c.t, d);
        let m = mask(c.b, c.t);
        let scale = 1.0 / (d as f64).sqrt();
        let heads = (c.heads, c.kv_heads);
        let fused = pre_norm_layer(&x, &p, (&cos, &sin), &m, heads, EPS, scale)
            .unwrap()
            .unwrap();
        let plain = layered(&x, &p, (&cos, &sin), &m, heads, scale);
        let diff = max_diff(&fused.y, &plain);
        assert!(diff < 1e-10, "case {n}: values differ by {diff}");
        // The keys handed to the cache: rotated k.
        let k = rope::rope_bthd(
            &linear::linear(
                &norm::rms_norm(&x, &n1, EPS, false).unwrap(),
                &wk,
                bk.as_ref(),
            )
            .unwrap(),
            &cos,
            &sin,
            c.kv_heads,
        )
        .unwrap();
        assert!(max_diff(&fused.k, &k) < 1e-10, "case {n}: cached keys");
        let weights = random(&[c.b, c.t, h], seed + 30, 1.0);
        let gf = (&fused.y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![x.as_tensor().clone()];
        all.extend(ad.iter().cloned());
        for (k, v) in all.iter().enumerate() {
            let (a, e) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            let size = 1.0 + max_diff(e, &e.zeros_like().unwrap());
            let diff = max_diff(a, e);
            assert!(
                diff < 1e-9 * size,
                "case {n}: gradient {k} differs by {diff}"
            );
        }
        for frozen in [&n1, &wq, &wk, &wv, &wo, &wg, &wu, &wd] {
            assert!(gf.get(frozen).is_none());
        }
        // With the weights also given transposed (training's products in gemm's other
        // orientation): the same values and gradients up to the order of the sums.
        let ts: Vec<Tensor> = [&wq, &wk, &wv, &wo, &wg, &wu, &wd]
            .iter()
            .map(|w| w.t().unwrap().contiguous().unwrap())
            .collect();
        let pt = PreNormParams {
            transposed: std::array::from_fn(|j| Some(&ts[j])),
            ..p
        };
        let fused_t = pre_norm_layer(&x, &pt, (&cos, &sin), &m, heads, EPS, scale)
            .unwrap()
            .unwrap();
        let diff = max_diff(&fused_t.y, &plain);
        assert!(
            diff < 1e-10,
            "case {n}, transposed: values differ by {diff}"
        );
        let gt = (&fused_t.y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (k, v) in all.iter().enumerate() {
            let (a, e) = (gt.get(v).unwrap(), gp.get(v).unwrap());
            let size = 1.0 + max_diff(e, &e.zeros_like().unwrap());
            let diff = max_diff(a, e);
            assert!(
                diff < 1e-9 * size,
                "case {n}, transposed: gradient {k} differs by {diff}"
            );
        }
        for t in &ts {
            assert!(gt.get(t).is_none());
        }
    }
}

#[test]
fn without_adapters_only_the_input_gets_a_gradient_and_trained_bases_are_not_fused() {
    let (b, t, h, heads, kv, i) = (2, 4, 8, 2, 1, 10);
    let d = h / heads;
    let w = |shape: &[usize], k: u64| random(shape, k, 0.5);
    let (n1, n2) = ((w(&[h], 1) + 1.0).unwrap(), (w(&[h], 2) + 1.0).unwrap());
    let (wq, wk, wv, wo) = (w(&[h, h], 3), w(&[d, h], 4), w(&[d, h], 5), w(&[h, h], 6));
    let (wg, wu, wd) = (w(&[i, h], 7), w(&[i, h], 8), w(&[h, i], 9));
    let mut p = PreNormParams {
        input_norm: &n1,
        q: (&wq, None),
        k: (&wk, None),
        v: (&wv, None),
        o: (&wo, None),
        q_lora: None,
        v_lora: None,
        post_norm: &n2,
        gate: &wg,
        up: &wu,
        down: &wd,
        transposed: [None; 7],
    };
    let x = Var::from_tensor(&random(&[b, t, h], 11, 1.0)).unwrap();
    let (cos, sin) = tables(b, t, d);
    let m = mask(b, t);
    let out = pre_norm_layer(&x, &p, (&cos, &sin), &m, (heads, kv), EPS, 0.5)
        .unwrap()
        .unwrap();
    let plain = layered(&x, &p, (&cos, &sin), &m, (heads, kv), 0.5);
    let gf = out.y.sum_all().unwrap().backward().unwrap();
    let gp = plain.sum_all().unwrap().backward().unwrap();
    assert!(max_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-9);
    let trained = Var::from_tensor(&wo).unwrap();
    p.o = (trained.as_tensor(), None);
    assert!(
        pre_norm_layer(&x, &p, (&cos, &sin), &m, (heads, kv), EPS, 0.5)
            .unwrap()
            .is_none()
    );
    let wrong = w(&[h, i], 12);
    p.o = (&wo, None);
    p.up = &wrong;
    let err = pre_norm_layer(&x, &p, (&cos, &sin), &m, (heads, kv), EPS, 0.5).err();
    assert!(err.is_some_and(|e| e.to_string().contains("parameter 11")));
}

#[test]
fn f32_agrees_with_f64() {
    let (b, t, h, heads, kv, i) = (2, 6, 16, 4, 2, 24);
    let d = h / heads;
    let w = |shape: &[usize], k: u64| random(shape, k, 0.5);
    let ts = [
        (w(&[h], 1) + 1.0).unwrap(),
        w(&[h, h], 3),
        w(&[h], 4),
        w(&[2 * d, h], 5),
        w(&[2 * d, h], 6),
        w(&[h, h], 7),
        (w(&[h], 2) + 1.0).unwrap(),
        w(&[i, h], 8),
        w(&[i, h], 9),
        w(&[h, i], 10),
    ];
    let x = random(&[b, t, h], 11, 1.0);
    let (cos, sin) = tables(b, t, d);
    let m = mask(b, t);
    let run = |ts: &[Tensor], x: &Tensor, cos: &Tensor, sin: &Tensor| {
        let p = PreNormParams {
            input_norm: &ts[0],
            q: (&ts[1], Some(&ts[2])),
            k: (&ts[3], None),
            v: (&ts[4], None),
            o: (&ts[5], None),
            q_lora: None,
            v_lora: None,
            post_norm: &ts[6],
            gate: &ts[7],
            up: &ts[8],
            down: &ts[9],
            transposed: [None; 7],
        };
        pre_norm_layer(x, &p, (cos, sin), &m, (heads, kv), EPS, 0.5)
            .unwrap()
            .unwrap()
            .y
            .to_dtype(DType::F64)
            .unwrap()
    };
    let y64 = run(&ts, &x, &cos, &sin);
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let t32: Vec<Tensor> = ts.iter().map(f).collect();
    let y32 = run(&t32, &f(&x), &f(&cos), &f(&sin));
    let diff = max_diff(&y32, &y64);
    assert!(diff < 1e-4, "f32 and f64 differ by {diff}");
}
