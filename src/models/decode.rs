//! Decoding and scoring with decoder models: greedy and beam search (batched, with per-token
//! log-probabilities), and teacher-forced log-probabilities of given continuations.

use super::Network;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use std::sync::Arc;

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated token ids (the end-of-sequence token included when one was produced).
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token.
    pub logprobs: Vec<f32>,
    /// Ranking score: sum of log-probabilities / length^length_penalty.
    pub score: f32,
}

impl Hypothesis {
    pub fn sum_logprob(&self) -> f32 {
        self.logprobs.iter().sum()
    }
}

#[derive(Debug, Clone)]
pub struct DecodeOptions {
    pub max_new_tokens: usize,
    pub eos_ids: Vec<u32>,
    /// Beam width (1: greedy).
    pub beams: usize,
    /// How many hypotheses to return per prompt (at most `beams`).
    pub n_best: usize,
    pub length_penalty: f32,
    /// Stop a prompt once its `n_best` best finished hypotheses are at least as good as every
    /// live beam's current score; otherwise once all `beams` best finished ones are.
    pub early_stopping: bool,
    /// When set, a hypothesis also ends as soon as the first JSON object it opened is closed
    /// again (the braces each token holds, see [`BraceTable`]), like an end-of-sequence token.
    pub json_stop: Option<Arc<BraceTable>>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_new_tokens: 64,
            eos_ids: Vec::new(),
            beams: 1,
            n_best: 1,
            length_penalty: 1.0,
            early_stopping: false,
            json_stop: None,
        }
    }
}

/// For every token id, how many `{` and `}` its text holds (ids past the table hold none).
#[derive(Debug, Clone, Default)]
pub struct BraceTable {
    counts: Vec<(u8, u8)>,
}

impl BraceTable {
    /// From the text of every token id (byte-fallback tokens `<0x7B>` / `<0x7D>` count too).
    pub fn from_pieces<'a>(pieces: impl IntoIterator<Item = Option<&'a str>>) -> Self {
        let counts = pieces
            .into_iter()
            .map(|piece| match piece {
                Some("<0x7B>") => (1, 0),
                Some("<0x7D>") => (0, 1),
                Some(text) => (
                    text.matches('{').count().min(255) as u8,
                    text.matches('}').count().min(255) as u8,
                ),
                None => (0, 0),
            })
            .collect();
        BraceTable { counts }
    }

    fn of(&self, token: u32) -> (i32, i32) {
        self.counts
            .get(token as usize)
            .map_or((0, 0), |&(o, c)| (o as i32, c as i32))
    }
}

/// A live beam: tokens so far, their log-probabilities, their sum, and the JSON brace depth.
#[derive(Debug, Clone)]
struct Beam {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    sum: f32,
    depth: i32,
    opened: bool,
}

impl Beam {
    /// Appends a token; true when it ends the hypothesis.
    fn push(&mut self, token: u32, logprob: f32, options: &DecodeOptions) -> bool {
        self.tokens.push(token);
        self.logprobs.push(logprob);
        self.sum += logprob;
        if options.eos_ids.contains(&token) {
            return true;
        }
        match &options.json_stop {
            Some(table) => {
                let (opens, closes) = table.of(token);
                self.depth += opens - closes;
                self.opened |= opens > 0;
                self.opened && closes > 0 && self.depth <= 0
            }
            None => false,
        }
    }

    /// Ranking score: sum of log-probabilities / length^length_penalty.
    fn score(&self, length_penalty: f32) -> f32 {
        self.sum / (self.tokens.len().max(1) as f32).powf(length_penalty)
    }

    fn into_hypothesis(self, length_penalty: f32) -> Hypothesis {
        Hypothesis {
            score: self.score(length_penalty),
            tokens: self.tokens,
            logprobs: self.logprobs,
        }
    }
}

