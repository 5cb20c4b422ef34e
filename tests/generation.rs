//! Generation: the word bridge between real tokenizer pairs, soft targets, the DPO task on a tiny
//! decoder, and `ws2s run` on a generation task end to end with tiny random decoders.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, tiny_gguf, write, ws2s_config};
use std::path::{Path, PathBuf};
use ws2s::home::Home;
use ws2s::models::load_tokenizer;
use ws2s::models::params::{LoraConfig, Trainable};
use ws2s::models::tokenizer::Tokenizer;
use ws2s::seq2seq::bridge::{bridge, soft_target_row, token_logprobs, Share, Spread};
use ws2s::seq2seq::model::Seq2Seq;
use ws2s::seq2seq::tasks::{sequence_logprobs, DpoTask, Pair};
use ws2s::train::trainer::{TrainConfig, TrainTask};

const HYPOTHESES: [&str; 8] = [
    r#"{"date": "tomorrow", "time": "nine am"}"#,
    r#"{}"#,
    r#"{"place_name": "kraków & zürich", "person": "jessica 's"}"#,
    r#"{"time": "10:45 pm", "relation": "mom"}"#,
    r#"{"event_name": "supercalifragilistic meeting!!"}"#,
    r#"{"currency_name": "€ and ¥", "date": "3rd of may"}"#,
    r#"{"news_topic": "naïve café"}"#,
    r#"{"time": "seven o'clo"#, // ends mid-word (a truncated hypothesis)
];

/// Checks the bridge from `weak` to `strong` on every hypothesis: each strong token lands in the
/// word it spells, the estimated log-probabilities of a word's tokens sum to the word's weak
/// score, and every soft-target row sums to 1 with the label token at exactly p^_t.
fn check_pair(weak: &Tokenizer, strong: &Tokenizer, pair: &str) {
    let weak_eos = weak.eos_ids.first().copied().unwrap_or(0);
    let strong_eos = strong.eos_ids.first().copied().unwrap_or(1);
    for (h, text) in HYPOTHESES.iter().enumerate() {
        let mut tokens = weak.encode_plain(text).unwrap();
        let truncated = h == HYPOTHESES.len() - 1;
        if !truncated {
            tokens.push(weak_eos);
        }
        let logprobs: Vec<f32> = (0..tokens.len())
            .map(|i| -0.05 - 0.1 * ((i * 7 + h) % 5) as f32)
            .collect();
        let target = bridge(
            weak,
            &tokens,
            &logprobs,
            &[weak_eos],
            strong,
            Some(strong_eos),
        )
        .unwrap();
        let words: Vec<&str> = target.text.split_whitespace().collect();
        // The weak tokenizer may normalise (WordPiece: lower case, no accents, unknown pieces).
        let plain: Vec<u32> = weak.encode_plain(text).unwrap();
        let expected_text = weak.decode(&plain).unwrap();
        assert_eq!(
            target.text.split_whitespace().collect::<Vec<_>>().join(" "),
            expected_text
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            "{pair}: decoded hypothesis"
        );
        let spell = |ids: &[u32]| -> String {
            strong
                .decode(ids)
                .unwrap()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_lowercase()
        };
        assert_eq!(
            target.tokens.last() == Some(&strong_eos),
            !truncated,
            "{pair}: {text}"
        );
        // The strong tokens of each word spell the word.
        for (w, word) in words.iter().enumerate() {
            let ids: Vec<u32> = target
                .tokens
                .iter()
                .zip(&target.unit_of)
                .filter(|(_, &u)| u == w)
                .map(|(&t, _)| t)
                .collect();
            let alone = strong.encode_plain(word).unwrap();
            assert_eq!(spell(&ids), spell(&alone), "{pair}: word {w} of {text}");
            assert!(
                !ids.is_empty(),
                "{pair}: word {w} of {text} has no strong token"
            );
        }
        // Word scores are the sums of the weak log-probabilities (the weak EOS is its own unit).
        let total: f32 = target.unit_scores.iter().sum();
        let expected: f32 = logprobs.iter().sum();
        assert!(
            (total - expected).abs() < 1e-4,
            "{pair}: {text}: {total} vs {expected}"
        );
        // Shares, then soft rows.
        let max_prob: Vec<f32> = (0..target.tokens.len())
            .map(|i| 0.2 + 0.7 * ((i * 3) % 4) as f32 / 3.0)
            .collect();
        for share in [Share::Confidence, Share::Uniform] {
            let lp = token_logprobs(&target, &max_prob, share);
            let sum: f32 = lp.iter().sum();
            assert!(
                (sum - expected).abs() < 1e-4,
                "{pair}: {share:?}: {sum} vs {expected}"
            );
            let v = strong.vocab_size();
            let strong_probs: Vec<f32> = (0..v).map(|i| ((i % 13) + 1) as f32).collect();
            let norm: f32 = strong_probs.iter().sum();
            let strong_probs: Vec<f32> = strong_probs.iter().map(|p| p / norm).collect();
            let mut row = vec![0f32; v];
            for (t, &label) in target.tokens.iter().enumerate() {
                for spread in [Spread::Strong, Spread::Uniform] {
                    soft_target_row(label as usize, lp[t].exp(), &strong_probs, spread, &mut row);
                    assert_eq!(
                        row[label as usize],
                        lp[t].exp(),
                        "{pair}: label probability"
                    );
                    let total: f64 = row.iter().map(|&x| x as f64).sum();
                    assert!((total - 1.0).abs() < 1e-4, "{pair}: row sums to {total}");
                }
            }
        }
    }
}

