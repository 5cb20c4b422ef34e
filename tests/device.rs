//! Device parity: every architecture's forward, and one LoRA training step, on the test device
//! against the CPU's f32 reference. `WS2S_TEST_DEVICE` chooses the device (default cpu;
//! scripts/gpu-check sets cuda): f32 on the device must match the CPU to 1e-4, bf16 frozen
//! weights (what a GPU run uses) to a stated tolerance, and every trainable weight must get a
//! non-zero gradient on the device. On the CPU the bf16 runs take candle's generic ops, the same
//! code path the GPU takes, so that path is tested on every machine.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use ws2s::models::heads::{pool, ClassificationHead, Pooling};
use ws2s::models::params::{LoraConfig, Params, Trainable};
use ws2s::models::{nn, Model};
use ws2s::runtime::DeviceSetting;

fn device() -> Device {
    let setting: DeviceSetting = std::env::var("WS2S_TEST_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()
        .unwrap();
    setting.device().unwrap()
}

/// The fixtures under the source tree, or under `CARGO_MANIFEST_DIR` as set when the test
/// binary runs elsewhere (scripts/gpu-check runs it from the bundle folder).
fn fixture(name: &str) -> PathBuf {
    let root =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    Path::new(&root).join("tests/fixtures/models").join(name)
}

const ARCHITECTURES: [&str; 5] = ["llama", "qwen2", "gemma3", "gpt2", "bert"];

/// A padded batch of token ids within every fixture's vocabulary, and its mask.
fn batch(device: &Device) -> (Tensor, Vec<Vec<u32>>) {
    let rows: [&[u32]; 3] = [
        &[5, 9, 17, 33, 2, 8],
        &[7, 3, 11, 0, 0, 0],
        &[1, 2, 3, 4, 5, 6],
    ];
    let mask: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let n = if r[3] == 0 { 3 } else { r.len() };
            (0..r.len()).map(|i| u32::from(i < n)).collect()
        })
        .collect();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    (Tensor::from_vec(flat, (3, 6), device).unwrap(), mask)
}

/// Hidden states of the real positions, as f32 rows on the CPU.
fn hidden_rows(model: &Model, device: &Device) -> Vec<Vec<f32>> {
    let (ids, mask) = batch(device);
    let hidden = model
        .network
        .hidden(&ids, &mask, &mut model.network.new_cache())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let mut rows = Vec::new();
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                rows.push(hidden[b][t].clone());
            }
        }
    }
    rows
}

/// A tensor's values, flattened, on the host.
fn host_values(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |a - b| and the root-mean-square difference relative to b's RMS.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    let (mut worst, mut diff2, mut ref2) = (0f32, 0f64, 0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        worst = worst.max((x - y).abs());
        diff2 += ((x - y) as f64).powi(2);
        ref2 += (*y as f64).powi(2);
    }
    (worst, (diff2 / ref2.max(1e-30)).sqrt() as f32)
}

#[test]
fn every_architecture_matches_the_cpu_on_the_device_in_f32_and_bf16() {
    let device = device();
    for name in ARCHITECTURES {
        let load = |device: &Device, dtype: DType| {
            Model::load_as(&fixture(name), Trainable::Frozen, 0, device, dtype).unwrap()
        };
        let reference = hidden_rows(&load(&Device::Cpu, DType::F32), &Device::Cpu);
        let f32_rows = hidden_rows(&load(&device, DType::F32), &device);
        let (worst, _) = compare(&f32_rows, &reference);
        assert!(worst < 1e-4, "{name} f32 on {device:?}: max |diff| {worst}");
        let bf16_rows = hidden_rows(&load(&device, DType::BF16), &device);
        let (_, rel) = compare(&bf16_rows, &reference);
        eprintln!(
            "{name} on {device:?}: f32 max |diff| {worst:.2e}, bf16 relative RMS error {rel:.4}"
        );
        // bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per value): a relative RMS
        // error of a few percent after a few layers.
        assert!(
            rel < 0.05,
            "{name} bf16 on {device:?}: relative RMS error {rel}"
        );
    }
}

