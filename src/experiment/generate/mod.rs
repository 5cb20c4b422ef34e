//! `ws2s run` for generation tasks (SLURP slot filling; METHOD.md sections 4 and 5):
//! weak decoders fine-tuned on weak_train -> their n-best hypotheses (with per-token
//! log-probabilities) on strong_train and their test scores -> joint rescoring of the pooled
//! n-best lists by every weak model -> weights (by hand, uniform, or learned from agreement) ->
//! the strong ceiling and the strong model trained per method -> the preference stage
//! (conservative DPO) after the Bayesian student -> SLU-F1 and the other SLURP metrics on test,
//! PGR against the mean and the best weak model -> summary over seeds.
//!
//! Stages are cached like the classification pipeline's; trained adapters (or weights) are
//! kept beside the stage files so that later stages can reload a trained model.

mod models;
mod preference;
mod students;
mod weak;

use crate::config::ExperimentConfig;
use crate::data::{Dataset, Example};
use crate::experiment::stages::{stage_key, StageCache};
use crate::home::Home;
pub use crate::report::generate::{
    markdown, DpoReport, Eval, MethodResult, RunResults, SeedResult,
};
use crate::report::generate::{summarise, write_outputs, LabelRow, PairRow};
use crate::seq2seq::joint;
use anyhow::{bail, Result};
pub use models::score_predictions;
use models::*;
use preference::*;
use std::collections::BTreeMap;
use std::path::Path;
use students::*;
use weak::*;

fn inputs_of(split: &[Example]) -> Vec<&str> {
    split.iter().map(|e| e.input.as_str()).collect()
}

/// One seed's result, its rows of weak_labels.jsonl and of preference_pairs.jsonl.
type GenSeedOutput = (SeedResult, Vec<LabelRow>, Vec<PairRow>);

/// One seed of a generation run: stages 1-5 of METHOD.md sections 4 and 5.
fn run_gen_seed(s: &Seed, decode_json: &str) -> Result<GenSeedOutput> {
    let (g, dataset) = (s.g, s.dataset);
    // 1. Weak models. 2. Joint rescoring. 3. Weights.
    let (weak, weak_keys) = weak_stages(s, decode_json)?;
    let weak_all = weak_keys.join(",");
    let joint_key = stage_key(&["gen-joint", &weak_all]);
    let joint = joint_stage(s, &weak, &joint_key)?;
    let weights = generation_weights(s, &joint, &weak);
    let joint_targets: Vec<String> = (0..s.strong_inputs.len())
        .map(|i| {
            joint::pick(&joint.scores[i], &weights)
                .map(|c| joint.candidates[i][c].clone())
                .unwrap_or_else(|| "{}".to_string())
        })
        .collect();
    let bridged = bridged_targets(s, &weak)?;
    // 4. The strong ceiling and the students.
    let st = StrongStages {
        s,
        weak_all,
        joint_key,
        strong_json: serde_json::to_string(&(g, &weights))? + &s.decode_tag,
    };
    let gold_targets: Vec<&str> = dataset
        .strong_train
        .iter()
        .map(target_of)
        .collect::<Result<_>>()?;
    let ceiling = st.train("ceiling", &|s2s| {
        ce_task(
            s2s,
            &s.strong_inputs,
            &gold_targets,
            vec![1.0; s.strong_inputs.len()],
        )
    })?;
    let weak_f1: Vec<f64> = weak.iter().map(|w| w.test.metrics.slu_f1).collect();
    let scorer = Scorer {
        mean_weak: weak_f1.iter().sum::<f64>() / weak_f1.len() as f64,
        best_weak: weak_f1.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        ceiling: ceiling.metrics.slu_f1,
    };
    let mut results = gen_students(&st, &weak, (&bridged, &joint_targets, &weights), &scorer)?;
    // 5. The preference stage.
    let mut pair_rows = Vec::new();
    let dpo = match &g.dpo {
        None => None,
        Some(d) => {
            let after = d.after.as_str();
            let Some(before) = results.iter().find(|r| r.method == after).cloned() else {
                bail!("generation.dpo.after = {after:?} is not among generation.methods");
            };
            let (rows, skipped, epochs, test) = preference_stage(&st, d, &weights)?;
            let pairs = rows.len();
            pair_rows.extend(rows);
            let after_dpo = scorer.result(format!("{after}+dpo"), test);
            eprintln!(
                "{after}+dpo: SLU-F1 {:.4} on test (before {:.4})",
                after_dpo.test.metrics.slu_f1, before.test.metrics.slu_f1
            );
            Some(DpoReport {
                after: after.to_string(),
                pairs,
                skipped_ties: skipped,
                epochs,
                before,
                after_dpo,
            })
        }
    };
    if let Some(d) = &dpo {
        results.push(d.after_dpo.clone());
    }
    let label_rows = dataset
        .strong_train
        .iter()
        .enumerate()
        .map(|(i, example)| {
            let labels: BTreeMap<String, String> = s
                .weak_names
                .iter()
                .zip(&weak)
                .map(|(name, w)| {
                    let top = w.nbest[i].first().map_or("", |h| h.text.as_str());
                    (name.clone(), top.to_string())
                })
                .collect();
            LabelRow {
                seed: s.seed,
                id: example.id.clone(),
                text: example.input.clone(),
                label: example.label.target().map(str::to_string),
                weak: labels,
                joint: joint_targets[i].clone(),
            }
        })
        .collect();
    let result = SeedResult {
        seed: s.seed,
        data_hash: s.data_hash.clone(),
        sizes: [
            dataset.weak_train.len(),
            dataset.strong_train.len(),
            dataset.test.len(),
            dataset.valid.len(),
        ],
        weak: weak.into_iter().map(|w| w.test).collect(),
        weights,
        ceiling,
        methods: results,
        dpo,
    };
    Ok((result, label_rows, pair_rows))
}