#[test]
fn word_bridge_between_fixture_bpe_and_wordpiece_tokenizers() {
    let bpe = Tokenizer::from_hf_folder(&fixtures().join("models/tokenizers/bpe")).unwrap();
    let wordpiece =
        Tokenizer::from_hf_folder(&fixtures().join("models/tokenizers/wordpiece")).unwrap();
    check_pair(&bpe, &bpe, "bpe -> bpe");
    check_pair(&bpe, &wordpiece, "bpe -> wordpiece");
    check_pair(&wordpiece, &bpe, "wordpiece -> bpe");
}

#[test]
fn word_bridge_between_real_bpe_and_sentencepiece_tokenizers() {
    let installed = |relative: &str| {
        let path = Home::from_env().models().join(relative);
        if !path.exists() {
            println!(
                "skipped: {} is not installed (run scripts/fetch-models)",
                path.display()
            );
        }
        path.exists().then_some(path)
    };
    let (Some(smollm), Some(gemma), Some(qwen)) = (
        installed("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"),
        installed("gemma3-270m/gemma-3-270m-q4_k_m.gguf"),
        installed("qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ) else {
        return;
    };
    let smollm = load_tokenizer(&smollm).unwrap();
    let gemma = load_tokenizer(&gemma).unwrap();
    let qwen = load_tokenizer(&qwen).unwrap();
    check_pair(&smollm, &gemma, "smollm2 (BPE) -> gemma3 (SentencePiece)");
    check_pair(&gemma, &qwen, "gemma3 (SentencePiece) -> qwen2.5 (BPE)");
    check_pair(&smollm, &qwen, "smollm2 -> qwen2.5");
}

fn lora() -> Trainable {
    Trainable::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    })
}

