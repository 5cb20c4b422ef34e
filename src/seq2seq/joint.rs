//! Joint decoding for generation (METHOD.md section 4) and weak-model weights learned from the
//! weak models' agreement **(beyond)**.
//!
//! Joint decoding: the n-best lists of all weak models are pooled (deduplicated by text), every
//! candidate is rescored by every weak model (length-normalised log-likelihood s_j(h), teacher
//! forced), and the candidate with the best s(h) = sum_j w_j s_j(h) becomes the single target.
//!
//! Agreement weights: start from uniform weights; on each input take the consensus (the joint
//! decoding choice under the current weights); a weak model's reliability is the mean slot-F1 of
//! its own top hypothesis against the consensus; the weights are the reliabilities normalised to
//! sum 1; repeat until they settle. No ground truth is used.

use crate::data::slurp::json_to_slots;
use crate::data::Entity;
use crate::eval::slurp::span_counts;

/// The pooled candidates of one input: texts in order of first appearance over the models' lists.
pub fn pool_candidates(nbest: &[&[String]]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for list in nbest {
        for text in list.iter() {
            if !out.contains(text) {
                out.push(text.clone());
            }
        }
    }
    out
}

/// s(h) = sum_j w_j s_j(h) for each candidate; `scores[c][j]` is model j's score of candidate c.
pub fn combined(scores: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    scores
        .iter()
        .map(|row| row.iter().zip(weights).map(|(s, w)| s * w).sum())
        .collect()
}

/// Index of the candidate with the best combined score (the first one on ties); None if empty.
pub fn pick(scores: &[Vec<f64>], weights: &[f64]) -> Option<usize> {
    let combined = combined(scores, weights);
    let mut best: Option<usize> = None;
    for (i, &s) in combined.iter().enumerate() {
        if best.is_none_or(|b| s > combined[b]) {
            best = Some(i);
        }
    }
    best
}

/// The preference pair of one prompt from the ensemble scores of its candidates: (chosen,
/// rejected) = (best, worst); `None` when they tie (or there are fewer than two candidates).
pub fn preference_pair(scores: &[f64]) -> Option<(usize, usize)> {
    let mut best = 0usize;
    let mut worst = 0usize;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
        if s < scores[worst] {
            worst = i;
        }
    }
    if scores.len() < 2 || scores[best] <= scores[worst] {
        None
    } else {
        Some((best, worst))
    }
}

/// The slots of a generated text; an unparsable text has none.
pub fn slots_of(text: &str) -> Vec<Entity> {
    json_to_slots(text).unwrap_or_default()
}

/// Agreement of two slot lists: 2 |A ∩ B| / (|A| + |B|) over (type, filler) multisets; 1 when
/// both are empty.
pub fn slot_agreement(a: &[Entity], b: &[Entity]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    // tp + fp = |A| and tp + fn = |B|: the span F1 of A against B.
    let c = span_counts(b, a);
    2.0 * c.tp / (2.0 * c.tp + c.fp + c.fn_)
}

/// One input for the agreement estimate: the pooled candidates, each model's score of each
/// candidate, and the index (in the candidates) of each model's own top hypothesis.
pub struct AgreementInput {
    pub candidates: Vec<String>,
    pub scores: Vec<Vec<f64>>,
    pub own_top: Vec<usize>,
}

