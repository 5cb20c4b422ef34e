//! Every architecture against reference outputs of HF transformers (tiny random checkpoints made
//! once with `tests/fixtures/models/make_fixtures.py`), KV-cache decoding against the full forward,
//! and gradient coverage (every trainable weight receives a non-zero gradient).

use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use ws2s::models::params::{LoraConfig, Trainable};
use ws2s::models::{nn, Model};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// The padded batch of a reference: its token ids and its attention mask's rows.
fn padded_batch(r: &HashMap<String, Tensor>) -> (Tensor, Vec<Vec<u32>>) {
    let mask = nn::mask_rows(&r["attention_mask"]).unwrap();
    (ids_u32(&r["input_ids"]), mask)
}

/// Largest absolute difference over the positions where `mask` is 1.
fn max_diff_on_mask(a: &Tensor, b: &Tensor, mask: &[Vec<u32>]) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in a[i][t].iter().zip(&b[i][t]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

fn load(name: &str, trainable: Trainable) -> Model {
    Model::load_hf_folder(
        &fixture(name),
        trainable,
        0,
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap()
}

const DECODERS: [&str; 5] = ["llama", "qwen2", "qwen2_untied", "gpt2", "gemma3"];

#[test]
fn decoders_match_hf_logits() {
    for name in DECODERS {
        let model = load(name, Trainable::Frozen);
        let r = reference(name);
        let (ids, mask) = padded_batch(&r);
        let hidden = model
            .network
            .hidden(&ids, &mask, &mut model.network.new_cache())
            .unwrap();
        let logits = model.network.logits(&hidden).unwrap();
        let diff = max_diff_on_mask(&logits, &r["logits"], &mask);
        assert!(diff < 1e-4, "{name}: padded batch, max |diff| {diff}");

        let ids = ids_u32(&r["input_ids_nopad"]);
        let ones = vec![vec![1u32; ids.dim(1).unwrap()]];
        let hidden = model
            .network
            .hidden(&ids, &ones, &mut model.network.new_cache())
            .unwrap();
        let logits = model.network.logits(&hidden).unwrap();
        let diff = max_diff_on_mask(&logits, &r["logits_nopad"], &ones);
        assert!(diff < 1e-4, "{name}: unpadded, max |diff| {diff}");
    }
}

#[test]
fn bert_matches_hf_hidden_states() {
    let model = load("bert", Trainable::Frozen);
    let r = reference("bert");
    let (ids, mask) = padded_batch(&r);
    let hidden = model
        .network
        .hidden(&ids, &mask, &mut model.network.new_cache())
        .unwrap();
    let diff = max_diff_on_mask(&hidden, &r["last_hidden_state"], &mask);
    assert!(diff < 1e-4, "bert: max |diff| {diff}");
}

/// Largest difference between the logits of the full forward of `ids` [1, T] and those of
/// cached decoding: the first `prefix` tokens at once, then one token per step.
fn cached_against_full(model: &Model, ids: &Tensor, prefix: usize) -> f32 {
    let t = ids.dim(1).unwrap();
    let full = {
        let hidden = model
            .network
            .hidden(ids, &[vec![1; t]], &mut model.network.new_cache())
            .unwrap();
        model.network.logits(&hidden).unwrap()
    };
    let mut cache = model.network.new_cache();
    let mut steps = Vec::new();
    let hidden = model
        .network
        .hidden(
            &ids.narrow(1, 0, prefix).unwrap(),
            &[vec![1; prefix]],
            &mut cache,
        )
        .unwrap();
    steps.push(model.network.logits(&hidden).unwrap());
    for i in prefix..t {
        let hidden = model
            .network
            .hidden(&ids.narrow(1, i, 1).unwrap(), &[vec![1]], &mut cache)
            .unwrap();
        steps.push(model.network.logits(&hidden).unwrap());
    }
    let incremental = Tensor::cat(&steps, 1).unwrap();
    max_diff_on_mask(&incremental, &full, &[vec![1; t]])
}

#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    for name in DECODERS {
        let model = load(name, Trainable::Frozen);
        let r = reference(name);
        let diff = cached_against_full(&model, &ids_u32(&r["input_ids_nopad"]), 4);
        assert!(diff < 1e-4, "{name}: cached decoding differs by {diff}");
    }
}

