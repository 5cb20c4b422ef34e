//! GGUF loading: a tiny fixture (same weights as the `llama` HF fixture, one tensor in Q8_0),
//! broken files, and, when `scripts/fetch-models` has installed them, the real models: their
//! tokenizers against the original tokenizers, and the "Berlin" continuation.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use ws2s::home::Home;
use ws2s::models::decode::{generate, DecodeOptions};
use ws2s::models::params::Trainable;
use ws2s::models::{nn, Model};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_diff_on_mask(a: &Tensor, b: &Tensor, mask: &[Vec<u32>]) -> f32 {
    let a = a.to_vec3::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, row) in mask.iter().enumerate() {
        for (t, _) in row.iter().enumerate().filter(|(_, &m)| m == 1) {
            for (x, y) in a[i][t].iter().zip(&b[i][t]) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    worst
}

#[test]
fn tiny_gguf_matches_the_dequantised_reference() {
    let dir = fixtures().join("models/llama_gguf");
    let model = Model::load(
        &dir.join("tiny-llama.gguf"),
        Trainable::Frozen,
        0,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.network.architecture(), "llama");
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference_q.safetensors"), &Device::Cpu).unwrap();
    for (ids, mask, logits) in [
        ("input_ids", Some("attention_mask"), "logits"),
        ("input_ids_nopad", None, "logits_nopad"),
    ] {
        let ids = r[ids].to_dtype(DType::U32).unwrap();
        let mask = match mask {
            Some(m) => nn::mask_rows(&r[m]).unwrap(),
            None => vec![vec![1; ids.dim(1).unwrap()]],
        };
        let hidden = model
            .network
            .hidden(&ids, &mask, &mut model.network.new_cache())
            .unwrap();
        let ours = model.network.logits(&hidden).unwrap();
        let diff = max_diff_on_mask(&ours, &r[logits], &mask);
        assert!(diff < 1e-4, "{logits}: max |diff| {diff}");
    }
}

#[test]
fn tiny_gguf_tokenizer_matches_its_hf_equivalent() {
    let dir = fixtures().join("models/llama_gguf");
    let model = Model::load(
        &dir.join("tiny-llama.gguf"),
        Trainable::Frozen,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let ours = model.tokenizer().unwrap();
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for text in [
        "the weather is mild",
        "Hello world",
        "in   2017 there were  42 items",
        "a{b}c<|im_end|>",
    ] {
        let expected = reference.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ours.encode_plain(text).unwrap(), expected, "{text}");
    }
    assert_eq!(ours.eos_ids, vec![2]);
}

#[test]
fn broken_gguf_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("models/llama_gguf/tiny-llama.gguf")).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        Model::load(&truncated, Trainable::Frozen, 0, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("truncated.gguf"), "{err}");
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a gguf file at all").unwrap();
    let err = format!(
        "{:#}",
        Model::load(&garbage, Trainable::Frozen, 0, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("not a readable GGUF file"), "{err}");
}

