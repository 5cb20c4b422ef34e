//! Decoding with the language-model head screened in int8 (`WS2S_HEAD_SCREEN=1`, so that the
//! tiny models' heads are screened on any CPU): greedy continuations equal the stepwise argmax
//! of the full f32 logits, and beam search's log-probabilities equal teacher forcing's (full
//! log-softmax) to the int8 estimates of the normaliser's tail. Its own test binary: the
//! setting is read once per process.

mod common;

use candle_core::Device;
use common::{greedy_without_cache, tiny_model as tiny};
use ws2s::models::decode::{continuation_logprobs, generate, DecodeOptions};

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
            let want = greedy_without_cache(&model, prompt, 6);
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
