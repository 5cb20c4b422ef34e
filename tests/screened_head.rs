//! Decoding with the language-model head screened in int8 (`WS2S_HEAD_SCREEN=1`, so that the
//! tiny models' heads are screened on any CPU): greedy continuations equal the stepwise argmax
//! of the full f32 logits, and beam search's log-probabilities equal teacher forcing's (full
//! log-softmax) to the int8 estimates of the normaliser's tail. Its own test binary: the
//! setting is read once per process.

use candle_core::{Device, Tensor, D};
use std::path::Path;
use ws2s::models::decode::{continuation_logprobs, generate, DecodeOptions};
use ws2s::models::params::Trainable;
use ws2s::models::Model;

fn tiny(name: &str) -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name);
    Model::load(&dir, Trainable::Frozen, 0, &Device::Cpu).unwrap()
}

/// The argmax of the full f32 logits at the last position, step by step.
fn stepwise_argmax(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..steps {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut cache = model.network.new_cache();
        let hidden = model
            .network
            .hidden(&ids, &[vec![1; seq.len()]], &mut cache)
            .unwrap();
        let logits = model.network.logits(&hidden).unwrap();
        let last = logits
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap();
        seq.push(last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn screened_decoding_keeps_f32_tokens_and_log_probabilities() {
    std::env::set_var("WS2S_HEAD_SCREEN", "1");
    let prompts = vec![vec![3u32, 14, 15, 92], vec![65u32, 35], vec![7u32, 7, 7]];
    for name in ["llama", "qwen2", "gpt2", "gemma3"] {
        let model = tiny(name);
        assert!(model.network.screens_head(), "{name}: head not screened");
        let greedy = DecodeOptions {
            max_new_tokens: 6,
            ..Default::default()
        };
        let got = generate(&model.network, &prompts, &greedy, &Device::Cpu).unwrap();
        for (prompt, hyps) in prompts.iter().zip(&got) {
            let want = stepwise_argmax(&model, prompt, 6);
            assert_eq!(hyps[0].tokens, want[..hyps[0].tokens.len()], "{name}");
        }
        let beams = DecodeOptions {
            max_new_tokens: 5,
            beams: 4,
            n_best: 4,
            eos_ids: vec![],
            length_penalty: 1.0,
            early_stopping: false,
            json_stop: None,
        };
        let got = generate(&model.network, &prompts, &beams, &Device::Cpu).unwrap();
        for (prompt, hyps) in prompts.iter().zip(&got) {
            assert_eq!(hyps.len(), 4, "{name}");
            let conts: Vec<Vec<u32>> = hyps.iter().map(|h| h.tokens.clone()).collect();
            let forced = continuation_logprobs(
                &model.network,
                &vec![prompt.clone(); hyps.len()],
                &conts,
                &Device::Cpu,
            )
            .unwrap();
            for (h, f) in hyps.iter().zip(&forced) {
                for (a, b) in h.logprobs.iter().zip(f) {
                    assert!((a - b).abs() < 2e-3, "{name}: {a} vs {b}");
                }
            }
        }
    }
}
