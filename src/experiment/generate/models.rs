//! The models of a generation run: where each is, loading and fine-tuning it (its adapters
//! kept beside the stage files), its training tasks, decoding and scoring on test.

use crate::config::{default_lora, GenerationConfig, ModelSpec, TrainingMode};
use crate::data::slurp::json_to_slots;
use crate::data::{Example, Label};
use crate::eval::slurp::{slurp_metrics, SlotRecord};
use crate::experiment::stages::{StageCache, Subject};
use crate::losses::Evidence;
use crate::models::params::Trainable;
use crate::models::tokenizer::Tokenizer;
use crate::models::{load_tokenizer, model_hash, resolve_model};
pub use crate::report::generate::Eval;
use crate::seq2seq::model::Seq2Seq;
use crate::seq2seq::tasks::CeTask;
use crate::train::trainer::{train, TrainConfig, TrainTask};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

pub(super) fn trainable_of(spec: &ModelSpec) -> Result<Trainable> {
    Ok(match spec.mode {
        TrainingMode::Lora => Trainable::Lora(spec.lora.clone().unwrap_or_else(default_lora)),
        TrainingMode::Full => Trainable::All,
        TrainingMode::Probe => bail!(
            "model `{}`: generation needs mode = \"lora\" or \"full\" (a linear probe cannot generate)",
            spec.label()
        ),
    })
}

/// Training settings of a generation model: its own `train` section, else small LoRA defaults.
pub(super) fn train_config(spec: &ModelSpec, seed: u64, progress: bool) -> TrainConfig {
    let own = spec.train.clone().unwrap_or(TrainConfig {
        epochs: 2,
        batch_size: 8,
        lr: 1e-3,
        ..TrainConfig::default()
    });
    TrainConfig {
        seed,
        progress,
        ..own
    }
}

/// A model of the run: where it is, its hash, its tokenizer.
pub(super) struct ModelRef {
    pub(super) spec: ModelSpec,
    pub(super) path: PathBuf,
    pub(super) hash: String,
    pub(super) tokenizer: Tokenizer,
    pub(super) device: candle_core::Device,
    /// The precision of its generation (decoding) on the CPU.
    pub(super) precision: crate::ops::Precision,
}

impl ModelRef {
    /// `precision`: that of its generation (decoding) on the CPU.
    pub(super) fn new(
        spec: &ModelSpec,
        device: &candle_core::Device,
        precision: crate::ops::Precision,
    ) -> Result<ModelRef> {
        let path = resolve_model(&spec.model)?;
        let hash = model_hash(&path)?;
        let tokenizer = load_tokenizer(&path)?;
        trainable_of(spec)?;
        Ok(ModelRef {
            spec: spec.clone(),
            path,
            hash,
            tokenizer,
            device: device.clone(),
            precision,
        })
    }

    pub(super) fn key(&self) -> String {
        let settings = serde_json::to_string(&(&self.spec.mode, &self.spec.lora, &self.spec.train))
            .unwrap_or_default();
        format!(
            "{}|{settings}{}",
            self.hash,
            crate::runtime::stage_key_suffix(&self.device)
        )
    }

    pub(super) fn load(&self, seed: u64, template: &str) -> Result<Seq2Seq> {
        let mut s2s = Seq2Seq::load(
            &self.path,
            trainable_of(&self.spec)?,
            seed,
            template,
            &self.device,
        )
        .with_context(|| format!("loading {}", self.spec.label()))?;
        s2s.precision = self.precision;
        Ok(s2s)
    }
}

/// The model trained under `key`: its saved trainable weights when present, else trained by
/// `make_task` now (and saved).
/// Its training steps go to the run's log under `stage` (and to a file beside the weights).
pub(super) fn trained(
    model: &ModelRef,
    key: &str,
    (seed, template, progress): (u64, &str, bool),
    (stages, stage, subject): (&StageCache, &str, &Subject),
    make_task: &dyn Fn(&Seq2Seq) -> Result<Box<dyn TrainTask + '_>>,
) -> Result<Seq2Seq> {
    let s2s = model.load(seed, template)?;
    let path = stages.trained_path(key);
    let log_path = path.with_extension("log.jsonl");
    if path.exists() && s2s.load_trainable(&path).is_ok() {
        log_trained(key, (stages, stage, subject));
        return Ok(s2s);
    }
    let start = std::time::Instant::now();
    let config = train_config(&model.spec, seed, progress);
    let what = &subject.what;
    let steps = {
        let task = make_task(&s2s)?;
        let (report, steps) =
            crate::train::log::capture(|| train(task.as_ref(), &s2s.model.vars, &config, None));
        report.with_context(|| format!("training {what}"))?;
        steps
    };
    crate::io::write_atomic(&log_path, crate::train::log::to_jsonl(&steps).as_bytes())?;
    s2s.save_trainable(&path)?;
    stages.add_log(key, stage, subject, steps);
    eprintln!("trained {what} ({:.0} s)", start.elapsed().as_secs_f64());
    Ok(s2s)
}

