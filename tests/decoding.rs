//! Greedy and beam search against the full forward pass, batching against single prompts, and
//! teacher-forced scoring against the decoder's own per-token log-probabilities.

mod common;

use candle_core::Device;
use common::{greedy_without_cache, tiny_model as tiny};
use ws2s::models::decode::{continuation_logprobs, generate, DecodeOptions};
use ws2s::models::Model;

#[test]
fn greedy_matches_stepwise_argmax_and_batching_changes_nothing() {
    for name in ["llama", "qwen2", "gpt2", "gemma3"] {
        let model = tiny(name);
        let prompts = vec![vec![5u32, 9, 17, 33, 2, 8], vec![40u32, 41]];
        let options = DecodeOptions {
            max_new_tokens: 6,
            ..Default::default()
        };
        let batched = generate(&model.network, &prompts, &options, &Device::Cpu).unwrap();
        for (prompt, hyps) in prompts.iter().zip(&batched) {
            assert_eq!(hyps.len(), 1);
            assert_eq!(
                hyps[0].tokens,
                greedy_without_cache(&model, prompt, 6),
                "{name}"
            );
            let alone = generate(
                &model.network,
                std::slice::from_ref(prompt),
                &options,
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(
                alone[0][0].tokens, hyps[0].tokens,
                "{name}: batched vs alone"
            );
            for (a, b) in alone[0][0].logprobs.iter().zip(&hyps[0].logprobs) {
                assert!((a - b).abs() < 1e-4, "{name}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn beam_search_returns_sorted_n_best_with_consistent_logprobs() {
    let model = tiny("qwen2");
    let prompts = vec![vec![3u32, 14, 15, 92], vec![65u32, 35]];
    let options = DecodeOptions {
        max_new_tokens: 5,
        beams: 4,
        n_best: 4,
        eos_ids: vec![2],
        length_penalty: 1.0,
        early_stopping: false,
        json_stop: None,
    };
    let results = generate(&model.network, &prompts, &options, &Device::Cpu).unwrap();
    for (prompt, hyps) in prompts.iter().zip(&results) {
        assert_eq!(hyps.len(), 4);
        assert!(hyps.windows(2).all(|w| w[0].score >= w[1].score));
        let distinct: std::collections::HashSet<_> =
            hyps.iter().map(|h| h.tokens.clone()).collect();
        assert_eq!(distinct.len(), 4, "hypotheses must differ");
        // The log-probabilities reported by cached beam search equal teacher forcing.
        let prompts_rep = vec![prompt.clone(); hyps.len()];
        let conts: Vec<Vec<u32>> = hyps.iter().map(|h| h.tokens.clone()).collect();
        let forced =
            continuation_logprobs(&model.network, &prompts_rep, &conts, &Device::Cpu).unwrap();
        for (h, f) in hyps.iter().zip(&forced) {
            for (a, b) in h.logprobs.iter().zip(f) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
            let expected = h.sum_logprob() / h.tokens.len() as f32;
            assert!((h.score - expected).abs() < 1e-5);
        }
    }
    // A beam of one is greedy.
    let greedy = generate(
        &model.network,
        &prompts,
        &DecodeOptions {
            max_new_tokens: 5,
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let one = generate(
        &model.network,
        &prompts,
        &DecodeOptions {
            max_new_tokens: 5,
            beams: 1,
            n_best: 1,
            eos_ids: vec![],
            length_penalty: 1.0,
            early_stopping: false,
            json_stop: None,
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(greedy, one);
}

#[test]
fn eos_ends_a_hypothesis() {
    let model = tiny("llama");
    let prompt = vec![vec![7u32, 8, 9]];
    let free = generate(
        &model.network,
        &prompt,
        &DecodeOptions {
            max_new_tokens: 4,
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let first = free[0][0].tokens[0];
    let stopped = generate(
        &model.network,
        &prompt,
        &DecodeOptions {
            max_new_tokens: 4,
            eos_ids: vec![first],
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(stopped[0][0].tokens, vec![first]);
}

#[test]
fn encoders_cannot_generate() {
    let model = tiny("bert");
    let err = generate(
        &model.network,
        &[vec![1, 2]],
        &DecodeOptions::default(),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("decoder"));
}

#[test]
fn a_closed_json_object_ends_a_hypothesis() {
    use std::sync::Arc;
    use ws2s::models::decode::BraceTable;
    let model = tiny("qwen2");
    let prompt = vec![vec![11u32, 12, 13]];
    let free = generate(
        &model.network,
        &prompt,
        &DecodeOptions {
            max_new_tokens: 6,
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let t = &free[0][0].tokens;
    assert_eq!(t.len(), 6);
    // Pretend the first generated token opens an object.
    let vocab = 1 + *t.iter().max().unwrap() as usize;
    let mut pieces: Vec<Option<String>> = vec![Some("x".into()); vocab];
    pieces[t[0] as usize] = Some("▁{\"".into());
    // The first later token that differs from the opening one closes every object opened.
    let at = (1..t.len())
        .find(|&i| t[i] != t[0])
        .expect("a random model that repeats one token six times");
    pieces[t[at] as usize] = Some(format!("\"{}", "}".repeat(at)));
    let table = BraceTable::from_pieces(pieces.iter().map(Option::as_deref));
    let stopped = generate(
        &model.network,
        &prompt,
        &DecodeOptions {
            max_new_tokens: 6,
            json_stop: Some(Arc::new(table)),
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(stopped[0][0].tokens, t[..=at].to_vec());
}

#[test]
fn beam_search_in_a_batch_equals_beam_search_alone() {
    // Prompts of different lengths finish at different steps and leave the batch.
    let model = tiny("llama");
    let prompts = vec![vec![3u32, 4, 5, 6, 7], vec![9u32], vec![20u32, 21, 22]];
    for early_stopping in [false, true] {
        let options = DecodeOptions {
            max_new_tokens: 7,
            beams: 3,
            n_best: 3,
            eos_ids: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            early_stopping,
            ..Default::default()
        };
        batched_equals_alone(&model, &prompts, &options);
    }
}

#[test]
fn early_stopping_returns_finished_hypotheses_and_changes_nothing_for_a_full_list() {
    let model = tiny("llama");
    let prompts = vec![vec![3u32, 4, 5], vec![40u32], vec![7u32, 8, 9, 10]];
    let eos: Vec<u32> = (1..=12).collect();
    let full = DecodeOptions {
        max_new_tokens: 40,
        beams: 3,
        n_best: 3,
        eos_ids: eos.clone(),
        ..Default::default()
    };
    // Asking for every beam: the same stopping rule, the same lists.
    let early = DecodeOptions {
        early_stopping: true,
        ..full.clone()
    };
    let a = generate(&model.network, &prompts, &full, &Device::Cpu).unwrap();
    let b = generate(&model.network, &prompts, &early, &Device::Cpu).unwrap();
    assert_eq!(a, b);
    // One hypothesis: it is a finished one (the search stopped before the length limit).
    let one = DecodeOptions { n_best: 1, ..early };
    for hyps in generate(&model.network, &prompts, &one, &Device::Cpu).unwrap() {
        assert!(
            eos.contains(hyps[0].tokens.last().unwrap()),
            "{:?}",
            hyps[0].tokens
        );
    }
}

fn batched_equals_alone(model: &Model, prompts: &[Vec<u32>], options: &DecodeOptions) {
    let batched = generate(&model.network, prompts, options, &Device::Cpu).unwrap();
    for (prompt, hyps) in prompts.iter().zip(&batched) {
        let alone = generate(
            &model.network,
            std::slice::from_ref(prompt),
            options,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(alone[0].len(), hyps.len());
        for (a, b) in alone[0].iter().zip(hyps) {
            assert_eq!(a.tokens, b.tokens);
            assert!((a.score - b.score).abs() < 1e-4);
        }
    }
}

/// Candidates scored against one prompt share the prompt's keys and values; their per-token
/// log-probabilities equal those of each prompt and continuation run whole (the differentiable
/// path, which shares nothing), in any order and with empty continuations among them.
#[test]
fn scoring_with_shared_prompts_matches_each_sequence_run_whole() {
    use ws2s::models::decode::continuation_logprobs_tensor;
    for name in ["llama", "qwen2", "gpt2", "gemma3"] {
        let model = tiny(name);
        let long = vec![5u32, 9, 17, 33, 2, 8, 21, 13, 40, 3];
        let short = vec![40u32, 41, 42, 43, 44, 45];
        let prompts = vec![
            long.clone(),
            short.clone(),
            long.clone(),
            long.clone(),
            vec![7u32, 8],
            short.clone(),
        ];
        let conts = vec![
            vec![11u32, 12, 13],
            vec![14u32],
            vec![15u32, 16, 17, 18, 19],
            vec![],
            vec![20u32, 21],
            vec![22u32, 23],
        ];
        let shared = continuation_logprobs(&model.network, &prompts, &conts, &Device::Cpu).unwrap();
        let (whole, _) =
            continuation_logprobs_tensor(&model.network, &prompts, &conts, &Device::Cpu).unwrap();
        let whole = whole.to_vec2::<f32>().unwrap();
        for (i, cont) in conts.iter().enumerate() {
            assert_eq!(shared[i].len(), cont.len(), "{name}: row {i}");
            for (a, b) in shared[i].iter().zip(&whole[i]) {
                assert!((a - b).abs() < 1e-4, "{name}: row {i}: {a} vs {b}");
            }
        }
    }
}
