//! Frozen-feature extraction: pooled features equal the pooled full forward, batching and
//! length bucketing change nothing, and the on-disk cache is reused under the right key only.

use candle_core::{Device, Tensor};
use std::path::Path;
use ws2s::models::features::{cached_features, extract, feature_key, FeatureOptions};
use ws2s::models::heads::{pool, Pooling};
use ws2s::models::params::Trainable;
use ws2s::models::{model_hash, Model};

fn gguf_model() -> (Model, std::path::PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/llama_gguf/tiny-llama.gguf");
    (
        Model::load(&path, Trainable::Frozen, 0, &Device::Cpu).unwrap(),
        path,
    )
}

const TEXTS: [&str; 5] = [
    "the weather is mild",
    "hello",
    "a much longer sentence with many words in it",
    "x",
    "Hello world",
];

/// Extracts features of `texts` in batches of `batch_size` and checks each row against the
/// pooled forward of its text alone.
fn assert_rows_equal_single_forwards(texts: &[&str], batch_size: usize) {
    let (model, _) = gguf_model();
    let options = FeatureOptions {
        batch_size,
        ..Default::default()
    };
    let batched = extract(&model, texts, &options, &Device::Cpu).unwrap();
    assert_eq!(batched.dims(), &[texts.len(), 64]);
    let tokenizer = model.tokenizer().unwrap();
    for (i, text) in texts.iter().enumerate() {
        let ids = tokenizer.encode(text).unwrap();
        let mask = vec![vec![1u32; ids.len()]];
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = model
            .network
            .hidden(&ids, &mask, &mut model.network.new_cache())
            .unwrap();
        let alone = pool(&hidden, &mask, Pooling::LastToken)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let diff = (batched.get(i).unwrap() - alone)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{text}: {diff}");
    }
}

#[test]
fn features_equal_single_example_forward_whatever_the_batching() {
    assert_rows_equal_single_forwards(&TEXTS, 2);
}

/// Answers to the same questions (as SciQ's pairs): the questions are computed once per group
/// (models::prefix), in batches that split one group, beside texts that share nothing.
#[test]
fn texts_with_shared_beginnings_get_the_features_of_their_own_forward() {
    let texts = [
        "Q: what do plants need to make sugar from light? A: water",
        "Q: what do plants need to make sugar from light? A: carbon dioxide and water",
        "Q: which gas do we breathe out? A: oxygen",
        "Q: what do plants need to make sugar from light? A: salt",
        "a sentence of its own",
        "Q: which gas do we breathe out? A: carbon dioxide",
        "Q: what do plants need to make sugar from light? A: sand",
    ];
    for batch_size in [1, 3, 32] {
        assert_rows_equal_single_forwards(&texts, batch_size);
    }
}

#[test]
fn the_cache_is_reused_and_keyed_by_everything_that_matters() {
    let (model, path) = gguf_model();
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("WS2S_HOME", dir.path());
    let hash = model_hash(&path).unwrap();
    assert_eq!(hash, ws2s::hash::sha256_file(&path).unwrap());
    assert_eq!(model_hash(&path).unwrap(), hash, "memoised hash");
    let ids = ["a", "b", "c", "d", "e"];
    let options = FeatureOptions::default();
    let cache = dir.path().join("features");
    let (first, hit) =
        cached_features(&model, &hash, &ids, &TEXTS, &options, &cache, &Device::Cpu).unwrap();
    assert!(!hit);
    let (second, hit) =
        cached_features(&model, &hash, &ids, &TEXTS, &options, &cache, &Device::Cpu).unwrap();
    assert!(hit);
    let diff = (first - second)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let key = feature_key(&hash, &ids, &TEXTS, &options);
    assert_ne!(
        key,
        feature_key(
            &hash,
            &ids,
            &TEXTS,
            &FeatureOptions {
                pooling: Pooling::Mean,
                ..Default::default()
            }
        )
    );
    assert_ne!(key, feature_key("other-model", &ids, &TEXTS, &options));
    let int8 = FeatureOptions {
        precision: ws2s::ops::Precision::Int8,
        ..Default::default()
    };
    assert_ne!(key, feature_key(&hash, &ids, &TEXTS, &int8));
    let mut texts = TEXTS;
    texts[0] = "changed";
    assert_ne!(key, feature_key(&hash, &ids, &texts, &options));
    // Only one file written, no temporary left behind.
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
}