/// Adds the saved training log of the model trained under `key` to the run's log (once), for
/// runs that reuse a stage without loading the model.
pub(super) fn log_trained(key: &str, (stages, stage, subject): (&StageCache, &str, &Subject)) {
    let steps =
        crate::train::log::read_jsonl(&stages.trained_path(key).with_extension("log.jsonl"));
    stages.add_log(key, stage, subject, steps);
}

pub(super) fn gold_records(test: &[Example]) -> Vec<SlotRecord> {
    test.iter()
        .map(|e| match &e.label {
            Label::Slots { entities, .. } => SlotRecord {
                id: e.id.clone(),
                entities: entities.clone(),
                scenario: None,
                action: None,
                intent: None,
            },
            other => SlotRecord {
                id: e.id.clone(),
                entities: other.target().and_then(json_to_slots).unwrap_or_default(),
                scenario: None,
                action: None,
                intent: None,
            },
        })
        .collect()
}

/// Length-normalised log-likelihood of every candidate continuation of every input under one
/// model: `result[i][c]` scores `candidates[i][c]` given `inputs[i]`.
pub(super) fn score_candidates(
    s2s: &Seq2Seq,
    inputs: &[&str],
    candidates: &[Vec<String>],
) -> Result<Vec<Vec<f64>>> {
    let mut prompts = Vec::new();
    let mut conts = Vec::new();
    for (input, cands) in inputs.iter().zip(candidates) {
        let prompt = s2s.prompt_ids(input)?;
        for text in cands {
            prompts.push(prompt.clone());
            conts.push(s2s.target_ids(text)?);
        }
    }
    let mut flat = s2s.scores(&prompts, &conts, 16)?.into_iter();
    Ok(candidates
        .iter()
        .map(|cands| flat.by_ref().take(cands.len()).collect())
        .collect())
}

/// Scores generated texts against the test gold.
pub fn score_predictions(test: &[Example], predictions: Vec<String>) -> Eval {
    let mut unparsable = 0;
    let records: Vec<SlotRecord> = test
        .iter()
        .zip(&predictions)
        .map(|(e, text)| {
            let entities = json_to_slots(text).unwrap_or_else(|| {
                unparsable += 1;
                Vec::new()
            });
            SlotRecord {
                id: e.id.clone(),
                entities,
                scenario: None,
                action: None,
                intent: None,
            }
        })
        .collect();
    let (metrics, _) = slurp_metrics(&gold_records(test), &records);
    Eval {
        metrics,
        unparsable,
        predictions,
    }
}

pub(super) fn evaluate(
    model: &Seq2Seq,
    test: &[Example],
    g: &GenerationConfig,
    label: &str,
    progress: bool,
) -> Result<Eval> {
    let inputs: Vec<&str> = test.iter().map(|e| e.input.as_str()).collect();
    let results = model.generate_all(
        &inputs,
        g.test_beams,
        1,
        g.max_new_tokens,
        g.decode_batch,
        g.stop_at_json,
        label,
        progress,
    )?;
    let predictions = results
        .iter()
        .map(|h| match h.first() {
            Some(h) => model.text_of(&h.tokens),
            None => Ok(String::new()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(score_predictions(test, predictions))
}

pub(super) fn target_of(e: &Example) -> Result<&str> {
    e.label
        .target()
        .with_context(|| format!("example {}: a generation task needs a target text", e.id))
}

pub(super) fn evidence_of(g: &GenerationConfig) -> Evidence {
    g.evidence.with_clamp(g.evidence_clamp)
}

pub(super) fn ce_task<'a>(
    model: &'a Seq2Seq,
    inputs: &[&str],
    targets: &[&str],
    weights: Vec<f32>,
) -> Result<Box<dyn TrainTask + 'a>> {
    let prompts = inputs
        .iter()
        .map(|i| model.prompt_ids(i))
        .collect::<Result<_>>()?;
    let targets = targets
        .iter()
        .map(|t| model.target_ids(t))
        .collect::<Result<_>>()?;
    Ok(Box::new(CeTask {
        model,
        prompts,
        targets,
        weights,
    }))
}