/// Token sequences in groups with shared beginnings of different lengths (longer than the
/// Gemma fixture's sliding window of 4, so that padding inside a row must not narrow it), and
/// one sequence that shares nothing.
fn prefix_sequences(vocab: u32) -> Vec<Vec<u32>> {
    let tok = |i: u32| 1 + (i * 37 + 11) % (vocab - 1);
    let question: Vec<u32> = (0..9).map(tok).collect();
    let short: Vec<u32> = (20..23).map(tok).collect();
    let with = |base: &[u32], tail: &[u32]| [base, tail].concat();
    vec![
        with(&question, &[tok(50), tok(51)]),
        with(&short, &[tok(52)]),
        with(&question, &[tok(53), tok(54), tok(55), tok(56)]),
        vec![tok(60), tok(61), tok(62), tok(63), tok(64), tok(65)],
        with(&short, &[tok(57), tok(58), tok(59)]),
        with(&question, &[tok(66)]),
    ]
}

/// Every decoder, in f32 and int8: the hidden states of the tokens after a
/// shared prefix (the prefix run once per group, its cache copied to the members) equal those of
/// each sequence's own full forward.
#[test]
fn shared_prefixes_give_the_hidden_states_of_each_full_forward() {
    use ws2s::models::prefix::{group_by_prefix, suffix_hidden};
    for name in DECODERS {
        let mut model = load(name, Trainable::Frozen);
        let seqs = prefix_sequences(model.network.vocab_size() as u32);
        let groups = group_by_prefix(&seqs, 2);
        let shared: Vec<usize> = groups.iter().map(|g| g.shared).collect();
        assert_eq!(
            shared.iter().filter(|&&s| s > 0).count(),
            2,
            "{name}: {groups:?}"
        );
        assert!(
            shared.contains(&9) && shared.contains(&3),
            "{name}: {groups:?}"
        );
        for precision in [ws2s::ops::Precision::F32, ws2s::ops::Precision::Int8] {
            model.network.set_precision(precision).unwrap();
            let (hidden, mask) =
                suffix_hidden(&model.network, &seqs, &groups, &Device::Cpu).unwrap();
            let hidden = hidden.to_vec3::<f32>().unwrap();
            let members = groups
                .iter()
                .flat_map(|g| g.members.iter().map(move |&i| (g.shared, i)));
            for (row, (shared, i)) in members.enumerate() {
                let t = seqs[i].len();
                let ids = Tensor::new(seqs[i].as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let full = model
                    .network
                    .hidden(&ids, &[vec![1; t]], &mut model.network.new_cache())
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                assert_eq!(mask[row].iter().filter(|&&m| m == 1).count(), t - shared);
                let tolerance = if precision == ws2s::ops::Precision::F32 {
                    1e-4
                } else {
                    2e-3
                };
                for s in 0..t - shared {
                    for (a, b) in hidden[row][s].iter().zip(&full[shared + s]) {
                        assert!(
                            (a - b).abs() < tolerance,
                            "{name} {precision:?}: sequence {i}, token {}: {a} vs {b}",
                            shared + s
                        );
                    }
                }
            }
        }
    }
}

/// Seven token rows of 1 to 9 tokens (ids below `vocab`), for batches with padding.
fn ragged_rows(vocab: u32) -> Vec<Vec<u32>> {
    [5usize, 9, 3, 9, 7, 1, 8]
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            (0..n)
                .map(|j| (r as u32 * 31 + j as u32 * 7 + 3) % vocab)
                .collect()
        })
        .collect()
}