/// Left-pads prompts into a [B, T] id tensor and its 0/1 mask rows.
fn left_pad(prompts: &[Vec<u32>], device: &Device) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        bail!("cannot decode from an empty prompt (add a BOS token)");
    }
    let mut ids = Vec::with_capacity(prompts.len() * t);
    let mut mask = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let pad = t - prompt.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(prompt.iter().copied()));
        mask.push(
            std::iter::repeat_n(0u32, pad)
                .chain(std::iter::repeat_n(1, prompt.len()))
                .collect(),
        );
    }
    Ok((Tensor::from_vec(ids, (prompts.len(), t), device)?, mask))
}

/// The `keep` most likely next tokens with their log-probabilities, best first, for each batch
/// row of the last position ([`Network::top_logprobs`]: no log-softmax tensor, no sort of the
/// vocabulary).
fn last_top_logprobs(
    network: &Network,
    hidden: &Tensor,
    keep: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?.detach();
    network.top_logprobs(&last, keep)
}

/// Beam search (greedy when `beams` is 1) for a batch of prompts; returns, per prompt, up to
/// `n_best` hypotheses, best first. The batch holds one row per live beam: prompts are encoded
/// once, and beams (and prompts) that have finished leave the batch.
pub fn generate(
    network: &Network,
    prompts: &[Vec<u32>],
    options: &DecodeOptions,
    device: &Device,
) -> Result<Vec<Vec<Hypothesis>>> {
    if !network.is_decoder() {
        bail!("generation needs a decoder model");
    }
    let k = options.beams.max(1);
    let n_prompts = prompts.len();
    if n_prompts == 0 {
        return Ok(Vec::new());
    }
    let (ids, mask) = left_pad(prompts, device)?;
    let mut cache = network.new_cache();
    cache.detached = true;
    // Only the prompts' last positions are read: the last layer's work after attention runs
    // for them alone.
    let last = network.last_hidden(&ids, &mask, &mut cache)?.detach();
    let mut logprobs = network.top_logprobs(&last, 2 * k)?;
    // Live beams per prompt; live[p][j] is batch row first_row[p] + j.
    let mut live: Vec<Vec<Beam>> = vec![
        vec![Beam {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            sum: 0.0,
            depth: 0,
            opened: false,
        }];
        n_prompts
    ];
    let mut first_row: Vec<usize> = (0..n_prompts).collect();
    let mut finished: Vec<Vec<Hypothesis>> = vec![Vec::new(); n_prompts];
    let penalty = options.length_penalty;
    let n_best = options.n_best.clamp(1, k);
    // A prompt is done when the hypotheses to return are finished and no live beam's current
    // score beats the last of them: all `beams` of them, or with `early_stopping` only the
    // `n_best` that are returned.
    let needed = if options.early_stopping { n_best } else { k };
    for step in 0..options.max_new_tokens {
        let mut next_rows = Vec::new();
        let mut next_tokens = Vec::new();
        for p in 0..n_prompts {
            if live[p].is_empty() {
                continue;
            }
            let done = finished[p].len() >= needed && {
                let mut scores: Vec<f32> = finished[p].iter().map(|h| h.score).collect();
                scores.sort_by(|a, b| b.total_cmp(a));
                let last_returned = scores[needed - 1];
                let best_live = live[p]
                    .iter()
                    .map(|b| b.score(penalty))
                    .fold(f32::NEG_INFINITY, f32::max);
                last_returned >= best_live
            };
            // Candidates: (cumulative score, beam, token, token logprob).
            let mut candidates: Vec<(f32, usize, u32, f32)> = Vec::new();
            if !done {
                for (j, beam) in live[p].iter().enumerate() {
                    candidates.extend(
                        logprobs[first_row[p] + j]
                            .iter()
                            .map(|&(v, lp)| (beam.sum + lp, j, v, lp)),
                    );
                }
            }
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut new_live = Vec::with_capacity(k);
            let start = next_rows.len();
            for (_, j, token, lp) in candidates {
                if new_live.len() >= k {
                    break;
                }
                let mut beam = live[p][j].clone();
                if beam.push(token, lp, options) {
                    finished[p].push(beam.into_hypothesis(penalty));
                } else {
                    new_live.push(beam);
                    next_rows.push(first_row[p] + j);
                    next_tokens.push(token);
                }
            }
            first_row[p] = start;
            live[p] = new_live;
        }
        if next_rows.is_empty() || step + 1 == options.max_new_tokens {
            break;
        }
        cache.select(&next_rows)?;
        let rows = next_rows.len();
        let ids = Tensor::from_vec(next_tokens, (rows, 1), device)?;
        let hidden = network.hidden(&ids, &vec![vec![1u32]; rows], &mut cache)?;
        logprobs = last_top_logprobs(network, &hidden, 2 * k)?;
    }
    Ok(finished
        .into_iter()
        .zip(live)
        .map(|(mut done, alive)| {
            done.extend(alive.into_iter().map(|b| b.into_hypothesis(penalty)));
            done.sort_by(|a, b| b.score.total_cmp(&a.score));
            done.truncate(n_best);
            done
        })
        .collect())
}