#[test]
fn broken_hf_folders_are_clear_errors() {
    let source = fixtures().join("models/qwen2");
    let dir = tempfile::tempdir().unwrap();
    let copy = |name: &str| std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
    copy("config.json");
    // no safetensors at all
    let err = format!(
        "{:#}",
        Model::load(dir.path(), Trainable::Frozen, 0, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("no model.safetensors"), "{err}");
    // truncated safetensors
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() - 100],
    )
    .unwrap();
    let err = format!(
        "{:#}",
        Model::load(dir.path(), Trainable::Frozen, 0, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("not a readable safetensors file"), "{err}");
    // wrong shape: a config that asks for a bigger model than the checkpoint holds
    copy("model.safetensors");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["intermediate_size"] = serde_json::json!(256);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = format!(
        "{:#}",
        Model::load(dir.path(), Trainable::Frozen, 0, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("has shape [128, 64], expected [256, 64]"),
        "{err}"
    );
    // unknown architecture
    config["model_type"] = serde_json::json!("mamba");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = format!(
        "{:#}",
        Model::load(dir.path(), Trainable::Frozen, 0, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("unknown architecture `mamba`"), "{err}");
    // missing tokenizer: the model loads, asking for its tokenizer is an error
    config["model_type"] = serde_json::json!("qwen2");
    config["intermediate_size"] = serde_json::json!(128);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let model = Model::load(dir.path(), Trainable::Frozen, 0, &Device::Cpu).unwrap();
    let err = model.tokenizer().err().unwrap().to_string();
    assert!(err.contains("tokenizer.json is missing"), "{err}");
}

#[test]
fn transformers_4x_config_layouts_load_the_same_model() {
    for name in ["qwen2", "gemma3"] {
        let source = fixtures().join("models").join(name);
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            source.join("config_v4.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        std::fs::copy(
            source.join("model.safetensors"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let model = Model::load(dir.path(), Trainable::Frozen, 0, &Device::Cpu).unwrap();
        let r: HashMap<String, Tensor> =
            candle_core::safetensors::load(source.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let ids = r["input_ids_nopad"].to_dtype(DType::U32).unwrap();
        let mask = vec![vec![1; ids.dim(1).unwrap()]];
        let hidden = model
            .network
            .hidden(&ids, &mask, &mut model.network.new_cache())
            .unwrap();
        let diff = max_diff_on_mask(
            &model.network.logits(&hidden).unwrap(),
            &r["logits_nopad"],
            &mask,
        );
        assert!(diff < 1e-4, "{name} (4.x config): max |diff| {diff}");
    }
}

/// The installed model file, or `None` with a printed reason.
fn installed(relative: &str) -> Option<PathBuf> {
    let path = Home::from_env().models().join(relative);
    if path.exists() {
        Some(path)
    } else {
        println!(
            "skipped: {} is not installed (run scripts/fetch-models)",
            path.display()
        );
        None
    }
}

#[test]
fn real_gguf_tokenizers_match_the_original_tokenizers() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf_tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    for (name, entry) in cases["models"].as_object().unwrap() {
        let Some(path) = installed(entry["gguf"].as_str().unwrap()) else {
            continue;
        };
        let file = ws2s::models::gguf::GgufFile::open(&path).unwrap();
        let tokenizer = ws2s::models::tokenizer::Tokenizer::from_gguf(&file).unwrap();
        for case in entry["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                tokenizer.encode_plain(text).unwrap(),
                expected,
                "{name}: {text:?}"
            );
        }
        assert_eq!(
            tokenizer.add_bos,
            entry["add_bos_token"].as_bool().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn real_decoders_continue_with_berlin() {
    for relative in [
        "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "gemma3-270m/gemma-3-270m-q4_k_m.gguf",
    ] {
        let Some(path) = installed(relative) else {
            continue;
        };
        let model = Model::load(&path, Trainable::Frozen, 0, &Device::Cpu).unwrap();
        let tokenizer = model.tokenizer().unwrap();
        let prompt = tokenizer
            .encode("The capital of France is Paris. The capital of Germany is")
            .unwrap();
        let options = DecodeOptions {
            max_new_tokens: 2,
            ..Default::default()
        };
        let out = generate(&model.network, &[prompt], &options, &Device::Cpu).unwrap();
        let text = tokenizer.decode(&out[0][0].tokens).unwrap();
        assert!(
            text.starts_with(" Berlin"),
            "{relative}: continued with {text:?}"
        );
    }
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let source = fixtures().join("models/qwen2");
    let tensors =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let subset: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&subset, dir.path().join(shard)).unwrap();
        for name in part {
            weight_map.insert((*name).clone(), serde_json::json!(shard));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = Model::load(dir.path(), Trainable::Frozen, 0, &Device::Cpu).unwrap();
    let single = Model::load(&source, Trainable::Frozen, 0, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 6, 7, 8]], &Device::Cpu).unwrap();
    let mask = vec![vec![1u32; 4]];
    let a = sharded
        .network
        .logits(
            &sharded
                .network
                .hidden(&ids, &mask, &mut sharded.network.new_cache())
                .unwrap(),
        )
        .unwrap();
    let b = single
        .network
        .logits(
            &single
                .network
                .hidden(&ids, &mask, &mut single.network.new_cache())
                .unwrap(),
        )
        .unwrap();
    assert_eq!(max_diff_on_mask(&a, &b, &mask), 0.0);
}

#[test]
fn hf_tokenizers_do_not_pad_and_add_bert_specials() {
    let Some(path) = installed("all-minilm-l6-v2") else {
        return;
    };
    let model = Model::load(&path, Trainable::Frozen, 0, &Device::Cpu).unwrap();
    let tokenizer = model.tokenizer().unwrap();
    let ids = tokenizer.encode("Q: what is water? A: h2o").unwrap();
    // [CLS] ... [SEP], no padding to the 128 tokens of the file's padding setting
    assert!(ids.len() < 20, "{ids:?}");
    assert_eq!((ids[0], *ids.last().unwrap()), (101, 102));
}

/// A GGUF model whose token embeddings are quantised (here the fixture's, re-stored in Q8_0),
/// loaded for int8 inference, keeps them quantised and reads them row by row: its hidden
/// states and its (tied) head's logits equal those of the model loaded whole and then packed.
#[test]
fn quantised_embeddings_read_by_rows_give_the_values_of_the_whole_table() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let source = fixtures().join("models/llama_gguf/tiny-llama.gguf");
    let mut file = std::fs::File::open(&source).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        let mut q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        if name == "token_embd.weight" {
            let values = q.dequantize(&Device::Cpu).unwrap();
            q = QTensor::quantize(&values, GgmlDType::Q8_0).unwrap();
        }
        tensors.push((name.clone(), q));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama-q8-embeddings.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    drop(out);

    let precision = ws2s::ops::Precision::Int8;
    let mut reference = Model::load(&path, Trainable::Frozen, 0, &Device::Cpu).unwrap();
    reference.network.set_precision(precision).unwrap();
    let packed = Model::load_for_inference(&path, precision, &Device::Cpu).unwrap();
    assert_eq!(reference.parameters, packed.parameters);
    let ids = Tensor::new(&[[3u32, 14, 15, 9, 2, 6], [5, 3, 5, 8, 9, 7]], &Device::Cpu).unwrap();
    let mask = vec![vec![1u32; 6], vec![1, 1, 1, 1, 0, 0]];
    let hidden = |m: &Model| {
        m.network
            .hidden(&ids, &mask, &mut m.network.new_cache())
            .unwrap()
    };
    let (a, b) = (hidden(&reference), hidden(&packed));
    assert_eq!(max_diff_on_mask(&a, &b, &mask), 0.0);
    let logits = |m: &Model, h: &Tensor| {
        m.network
            .logits(h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(logits(&reference, &a), logits(&packed, &b));
    // A token id outside the vocabulary is an error, not a read past the table.
    let bad = Tensor::new(&[[3u32, 4000]], &Device::Cpu).unwrap();
    let err = packed
        .network
        .hidden(&bad, &[vec![1, 1]], &mut packed.network.new_cache())
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("outside the vocabulary"),
        "{err:#}"
    );
}