/// Every model, in f32 and int8: a batch run in parts side by side (one per worker thread in
/// `hidden_parallel`) gives the hidden states of the batch run whole, padding included.
#[test]
fn a_batch_in_parts_equals_the_batch_whole() {
    let names = std::iter::once("bert").chain(DECODERS);
    for name in names {
        let mut model = load(name, Trainable::Frozen);
        let vocab = model.network.vocab_size() as u32;
        let rows = ragged_rows(vocab);
        let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let (ids, mask) = ws2s::models::prefix::right_pad(&rows, &Device::Cpu).unwrap();
        for precision in [ws2s::ops::Precision::F32, ws2s::ops::Precision::Int8] {
            model.network.set_precision(precision).unwrap();
            let whole = model
                .network
                .hidden(&ids, &mask, &mut model.network.new_cache())
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            for parts in [2, 3, 7, 20] {
                let split = model
                    .network
                    .hidden_in_parts(&ids, &mask, parts)
                    .unwrap()
                    .to_vec3::<f32>()
                    .unwrap();
                assert_eq!(split, whole, "{name} {precision:?}, {parts} parts");
            }
        }
    }
}

/// Every model, in f32 and int8, right- and left-padded: the final hidden states at each
/// sequence's last token, with the last layer's work after attention done for those positions
/// alone (`last_hidden`, whole and in parts, and after shared prefixes), equal those positions of
/// the full forward.
#[test]
fn the_last_positions_alone_equal_those_of_the_full_forward() {
    use ws2s::models::heads::{pool, Pooling};
    use ws2s::models::prefix::{group_by_prefix, right_pad, suffix_hidden, suffix_last_hidden};
    let names = std::iter::once("bert").chain(DECODERS);
    for name in names {
        let mut model = load(name, Trainable::Frozen);
        let vocab = model.network.vocab_size() as u32;
        let rows = ragged_rows(vocab);
        let slices: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let (ids, right) = right_pad(&slices, &Device::Cpu).unwrap();
        // Left padding (as for decoding's prompts): the same tokens moved to the end of each row.
        let t = ids.dim(1).unwrap();
        let mut left_ids = vec![0u32; rows.len() * t];
        let mut left = vec![vec![0u32; t]; rows.len()];
        for (r, row) in rows.iter().enumerate() {
            left_ids[r * t + t - row.len()..(r + 1) * t].copy_from_slice(row);
            left[r][t - row.len()..].fill(1);
        }
        let left_ids = Tensor::from_vec(left_ids, (rows.len(), t), &Device::Cpu).unwrap();
        let mut cases = vec![(ids, right)];
        if model.network.is_decoder() {
            cases.push((left_ids, left));
        }
        for precision in [ws2s::ops::Precision::F32, ws2s::ops::Precision::Int8] {
            model.network.set_precision(precision).unwrap();
            let network = &model.network;
            for (case, (ids, mask)) in cases.iter().enumerate() {
                let full = network.hidden(ids, mask, &mut network.new_cache()).unwrap();
                let want = pool(&full, mask, Pooling::LastToken)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let alone = network
                    .last_hidden(ids, mask, &mut network.new_cache())
                    .unwrap();
                assert_eq!(alone.dims(), &[rows.len(), network.hidden_size()]);
                let alone = alone.to_vec2::<f32>().unwrap();
                let what = format!("{name} {precision:?} case {case}");
                assert_same(&alone, &want, precision, &what);
                let parts = network
                    .last_hidden_parallel(ids, mask)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                assert_eq!(parts, alone, "{what}, in parts");
            }
            if !network.is_decoder() {
                continue;
            }
            let seqs = prefix_sequences(vocab);
            let groups = group_by_prefix(&seqs, 2);
            let (hidden, mask) = suffix_hidden(network, &seqs, &groups, &Device::Cpu).unwrap();
            let want = pool(&hidden, &mask, Pooling::LastToken)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = suffix_last_hidden(network, &seqs, &groups, &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let what = format!("{name} {precision:?} after shared prefixes");
            assert_same(&got, &want, precision, &what);
        }
    }
}

/// int8: the same bits (integer products, the same float steps per row). f32: within rounding,
/// as the full forward of a fresh batch may run each layer as one fused op, which the last
/// layer of a forward that keeps some positions does not.
fn assert_same(got: &[Vec<f32>], want: &[Vec<f32>], precision: ws2s::ops::Precision, what: &str) {
    if precision == ws2s::ops::Precision::Int8 {
        assert_eq!(got, want, "{what}");
        return;
    }
    let worst = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "{what}: {worst}");
}