/// One training step's loss and gradients (by variable name, as CPU f32 vectors).
fn lora_step(device: &Device, dtype: DType) -> (f32, BTreeMap<String, Vec<f32>>) {
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let model = Model::load_as(&fixture("qwen2"), Trainable::Lora(lora), 7, device, dtype).unwrap();
    let mut head_params = Params::new(
        std::collections::HashMap::new(),
        Trainable::Frozen,
        3,
        device,
        "head",
    );
    let head = ClassificationHead::new(&mut head_params, model.network.hidden_size(), 2).unwrap();
    let mut vars = model.vars.clone();
    vars.extend(head_params.into_vars());
    // B starts at zero, which would leave A without a gradient: small fixed values instead, so
    // that every trainable weight must get a non-zero one.
    for (name, var) in &vars {
        if name.ends_with("lora_b") {
            let n = var.as_tensor().elem_count();
            let values: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
            var.set(&Tensor::from_vec(values, var.as_tensor().shape(), device).unwrap())
                .unwrap();
        }
    }
    let (ids, mask) = batch(device);
    let hidden = model
        .network
        .hidden(&ids, &mask, &mut model.network.new_cache())
        .unwrap();
    let logits = head
        .forward(&pool(&hidden, &mask, Pooling::LastToken).unwrap())
        .unwrap();
    let labels = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 0.0]], device).unwrap();
    let loss = ws2s::losses::xent(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    let value = loss
        .to_device(&Device::Cpu)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut out = BTreeMap::new();
    for (name, var) in &vars {
        assert_eq!(var.dtype(), DType::F32, "{name}: trained weights stay f32");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient on {device:?}"));
        out.insert(name.clone(), host_values(g));
    }
    (value, out)
}

#[test]
fn a_lora_step_matches_the_cpu_and_every_adapter_gets_a_gradient() {
    let device = device();
    let (ref_loss, ref_grads) = lora_step(&Device::Cpu, DType::F32);
    let (loss, grads) = lora_step(&device, DType::F32);
    assert!(
        (loss - ref_loss).abs() < 1e-4,
        "f32 loss {loss} vs {ref_loss}"
    );
    assert_eq!(grads.len(), ref_grads.len());
    for (name, g) in &grads {
        assert!(
            g.iter().any(|v| *v != 0.0) && g.iter().all(|v| v.is_finite()),
            "{name}: no gradient on {device:?}"
        );
        let r = &ref_grads[name];
        let scale = r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-8);
        let worst = g.iter().zip(r).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst / scale < 1e-3,
            "{name}: f32 gradient differs by {worst} (scale {scale})"
        );
    }
    // bf16 frozen base, f32 adapters: the same loss to bf16's precision, and a non-zero
    // gradient for every trainable weight.
    let (loss16, grads16) = lora_step(&device, DType::BF16);
    eprintln!("LoRA step on {device:?}: loss f32 {loss} (CPU {ref_loss}), bf16 base {loss16}");
    assert!(
        (loss16 - ref_loss).abs() < 0.05 * ref_loss.abs().max(1.0),
        "bf16 loss {loss16} vs {ref_loss}"
    );
    let adapters = grads16.keys().filter(|n| n.contains("lora")).count();
    assert!(adapters >= 6, "{adapters} adapter variables");
    for (name, g) in &grads16 {
        assert!(
            g.iter().any(|v| *v != 0.0 && v.is_finite()),
            "{name}: no gradient with a bf16 base"
        );
    }
}

#[test]
fn the_mask_helpers_do_not_depend_on_the_device() {
    // The additive mask is built on the host and moved; its values are the same everywhere.
    let device = device();
    let mask = nn::additive_mask(&[vec![1, 1, 0]], 3, true, None, &device).unwrap();
    let cpu = nn::additive_mask(&[vec![1, 1, 0]], 3, true, None, &Device::Cpu).unwrap();
    let (a, b) = (host_values(&mask), host_values(&cpu));
    assert_eq!(a, b);
}