/// One continuation per prompt, and no empty prompt (its first token would have nothing to be
/// predicted from).
fn check_scoring_inputs(prompts: &[Vec<u32>], continuations: &[Vec<u32>]) -> Result<()> {
    if prompts.len() != continuations.len() {
        bail!(
            "{} prompts but {} continuations",
            prompts.len(),
            continuations.len()
        );
    }
    if prompts.iter().any(Vec::is_empty) {
        bail!("cannot score a continuation of an empty prompt (add a BOS token)");
    }
    Ok(())
}

/// Teacher-forced logits [B, Tc, V] at the positions that predict each continuation token, the
/// continuation tokens [B, Tc, 1] (0 in padding) and the 0/1 mask [B, Tc] of real tokens.
pub fn continuation_logits(
    network: &Network,
    prompts: &[Vec<u32>],
    continuations: &[Vec<u32>],
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_scoring_inputs(prompts, continuations)?;
    let total = prompts
        .iter()
        .zip(continuations)
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(0);
    let tc = continuations.iter().map(Vec::len).max().unwrap_or(0);
    let b = prompts.len();
    // Right-padded sequences; targets gathered at the positions that predict each continuation token.
    let mut ids = vec![0u32; b * total];
    let mut mask = vec![vec![0u32; total]; b];
    let mut gather_pos = vec![0u32; b * tc];
    let mut targets = vec![0u32; b * tc];
    let mut target_mask = vec![0f32; b * tc];
    for (i, (prompt, cont)) in prompts.iter().zip(continuations).enumerate() {
        for (t, &token) in prompt.iter().chain(cont).enumerate() {
            ids[i * total + t] = token;
            mask[i][t] = 1;
        }
        for (j, &token) in cont.iter().enumerate() {
            gather_pos[i * tc + j] = (prompt.len() + j - 1) as u32;
            targets[i * tc + j] = token;
            target_mask[i * tc + j] = 1.0;
        }
    }
    let ids = Tensor::from_vec(ids, (b, total), device)?;
    let hidden = network.hidden(&ids, &mask, &mut network.new_cache())?;
    let h = hidden.dim(2)?;
    let positions = Tensor::from_vec(gather_pos, (b, tc, 1), device)?
        .broadcast_as((b, tc, h))?
        .contiguous()?;
    let picked = hidden.gather(&positions, 1)?;
    let logits = network.logits(&picked)?;
    let targets = Tensor::from_vec(targets, (b, tc, 1), device)?;
    let target_mask = Tensor::from_vec(target_mask, (b, tc), device)?;
    Ok((logits, targets, target_mask))
}

/// Teacher-forced log-probabilities [B, Tc] of each continuation token given its prompt, as a
/// differentiable tensor (padding positions hold 0), together with the 0/1 mask of real tokens.
pub fn continuation_logprobs_tensor(
    network: &Network,
    prompts: &[Vec<u32>],
    continuations: &[Vec<u32>],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (logits, targets, target_mask) =
        continuation_logits(network, prompts, continuations, device)?;
    let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let token_logprobs = logprobs.gather(&targets, 2)?.squeeze(2)?;
    Ok(((token_logprobs * &target_mask)?, target_mask))
}