/// A loss that depends on every output coordinate in a non-symmetric way (a plain sum of a
/// LayerNorm output has zero gradient upstream).
fn probe_loss(output: &Tensor) -> Tensor {
    let n = output.elem_count();
    let weights: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5)
        .collect();
    let weights = Tensor::from_vec(weights, output.shape(), output.device()).unwrap();
    (output * weights).unwrap().sum_all().unwrap()
}

fn output_of(model: &Model, name: &str) -> Tensor {
    let r = reference(name);
    let (ids, mask) = padded_batch(&r);
    let hidden = model
        .network
        .hidden(&ids, &mask, &mut model.network.new_cache())
        .unwrap();
    if model.network.is_decoder() {
        model.network.logits(&hidden).unwrap()
    } else {
        hidden
    }
}

/// Every trainable variable of the model received a non-zero gradient.
fn assert_every_var_has_a_gradient(
    name: &str,
    model: &Model,
    grads: &candle_core::backprop::GradStore,
) {
    assert_gradients_except(name, model, grads, None);
}

/// [`assert_every_var_has_a_gradient`] but for the variables whose names start with `except`.
fn assert_gradients_except(
    name: &str,
    model: &Model,
    grads: &candle_core::backprop::GradStore,
    except: Option<&str>,
) {
    for (param, var) in &model.vars {
        if except.is_some_and(|prefix| param.starts_with(prefix)) {
            continue;
        }
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {param}"));
        let norm = grad
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient for {param}");
    }
}

#[test]
fn every_weight_gets_a_gradient_in_full_fine_tuning() {
    for name in ["bert", "llama", "qwen2", "qwen2_untied", "gpt2", "gemma3"] {
        let model = load(name, Trainable::All);
        assert!(!model.vars.is_empty());
        let grads = probe_loss(&output_of(&model, name)).backward().unwrap();
        assert_every_var_has_a_gradient(name, &model, &grads);
    }
}

/// Fine-tuning on last-token features runs the last layer's work after attention for the last
/// positions alone (`last_hidden`): every weight the features depend on still gets a gradient
/// (all but an untied LM head, which features never use).
#[test]
fn every_weight_gets_a_gradient_through_the_last_positions_alone() {
    for name in ["bert", "llama", "qwen2", "qwen2_untied", "gpt2", "gemma3"] {
        let model = load(name, Trainable::All);
        let r = reference(name);
        let (ids, mask) = padded_batch(&r);
        let last = model
            .network
            .last_hidden(&ids, &mask, &mut model.network.new_cache())
            .unwrap();
        let grads = probe_loss(&last.unsqueeze(1).unwrap()).backward().unwrap();
        assert_gradients_except(name, &model, &grads, Some("lm_head"));
    }
}

#[test]
fn with_lora_only_the_adapters_are_trained_and_all_get_gradients() {
    let targets = |name: &str| -> Vec<String> {
        match name {
            "bert" => vec!["query".into(), "value".into()],
            "gpt2" => vec!["c_attn".into()],
            _ => vec!["q_proj".into(), "v_proj".into()],
        }
    };
    for name in ["bert", "llama", "qwen2", "gpt2", "gemma3"] {
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: targets(name),
        };
        let model = load(name, Trainable::Lora(lora));
        assert!(!model.vars.is_empty(), "{name}");
        assert!(
            model
                .vars
                .keys()
                .all(|k| k.ends_with(".lora_a") || k.ends_with(".lora_b")),
            "{name}"
        );
        // B starts at zero, so A's gradient is zero on the first step; move B once, as an
        // optimiser step would, then check both.
        let grads = probe_loss(&output_of(&model, name)).backward().unwrap();
        for (param, var) in model.vars.iter().filter(|(k, _)| k.ends_with(".lora_b")) {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {param}"));
            var.set(&(var.as_tensor() - (grad * 0.1).unwrap()).unwrap())
                .unwrap();
        }
        let grads = probe_loss(&output_of(&model, name)).backward().unwrap();
        assert_every_var_has_a_gradient(name, &model, &grads);
        // LoRA at initialisation changes nothing.
        let base = load(name, Trainable::Frozen);
        let fresh = load(
            name,
            Trainable::Lora(LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: targets(name),
            }),
        );
        let diff = (output_of(&base, name) - output_of(&fresh, name))
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(D::Minus1)
            .unwrap();
        // Up to f32 rounding: a frozen BERT runs each layer as one fused op, summing in another
        // order than the layer-by-layer path that the adapters take.
        let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            diff <= 1e-5,
            "{name}: LoRA at initialisation moved the output by {diff}"
        );
    }
}