/// Runs a generation experiment on its datasets (one per seed) and writes its outputs into
/// `out`.
pub fn run(
    config: &ExperimentConfig,
    datasets: &[Dataset],
    out: &Path,
    (home, progress): (&Home, bool),
) -> Result<RunResults> {
    let started = std::time::Instant::now();
    let g = &config.generation;
    let strong_spec = config.strong_over_weak()?;
    let device = config.device.device()?;
    // Inference's precision (decoding, rescoring; training stays f32); stage keys name it
    // unless f32, so that runs in f32 keep their keys.
    let precision = config
        .precision
        .resolve_on(crate::ops::Purpose::Decoding, &device)?;
    let decode_tag = if precision.packs() && device.is_cpu() {
        format!("|decode {}", precision.name())
    } else {
        String::new()
    };
    let weak_models: Vec<ModelRef> = config
        .weak
        .iter()
        .map(|spec| ModelRef::new(spec, &device, precision))
        .collect::<Result<_>>()?;
    let strong = ModelRef::new(strong_spec, &device, precision)?;
    let weak_names = config.weak_labels();
    let stages = StageCache::new(&home.stages());
    let decode_json = serde_json::to_string(&(
        &g.prompt,
        g.weak_beams,
        g.test_beams,
        g.max_new_tokens,
        g.stop_at_json,
    ))? + &decode_tag;
    let mut seed_results = Vec::new();
    let mut label_rows: Vec<LabelRow> = Vec::new();
    let mut pair_rows: Vec<PairRow> = Vec::new();
    for dataset in datasets {
        let data_hash = dataset.data_hash();
        let seed = Seed {
            g,
            dataset,
            stages: &stages,
            progress,
            weak_models: &weak_models,
            strong: &strong,
            weak_names: &weak_names,
            seed: dataset.seed,
            weak_train_inputs: inputs_of(&dataset.weak_train),
            weak_train_targets: dataset
                .weak_train
                .iter()
                .map(target_of)
                .collect::<Result<_>>()?,
            strong_inputs: inputs_of(&dataset.strong_train),
            weak_train_keys: weak_models
                .iter()
                .map(|m| stage_key(&["gen-weak-train", &m.key(), &data_hash, &g.prompt]))
                .collect(),
            data_hash,
            decode_tag: decode_tag.clone(),
        };
        let (result, labels, pairs) = run_gen_seed(&seed, &decode_json)?;
        seed_results.push(result);
        label_rows.extend(labels);
        pair_rows.extend(pairs);
    }
    let summary = summarise(config, &seed_results);
    let models = super::model_list(
        config,
        weak_models.iter().map(|m| m.hash.clone()),
        (strong_spec.label(), strong.hash.clone()),
    );
    let results = RunResults {
        config: config.clone(),
        provenance: datasets[0].provenance.clone(),
        models,
        seeds: seed_results,
        summary,
        wall_seconds: started.elapsed().as_secs_f64(),
        decode_precision: format!("{} ({})", precision.name(), precision.kernel()),
    };
    write_outputs(out, &results, &label_rows, &pair_rows, &stages.log())?;
    Ok(results)
}