/// The fewest prompt tokens that continuations of one prompt must share before [`continuation_logprobs`]
/// computes them once.
pub const MIN_SHARED_PROMPT: usize = 4;

/// Teacher-forced per-token log-probabilities of each continuation (no padding in the result).
/// Continuations of the same prompt (candidates scored against one input) share the prompt's
/// keys and values: all of a prompt but its last token runs once per group
/// ([`super::prefix`]), then each continuation with that last token.
pub fn continuation_logprobs(
    network: &Network,
    prompts: &[Vec<u32>],
    continuations: &[Vec<u32>],
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    check_scoring_inputs(prompts, continuations)?;
    let b = prompts.len();
    let tc = continuations.iter().map(Vec::len).max().unwrap_or(0);
    if tc == 0 {
        return Ok(vec![Vec::new(); b]);
    }
    let seqs: Vec<Vec<u32>> = prompts
        .iter()
        .zip(continuations)
        .map(|(p, c)| [p.as_slice(), c.as_slice()].concat())
        .collect();
    let limits: Vec<usize> = prompts.iter().map(|p| p.len() - 1).collect();
    let groups = super::prefix::group_by_prefix_within(&seqs, &limits, MIN_SHARED_PROMPT);
    let (hidden, _) = super::prefix::suffix_hidden(network, &seqs, &groups, device)?;
    // Row r of `hidden` is member i of its group: the state that predicts continuation token j
    // sits at (prompt length - 1 - shared) + j.
    let members: Vec<(usize, usize)> = groups
        .iter()
        .flat_map(|g| g.members.iter().map(move |&i| (i, g.shared)))
        .collect();
    let mut gather_pos = vec![0u32; b * tc];
    let mut targets = vec![0u32; b * tc];
    for (row, &(i, shared)) in members.iter().enumerate() {
        let first = prompts[i].len() - 1 - shared;
        for (j, &token) in continuations[i].iter().enumerate() {
            gather_pos[row * tc + j] = (first + j) as u32;
            targets[row * tc + j] = token;
        }
    }
    let h = hidden.dim(2)?;
    let positions = Tensor::from_vec(gather_pos, (b, tc, 1), device)?
        .broadcast_as((b, tc, h))?
        .contiguous()?;
    let picked = hidden.gather(&positions, 1)?;
    let logprobs = candle_nn::ops::log_softmax(&network.logits(&picked)?, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (b, tc, 1), device)?;
    let rows = logprobs.gather(&targets, 2)?.squeeze(2)?.to_vec2::<f32>()?;
    let mut out = vec![Vec::new(); b];
    for (row, &(i, _)) in rows.into_iter().zip(&members) {
        out[i] = row[..continuations[i].len()].to_vec();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_stop_waits_for_the_outermost_object() {
        let table = BraceTable::from_pieces([
            Some("▁{"),
            Some("{\""),
            Some("\"}"),
            Some("<0x7D>"),
            Some("x"),
            Some("{}"),
        ]);
        let options = DecodeOptions {
            json_stop: Some(Arc::new(table)),
            eos_ids: vec![9],
            ..Default::default()
        };
        let fresh = || Beam {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            sum: 0.0,
            depth: 0,
            opened: false,
        };
        let mut beam = fresh();
        // Text before the object, two opens, one close: still inside.
        for token in [4, 0, 1, 2] {
            assert!(!beam.push(token, -0.5, &options));
        }
        // The byte-fallback close ends it.
        assert!(beam.push(3, -0.5, &options));
        assert_eq!(beam.sum, -2.5);
        // "{}" in one token opens and closes.
        assert!(fresh().push(5, 0.0, &options));
        // A stray close before any open does not end it; end-of-sequence does.
        let mut beam = fresh();
        assert!(!beam.push(2, 0.0, &options));
        assert!(beam.push(9, 0.0, &options));
        // Ids past the table hold no braces.
        assert!(!fresh().push(1000, 0.0, &options));
    }
}