/// Relative RMS error of `a` against the reference `b` on the unmasked positions.
fn relative_rms_on_mask(a: &Tensor, b: &Tensor, mask: &[Vec<u32>]) -> f32 {
    let (a, b) = (
        a.to_vec3::<f32>().unwrap(),
        b.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap(),
    );
    let (mut err, mut norm) = (0f64, 0f64);
    for (i, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in a[i][t].iter().zip(&b[i][t]) {
                    err += ((x - y) as f64).powi(2);
                    norm += (*y as f64).powi(2);
                }
            }
        }
    }
    (err / norm).sqrt() as f32
}

#[test]
fn int8_forward_stays_close_to_the_reference_and_is_batch_invariant() {
    use ws2s::ops::Precision;
    for name in DECODERS.iter().chain(&["bert"]) {
        let mut model = load(name, Trainable::Frozen);
        model.network.set_precision(Precision::Int8).unwrap();
        let r = reference(name);
        let mask = nn::mask_rows(&r["attention_mask"]).unwrap();
        let ids = ids_u32(&r["input_ids"]);
        let hidden = model
            .network
            .hidden(&ids, &mask, &mut model.network.new_cache())
            .unwrap();
        let (out, want) = if *name == "bert" {
            (hidden.clone(), &r["last_hidden_state"])
        } else {
            (model.network.logits(&hidden).unwrap(), &r["logits"])
        };
        let rel = relative_rms_on_mask(&out, want, &mask);
        // Measured 1.8-3.4% (bert .. llama): 8-bit values carry ~2 significant digits, and
        // these tiny random models' outputs are sums of few, similar-sized terms.
        assert!(rel < 0.05, "{name}: int8 relative RMS error {rel}");
        assert!(
            rel > 0.0,
            "{name}: int8 gave exactly f32's values (not used?)"
        );
        // Each row is quantized on its own: a sequence alone gives the values it gets in the
        // padded batch (up to the f32 attention's rounding).
        let alone = ids.narrow(0, 0, 1).unwrap();
        let row0: Vec<u32> = mask[0].clone();
        let kept = row0.iter().filter(|&&m| m == 1).count();
        if kept == row0.len() {
            let single = model
                .network
                .hidden(
                    &alone,
                    std::slice::from_ref(&row0),
                    &mut model.network.new_cache(),
                )
                .unwrap();
            let diff = max_diff_on_mask(&single, &hidden.narrow(0, 0, 1).unwrap(), &[row0]);
            assert!(
                diff < 1e-4,
                "{name}: int8 batch row and single row differ by {diff}"
            );
        }
        // Back to f32: the packed copies are dropped and the reference values return.
        model.network.set_precision(Precision::F32).unwrap();
        let hidden = model
            .network
            .hidden(&ids, &mask, &mut model.network.new_cache())
            .unwrap();
        let out = if *name == "bert" {
            hidden
        } else {
            model.network.logits(&hidden).unwrap()
        };
        let diff = max_diff_on_mask(&out, want, &mask);
        assert!(diff < 1e-4, "{name}: f32 after int8 differs by {diff}");
    }
}