#[test]
fn generation_in_bf16x2_decodes_and_scores_a_packed_copy_and_leaves_the_model_in_f32() {
    use ws2s::ops::Precision;
    let mut s2s = Seq2Seq::load(&tiny_gguf(), lora(), 3, "in: {input} out:", &Device::Cpu).unwrap();
    let inputs = ["alpha beta", "gamma", "delta epsilon zeta", "eta"];
    let run = |s2s: &Seq2Seq| {
        s2s.generate_all(&inputs, 3, 1, 6, 2, false, "test", false)
            .unwrap()
            .into_iter()
            .map(|h| h.into_iter().next().unwrap())
            .collect::<Vec<_>>()
    };
    let f32_hyps = run(&s2s);
    s2s.precision = Precision::Bf16x2;
    let bf16_hyps = run(&s2s);
    let mut same = 0;
    let mut exact = true;
    for (a, b) in f32_hyps.iter().zip(&bf16_hyps) {
        if a.tokens == b.tokens {
            same += 1;
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                // bf16 weights (the fixture's are f32): ~2^-9 relative per weight.
                assert!((x - y).abs() < 0.05, "{x} vs {y}");
                exact &= x == y;
            }
        }
    }
    assert!(same >= 3, "{same} of 4 continuations kept");
    assert!(
        !exact,
        "bf16x2 gave f32's log-probabilities exactly (not used?)"
    );
    // Rescoring too: mean token log-probabilities close to f32's, not equal.
    let prompts: Vec<Vec<u32>> = inputs.iter().map(|i| s2s.prompt_ids(i).unwrap()).collect();
    let conts: Vec<Vec<u32>> = f32_hyps.iter().map(|h| h.tokens.clone()).collect();
    let bf16_scores = s2s.scores(&prompts, &conts, 2).unwrap();
    s2s.precision = Precision::F32;
    let f32_scores = s2s.scores(&prompts, &conts, 2).unwrap();
    for (a, b) in f32_scores.iter().zip(&bf16_scores) {
        assert!((a - b).abs() < 0.05, "{a} vs {b}");
    }
    assert_ne!(f32_scores, bf16_scores);
    // The model itself was not packed: f32 again gives the first values exactly.
    let again = run(&s2s);
    for (a, b) in f32_hyps.iter().zip(&again) {
        assert_eq!((&a.tokens, &a.logprobs), (&b.tokens, &b.logprobs));
    }
}

#[test]
fn dpo_with_policy_equal_to_reference_is_log_2_and_the_reference_stays_unchanged() {
    let policy = Seq2Seq::load(&tiny_gguf(), lora(), 3, "in: {input} out:", &Device::Cpu).unwrap();
    let reference =
        Seq2Seq::load(&tiny_gguf(), lora(), 3, "in: {input} out:", &Device::Cpu).unwrap();
    let inputs = ["alpha beta", "gamma", "delta epsilon zeta"];
    let prompts: Vec<Vec<u32>> = inputs
        .iter()
        .map(|i| policy.prompt_ids(i).unwrap())
        .collect();
    let chosen: Vec<Vec<u32>> = ["{}", "{\"a\": \"b\"}", "{\"x\": \"y z\"}"]
        .iter()
        .map(|t| policy.target_ids(t).unwrap())
        .collect();
    let rejected: Vec<Vec<u32>> = ["{\"q\": \"r\"}", "{}", "nothing"]
        .iter()
        .map(|t| policy.target_ids(t).unwrap())
        .collect();
    let rc = sequence_logprobs(&reference, &prompts, &chosen)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let rr = sequence_logprobs(&reference, &prompts, &rejected)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let pairs: Vec<Pair> = (0..3)
        .map(|i| Pair {
            prompt: prompts[i].clone(),
            chosen: chosen[i].clone(),
            rejected: rejected[i].clone(),
            reference_chosen: rc[i],
            reference_rejected: rr[i],
        })
        .collect();
    let task = DpoTask {
        model: &policy,
        pairs,
        beta: 5.0,
        eps: 0.0,
        batch: 2,
        log: Default::default(),
    };
    let loss = task
        .loss(&[0, 1, 2], 0.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((loss - std::f32::consts::LN_2).abs() < 1e-5, "loss {loss}");
    let before = task.measure(0).unwrap();
    assert!(before.reward_margin.abs() < 1e-5);
    let config = TrainConfig {
        epochs: 3,
        batch_size: 3,
        lr: 0.05,
        ..TrainConfig::default()
    };
    ws2s::train::trainer::train(&task, &policy.model.vars, &config, None).unwrap();
    let after = task.log.borrow().last().cloned().unwrap();
    assert!(
        after.reward_margin > 0.0,
        "the policy moved towards the chosen: {after:?}"
    );
    // The reference model computes what it computed before training.
    let rc2 = sequence_logprobs(&reference, &prompts, &chosen)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(rc, rc2);
    // and the policy differs from it now
    let pc = sequence_logprobs(&policy, &prompts, &chosen)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(pc.iter().zip(&rc).any(|(a, b)| (a - b).abs() > 1e-4));
}

#[test]
fn every_adapter_gets_a_gradient_from_the_soft_label_and_dpo_tasks() {
    use ws2s::seq2seq::tasks::{SoftItem, SoftLoss, SoftTask};
    let model = Seq2Seq::load(&tiny_gguf(), lora(), 5, "in: {input} out:", &Device::Cpu).unwrap();
    let tokenizer = model.model.tokenizer().unwrap().clone();
    let eos = model.eos();
    let items: Vec<SoftItem> = ["{\"a\": \"b c\"}", "{}"]
        .iter()
        .map(|text| {
            let mut weak_tokens = tokenizer.encode_plain(&format!(" {text}")).unwrap();
            weak_tokens.extend(eos);
            let logprobs = vec![-0.3; weak_tokens.len()];
            SoftItem {
                prompt: model.prompt_ids("some words").unwrap(),
                target: bridge(
                    &tokenizer,
                    &weak_tokens,
                    &logprobs,
                    &model.eos_ids(),
                    &tokenizer,
                    eos,
                )
                .unwrap(),
                weight: 0.5,
            }
        })
        .collect();
    for loss in [
        SoftLoss::Kl,
        SoftLoss::Edl {
            c: 1e-2,
            evidence: ws2s::losses::Evidence::Softplus,
        },
        SoftLoss::EdlStep {
            c: 1e-2,
            evidence: ws2s::losses::Evidence::Softplus,
            a_max: 0.2,
            warmup: 0.25,
        },
    ] {
        let task = SoftTask {
            model: &model,
            items: items
                .iter()
                .map(|i| SoftItem {
                    prompt: i.prompt.clone(),
                    target: i.target.clone(),
                    weight: i.weight,
                })
                .collect(),
            loss,
            share: Share::Confidence,
            spread: Spread::Strong,
        };
        let value = task.loss(&[0, 1], 0.5).unwrap();
        assert!(value.to_scalar::<f32>().unwrap().is_finite());
        let grads = value.backward().unwrap();
        for (name, var) in &model.model.vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{loss:?}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // LoRA B starts at zero, so A's gradient is zero at the first step; B's must not be.
            if name.ends_with("lora_b") {
                assert!(norm > 0.0, "{loss:?}: zero gradient for {name}");
            }
        }
    }
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
}