/// Weights from agreement (see the module doc), after at most `rounds` rounds.
pub fn agreement_weights(inputs: &[AgreementInput], models: usize, rounds: usize) -> Vec<f64> {
    let mut weights = vec![1.0 / models as f64; models];
    if inputs.is_empty() || models == 0 {
        return weights;
    }
    let slots: Vec<Vec<Vec<Entity>>> = inputs
        .iter()
        .map(|i| i.candidates.iter().map(|c| slots_of(c)).collect())
        .collect();
    for _ in 0..rounds.max(1) {
        let mut reliability = vec![0f64; models];
        for (input, cand_slots) in inputs.iter().zip(&slots) {
            let Some(consensus) = pick(&input.scores, &weights) else {
                continue;
            };
            for (j, r) in reliability.iter_mut().enumerate() {
                *r += slot_agreement(&cand_slots[input.own_top[j]], &cand_slots[consensus]);
            }
        }
        let floored: Vec<f64> = reliability
            .iter()
            .map(|r| (r / inputs.len() as f64).max(1e-3))
            .collect();
        let total: f64 = floored.iter().sum();
        let next: Vec<f64> = floored.iter().map(|r| r / total).collect();
        let change: f64 = next.iter().zip(&weights).map(|(a, b)| (a - b).abs()).sum();
        weights = next;
        if change < 1e-9 {
            break;
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: &str, filler: &str) -> Entity {
        Entity::new(kind, filler)
    }

    #[test]
    fn pooling_keeps_first_appearance_order_without_duplicates() {
        let a = vec!["x".to_string(), "y".to_string()];
        let b = vec!["y".to_string(), "z".to_string()];
        assert_eq!(pool_candidates(&[&a, &b]), vec!["x", "y", "z"]);
    }

    #[test]
    fn joint_decoding_picks_the_best_weighted_score() {
        // Model 0 prefers candidate 0, model 1 prefers candidate 1 by more; weights decide.
        let scores = vec![vec![-0.1, -2.0], vec![-0.5, -0.2], vec![-3.0, -3.0]];
        assert_eq!(pick(&scores, &[0.5, 0.5]), Some(1)); // -1.05 vs -0.35
        assert_eq!(pick(&scores, &[0.95, 0.05]), Some(0)); // -0.195 vs -0.485
        assert_eq!(combined(&scores, &[1.0, 0.0]), vec![-0.1, -0.5, -3.0]);
        assert_eq!(pick(&[], &[1.0]), None);
        // ties: the first
        assert_eq!(pick(&[vec![-1.0], vec![-1.0]], &[1.0]), Some(0));
    }

    #[test]
    fn preference_pairs_take_best_and_worst_and_skip_ties() {
        assert_eq!(preference_pair(&[-0.5, -0.1, -2.0, -0.3]), Some((1, 2)));
        assert_eq!(preference_pair(&[-0.5, -0.5]), None);
        assert_eq!(preference_pair(&[-0.5]), None);
        assert_eq!(preference_pair(&[]), None);
    }

    #[test]
    fn slot_agreement_counts_multisets() {
        assert_eq!(slot_agreement(&[], &[]), 1.0);
        assert_eq!(slot_agreement(&[e("a", "x")], &[]), 0.0);
        let a = [e("a", "x"), e("b", "y")];
        let b = [e("a", "x"), e("b", "z"), e("c", "w")];
        assert!((slot_agreement(&a, &b) - 2.0 / 5.0).abs() < 1e-12);
        assert_eq!(slots_of("not json"), Vec::<Entity>::new());
        assert_eq!(
            slots_of(r#"{"a": "x & y"}"#),
            vec![e("a", "x"), e("a", "y")]
        );
    }

    #[test]
    fn the_model_that_agrees_with_the_consensus_gets_more_weight() {
        // Three models; models 0 and 1 agree on every input, model 2 says something else.
        let inputs: Vec<AgreementInput> = (0..4)
            .map(|i| AgreementInput {
                candidates: vec![format!("{{\"t\": \"v{i}\"}}"), "{}".to_string()],
                scores: vec![vec![-0.2, -0.3, -0.9], vec![-0.8, -0.7, -0.1]],
                own_top: vec![0, 0, 1],
            })
            .collect();
        let w = agreement_weights(&inputs, 3, 10);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(w[0] > w[2] && w[1] > w[2], "{w:?}");
        assert!((w[0] - w[1]).abs() < 1e-12);
    }
}