#[test]
fn bf16x2_forward_stays_close_to_the_reference() {
    // bf16 weights and activations as bf16 pairs ([`ws2s::ops::bf16x2`]): the tile kernel
    // where the CPU has AMX-BF16, the definition's scalar code elsewhere.
    use ws2s::ops::Precision;
    for name in DECODERS.iter().chain(&["bert"]) {
        let mut model = load(name, Trainable::Frozen);
        let r = reference(name);
        let mask = nn::mask_rows(&r["attention_mask"]).unwrap();
        let ids = ids_u32(&r["input_ids"]);
        let run = |model: &ws2s::models::Model| {
            let hidden = model
                .network
                .hidden(&ids, &mask, &mut model.network.new_cache())
                .unwrap();
            if *name == "bert" {
                hidden
            } else {
                model.network.logits(&hidden).unwrap()
            }
        };
        model.network.set_precision(Precision::Int8).unwrap();
        let want = if *name == "bert" {
            &r["last_hidden_state"]
        } else {
            &r["logits"]
        };
        let int8 = relative_rms_on_mask(&run(&model), want, &mask);
        model.network.set_precision(Precision::Bf16x2).unwrap();
        let rel = relative_rms_on_mask(&run(&model), want, &mask);
        // These fixtures' weights are f32: rounding them to bf16 (8 significant bits) is the
        // error, ~2^-9 per weight; measured 0.34-0.57%, 5-6x below int8's 1.7-3.2%.
        assert!(
            rel < 0.01 && rel < int8 / 3.0,
            "{name}: bf16x2 relative RMS error {rel} (int8: {int8})"
        );
        assert!(
            rel > 0.0,
            "{name}: bf16x2 gave exactly f32's values (not used?)"
        );
        if *name != "bert" {
            let diff = cached_against_full(&model, &ids_u32(&r["input_ids_nopad"]), 1);
            assert!(
                diff < 1e-4,
                "{name}: bf16x2 cached decoding differs by {diff}"
            );
        }
    }
}

#[test]
fn int8_cached_decoding_matches_the_int8_full_forward() {
    use ws2s::ops::Precision;
    for name in DECODERS {
        let mut model = load(name, Trainable::Frozen);
        model.network.set_precision(Precision::Int8).unwrap();
        let r = reference(name);
        let diff = cached_against_full(&model, &ids_u32(&r["input_ids_nopad"]), 1);
        assert!(
            diff < 1e-4,
            "{name}: int8 cached decoding differs by {diff}"
        );
    }
}

/// A model loaded for int8 inference (each layer packed as it is built, no f32 copy kept; GGUF
/// tensors de-quantised one at a time) gives the hidden states of a model loaded in f32 and
/// then packed, and refuses to switch to f32 with a message that says why.
#[test]
fn loading_for_int8_inference_equals_loading_then_packing() {
    use ws2s::ops::Precision;
    let mut paths: Vec<PathBuf> = ["llama", "qwen2", "gpt2", "gemma3", "bert"]
        .iter()
        .map(|name| fixture(name))
        .collect();
    paths.push(fixture("llama_gguf").join("tiny-llama.gguf"));
    for (path, precision) in paths
        .iter()
        .flat_map(|p| [(p, Precision::Int8), (p, Precision::Bf16x2)])
    {
        let mut reference = Model::load(path, Trainable::Frozen, 0, &Device::Cpu).unwrap();
        reference.network.set_precision(precision).unwrap();
        let mut packed = Model::load_for_inference(path, precision, &Device::Cpu).unwrap();
        let ids =
            Tensor::new(&[[3u32, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7]], &Device::Cpu).unwrap();
        let mask = vec![vec![1u32; 6], vec![1, 1, 1, 1, 0, 0]];
        let hidden = |m: &Model| {
            m.network
                .hidden(&ids, &mask, &mut m.network.new_cache())
                .unwrap()
        };
        let diff = max_diff_on_mask(&hidden(&reference), &hidden(&packed), &mask);
        assert_eq!(
            diff,
            0.0,
            "{} {precision:?}: differs by {diff}",
            path.display()
        );
        // The GGUF file's token embeddings (Q8_0) stay quantised in `packed`: its tied head
        // de-quantises them whole at the first logits, to the same values.
        if reference.network.is_decoder() {
            let logits = |m: &Model| {
                m.network
                    .logits(&hidden(m))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(logits(&reference), logits(&packed), "{}", path.display());
        }
        assert_eq!(
            reference.parameters,
            packed.parameters,
            "{}",
            path.display()
        );
        let err = packed.network.set_precision(Precision::F32).unwrap_err();
        assert!(
            format!("{err:#}").contains("kept no f32 weights"),
            "{}: {err:#}",
            path.display()
        );
        // Packing again is allowed (and changes nothing).
        packed.network.set_precision(precision).unwrap();
        assert_eq!(
            max_diff_on_mask(&hidden(&reference), &hidden(&packed), &mask),
            0.0
        );
    }
}