fn write_generation_task(dir: &Path) -> PathBuf {
    let times = ["one", "two", "three", "four", "five", "six"];
    let mut lines = Vec::new();
    for i in 0..30 {
        let t = times[i % times.len()];
        let (prompt, target) = if i % 3 == 0 {
            (format!("hello there number {i}"), "{}".to_string())
        } else {
            (
                format!("wake me at {t} am please {i}"),
                format!("{{\"time\": \"{t} am\"}}"),
            )
        };
        lines.push(serde_json::json!({"prompt": prompt, "target": target}).to_string());
    }
    write(dir, "slots.jsonl", &lines.join("\n"))
}

#[test]
fn ws2s_run_on_a_generation_task_with_every_method_and_the_preference_stage() {
    let dir = tempfile::tempdir().unwrap();
    let task = write_generation_task(dir.path());
    let m = tiny_gguf();
    let config = format!(
        r#"
name = "tiny generation"
[task]
name = "generate:{task}"
[task.sizes]
weak_train = 10
strong_train = 8
test = 6
[[weak]]
name = "w1"
model = "{m}"
mode = "lora"
lora = {{ rank = 2, alpha = 4.0, dropout = 0.1, targets = ["q_proj", "v_proj"] }}
train = {{ epochs = 1, batch_size = 4, lr = 0.01 }}
[[weak]]
name = "w2"
model = "{m}"
mode = "lora"
lora = {{ rank = 2, alpha = 4.0, dropout = 0.0, targets = ["q_proj"] }}
train = {{ epochs = 1, batch_size = 4, lr = 0.02 }}
[strong]
name = "s"
model = "{m}"
mode = "lora"
lora = {{ rank = 2, alpha = 4.0, dropout = 0.0, targets = ["q_proj", "v_proj"] }}
train = {{ epochs = 1, batch_size = 4, lr = 0.01 }}
[generation]
weak_beams = 2
test_beams = 2
max_new_tokens = 6
[generation.dpo]
beams = 3
train = {{ epochs = 1, batch_size = 2, lr = 0.001 }}
"#,
        task = task.display(),
        m = m.display()
    );
    let config_path = write(dir.path(), "gen.toml", &config);
    let out = dir.path().join("run");
    let run = || ws2s_config("run", &config_path, &out, &dir.path().join("home"));
    let output = run();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.trim_end().lines().last().unwrap(),
        format!("results: {}", out.join("results.md").display())
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let methods: Vec<&str> = results["seeds"][0]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        vec![
            "hard[w1]", "hard[w2]", "soft[w1]", "soft[w2]", "naive", "joint", "edl", "edl_step",
            "edl+dpo"
        ]
    );
    let weights: Vec<f64> = results["seeds"][0]["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    for name in ["w1", "w2"] {
        assert!(results["summary"][format!("weak[{name}]")]["slu_f1"]["mean"].is_number());
    }
    let md = without_wall_time(&std::fs::read_to_string(out.join("results.md")).unwrap());
    assert!(
        md.contains("| edl+dpo |") && md.contains("Preference stage"),
        "{md}"
    );
    // The preference stage's before/after rows, side by side.
    assert!(
        md.contains("| before (edl) |") && md.contains("| after (edl+dpo) |"),
        "{md}"
    );
    for file in [
        "weak_labels.jsonl",
        "weak_labels.parquet",
        "slu_f1.svg",
        "slu_f1.png",
        "pgr.svg",
        "pgr.png",
    ] {
        assert!(out.join(file).exists(), "{file}");
    }
    let dpo = &results["seeds"][0]["dpo"];
    let pairs = dpo["pairs"].as_u64().unwrap();
    let skipped = dpo["skipped_ties"].as_u64().unwrap();
    assert_eq!(
        pairs + skipped,
        8,
        "every strong_train prompt is a pair or a counted tie"
    );
    if pairs > 0 {
        assert!(out.join("preference_pairs.parquet").exists());
        let first = std::fs::read_to_string(out.join("preference_pairs.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert!(row["chosen_score"].as_f64().unwrap() > row["rejected_score"].as_f64().unwrap());
    }
    // The fine-tunings' steps: weak models, students and the preference stage.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let stages: std::collections::BTreeSet<String> = log
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(
                v["lr"].is_number() && v["loss"].as_f64().unwrap().is_finite(),
                "{v}"
            );
            v["stage"].as_str().unwrap().to_string()
        })
        .collect();
    for stage in ["gen-weak-train", "gen-student", "gen-dpo"] {
        assert!(stages.contains(stage), "{stages:?}");
        assert!(md.contains(&format!("loss-{stage}.svg")), "{md}");
    }
    // A rerun reuses every stage and gives the same table.
    let again = run();
    assert!(again.status.success());
    assert_eq!(
        without_wall_time(&std::fs::read_to_string(out.join("results.md")).unwrap()),
        md
    );
    assert!(!String::from_utf8_lossy(&again.stderr).contains("trained "));
}

#[test]
fn a_probe_model_in_a_generation_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let task = write_generation_task(dir.path());
    let m = tiny_gguf();
    let config = format!(
        "name = \"x\"\n[task]\nname = \"generate:{}\"\n[[weak]]\nmodel = \"{}\"\n[strong]\nmodel = \"{}\"\nmode = \"lora\"\n",
        task.display(),
        m.display(),
        m.display()
    );
    let path = write(dir.path(), "bad.toml", &config);
    let output = ws2s_config(
        "run",
        &path,
        &dir.path().join("o"),
        &dir.path().join("home"),
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("generation needs mode"), "{stderr}");
    assert!(!dir.path().join("o/results.md").exists());
}

/// results.md without its wall-time figure (the one thing a cached rerun changes).
fn without_wall_time(md: &str) -> String {
    let marker = "Wall time of the run: ";
    let start = md.find(marker).expect("results.md states the wall time") + marker.len();
    let end = start + md[start..].find(" s.").expect("seconds");
    assert!(md[start..end].parse::<f64>().is_ok(), "{}", &md[start..end]);
    format!("{}{}", &md[..start], &md[end..])
}
