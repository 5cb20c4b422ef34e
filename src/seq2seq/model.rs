//! A decoder used as a sequence-to-sequence model: prompt ids from a template, target ids
//! (the target text + end-of-sequence), teacher-forced losses, beam-search generation in batches,
//! length-normalised scores, and LoRA adapters saved to / loaded from safetensors.

use crate::models::decode::{
    continuation_logprobs_tensor, generate, BraceTable, DecodeOptions, Hypothesis,
};
use crate::models::features::progress_bar;
use crate::models::params::{LoraConfig, Trainable};
use crate::models::Model;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The default prompt: the utterance, then the model writes the slots.
pub const DEFAULT_PROMPT: &str = "Utterance: {input}\nSlots:";

pub struct Seq2Seq {
    pub model: Model,
    pub template: String,
    /// Where the model runs (frozen weights bf16 on a GPU, trained ones f32).
    pub device: Device,
    /// The precision of inference's products on the CPU ([`Seq2Seq::generate_all`],
    /// [`Seq2Seq::scores`]): int8 or bf16x2 pack the frozen layers of a copy of the network
    /// (trained layers and adapters stay f32); training's losses are f32 whatever this says.
    pub precision: crate::ops::Precision,
}

impl Seq2Seq {
    /// Loads a decoder; `lora` None: every weight trainable (full fine-tuning); `frozen`: nothing.
    pub fn load(
        path: &Path,
        trainable: Trainable,
        seed: u64,
        template: &str,
        device: &Device,
    ) -> Result<Seq2Seq> {
        let model = Model::load(path, trainable, seed, device)?;
        if !model.network.is_decoder() {
            bail!(
                "{}: generation needs a decoder model (this is an encoder)",
                path.display()
            );
        }
        model.tokenizer()?;
        if !template.contains("{input}") {
            bail!("the prompt template must contain `{{input}}`: {template:?}");
        }
        Ok(Seq2Seq {
            model,
            template: template.to_string(),
            device: device.clone(),
            precision: crate::ops::Precision::F32,
        })
    }

    pub fn trainable(lora: &Option<LoraConfig>) -> Trainable {
        match lora {
            Some(l) => Trainable::Lora(l.clone()),
            None => Trainable::All,
        }
    }

    pub fn eos(&self) -> Option<u32> {
        self.model
            .tokenizer()
            .ok()
            .and_then(|t| t.eos_ids.first().copied())
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.model
            .tokenizer()
            .map(|t| t.eos_ids.clone())
            .unwrap_or_default()
    }

    pub fn prompt_ids(&self, input: &str) -> Result<Vec<u32>> {
        let tokenizer = self.model.tokenizer()?;
        let mut ids = tokenizer.encode(&self.template.replace("{input}", input))?;
        if ids.is_empty() {
            // A decoder needs one token to condition on.
            ids.push(tokenizer.bos_id.or(self.eos()).unwrap_or(0));
        }
        Ok(ids)
    }

    /// The continuation ids of a target text: " " + text, then end-of-sequence.
    pub fn target_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self
            .model
            .tokenizer()?
            .encode_plain(&format!(" {}", text.trim()))?;
        ids.extend(self.eos());
        Ok(ids)
    }

    /// Text of generated tokens (special tokens dropped, trimmed).
    pub fn text_of(&self, tokens: &[u32]) -> Result<String> {
        Ok(self.model.tokenizer()?.decode(tokens)?.trim().to_string())
    }

    /// Teacher-forced NLL per sequence, weighted: sum_b w_b sum_t -log p / sum_b w_b |target_b|.
    pub fn nll(
        &self,
        prompts: &[Vec<u32>],
        targets: &[Vec<u32>],
        weights: &[f32],
    ) -> Result<Tensor> {
        let (logprobs, mask) =
            continuation_logprobs_tensor(&self.model.network, prompts, targets, &self.device)?;
        let w = Tensor::from_vec(weights.to_vec(), (weights.len(), 1), &self.device)?;
        let weighted_mask = mask.broadcast_mul(&w)?;
        let total = (logprobs * &weighted_mask)?.sum_all()?;
        let count = weighted_mask.sum_all()?.clamp(1e-6, f64::MAX)?;
        Ok(total.neg()?.div(&count)?)
    }

    /// The network for inference in [`Seq2Seq::precision`]: in int8 or bf16x2 on the CPU, a copy
    /// (its weights shared) with the frozen layers packed; the model itself stays as trained.
    fn inference_network(&self) -> Result<std::borrow::Cow<'_, crate::models::Network>> {
        Ok(if self.precision.packs() && self.device.is_cpu() {
            let mut copy = self.model.network.clone();
            copy.set_precision(self.precision)?;
            std::borrow::Cow::Owned(copy)
        } else {
            std::borrow::Cow::Borrowed(&self.model.network)
        })
    }

    /// Length-normalised log-likelihood (mean token log-probability) of each continuation, in
    /// [`Seq2Seq::precision`] (inference only: training's losses are f32).
    pub fn scores(
        &self,
        prompts: &[Vec<u32>],
        continuations: &[Vec<u32>],
        batch: usize,
    ) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(prompts.len());
        // Continuations of one prompt side by side, so that a batch computes the prompt once.
        let mut order = by_length(continuations);
        order.sort_by(|&a, &b| prompts[a].cmp(&prompts[b]));
        let mut scored = vec![0f64; prompts.len()];
        let network = self.inference_network()?;
        for chunk in order.chunks(batch.max(1)) {
            let p: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let c: Vec<Vec<u32>> = chunk.iter().map(|&i| continuations[i].clone()).collect();
            let rows = crate::models::decode::continuation_logprobs(
                network.as_ref(),
                &p,
                &c,
                &self.device,
            )?;
            for (&i, row) in chunk.iter().zip(rows) {
                scored[i] = row.iter().map(|&v| v as f64).sum::<f64>() / row.len().max(1) as f64;
            }
        }
        out.extend(scored);
        Ok(out)
    }

    /// The braces of every token of the vocabulary (for stopping when a JSON object closes).
    pub fn brace_table(&self) -> Result<BraceTable> {
        let tokenizer = self.model.tokenizer()?;
        let n = tokenizer.vocab_size() as u32;
        let pieces: Vec<Option<String>> =
            (0..n).map(|id| tokenizer.inner.id_to_token(id)).collect();
        Ok(BraceTable::from_pieces(pieces.iter().map(Option::as_deref)))
    }

    /// Beam search for every input, in batches, with a progress bar. With `json_stop`, a
    /// hypothesis ends when the JSON object it opened closes (or at end-of-sequence).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_all(
        &self,
        inputs: &[&str],
        beams: usize,
        n_best: usize,
        max_new_tokens: usize,
        batch: usize,
        json_stop: bool,
        label: &str,
        progress: bool,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        let options = DecodeOptions {
            max_new_tokens,
            eos_ids: self.eos_ids(),
            beams,
            n_best,
            length_penalty: 1.0,
            early_stopping: true,
            json_stop: if json_stop {
                Some(std::sync::Arc::new(self.brace_table()?))
            } else {
                None
            },
        };
        let prompts: Vec<Vec<u32>> = inputs
            .iter()
            .map(|i| self.prompt_ids(i))
            .collect::<Result<_>>()?;
        let order = by_length(&prompts);
        let network = self.inference_network()?;
        let network = network.as_ref();
        let mut out: Vec<Vec<Hypothesis>> = vec![Vec::new(); inputs.len()];
        let bar = progress_bar(progress, inputs.len() as u64, label);
        for chunk in order.chunks(batch.max(1)) {
            let p: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let results = generate(network, &p, &options, &self.device)?;
            for (&i, hyps) in chunk.iter().zip(results) {
                out[i] = hyps;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(out)
    }

    /// Writes the trainable weights (the LoRA adapters, or every weight) to a safetensors file.
    pub fn save_trainable(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .model
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        crate::io::save_tensors(path, &tensors)
    }

    /// Sets the trainable weights from a file written by [`Seq2Seq::save_trainable`].
    pub fn load_trainable(&self, path: &Path) -> Result<()> {
        let tensors = crate::io::load_tensors(path, &self.device)?;
        for (name, var) in &self.model.vars {
            let t = tensors
                .get(name)
                .with_context(|| format!("{}: tensor `{name}` is missing", path.display()))?;
            var.set(t)
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        }
        Ok(())
    }
}

/// Indices sorted by length (so that batches pad little).
pub fn by_length(seqs: &[Vec<u32>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    order
}
