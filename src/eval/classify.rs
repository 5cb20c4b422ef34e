//! Classification metrics: accuracy, AUROC, expected calibration error and Brier score
//! (METHOD.md section 2).

use crate::error::InputError;
use crate::io::read_jsonl_map;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How far the probabilities of one prediction may sum away from 1.
pub const SUM_TOLERANCE: f64 = 1e-4;

/// Number of equal-width confidence bins of the ECE.
pub const ECE_BINS: usize = 15;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub label: usize,
    pub probs: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifyMetrics {
    pub accuracy: f64,
    /// `None` where undefined: a class of the task is absent from the labels.
    pub auroc: Option<f64>,
    pub ece: f64,
    pub brier: f64,
    pub n: usize,
}

/// Why a set of predictions cannot be scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictionError {
    #[error("no predictions")]
    Empty,
    #[error("prediction {index}: expected at least 2 probabilities, got {got}")]
    TooFewClasses { index: usize, got: usize },
    #[error("prediction {index}: {got} probabilities where earlier predictions had {expected}")]
    ClassCountMismatch {
        index: usize,
        expected: usize,
        got: usize,
    },
    #[error("prediction {index}: probability {value} is not a number in [0, 1]")]
    BadProbability { index: usize, value: f64 },
    #[error("prediction {index}: probabilities sum to {sum}, not 1 (tolerance {SUM_TOLERANCE})")]
    BadSum { index: usize, sum: f64 },
    #[error(
        "prediction {index}: label {label} is out of range for {classes} classes (0..{classes})"
    )]
    LabelOutOfRange {
        index: usize,
        label: usize,
        classes: usize,
    },
}

/// Checks one prediction against the number of classes seen so far (`None` for the first).
fn check_one(
    index: usize,
    prediction: &Prediction,
    classes: Option<usize>,
) -> Result<usize, PredictionError> {
    let k = prediction.probs.len();
    if k < 2 {
        return Err(PredictionError::TooFewClasses { index, got: k });
    }
    if let Some(expected) = classes.filter(|&c| c != k) {
        return Err(PredictionError::ClassCountMismatch {
            index,
            expected,
            got: k,
        });
    }
    if let Some(&value) = prediction
        .probs
        .iter()
        .find(|p| !p.is_finite() || **p < -SUM_TOLERANCE || **p > 1.0 + SUM_TOLERANCE)
    {
        return Err(PredictionError::BadProbability { index, value });
    }
    let sum: f64 = prediction.probs.iter().sum();
    if (sum - 1.0).abs() > SUM_TOLERANCE {
        return Err(PredictionError::BadSum { index, sum });
    }
    if prediction.label >= k {
        return Err(PredictionError::LabelOutOfRange {
            index,
            label: prediction.label,
            classes: k,
        });
    }
    Ok(k)
}

/// Validates predictions and returns the number of classes K.
pub fn validate(predictions: &[Prediction]) -> Result<usize, PredictionError> {
    let mut classes = None;
    for (index, prediction) in predictions.iter().enumerate() {
        classes = Some(check_one(index, prediction, classes)?);
    }
    classes.ok_or(PredictionError::Empty)
}

/// Reads a predictions file (one `{"label": int, "probs": [float, ...]}` per line) and validates
/// every line, naming the line of the first problem.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>, InputError> {
    let mut classes = None;
    read_jsonl_map(
        path,
        "{\"label\": int, \"probs\": [float, ...]}",
        |line, prediction: Prediction| {
            classes = Some(check_one(line, &prediction, classes).map_err(|e| {
                let message = e.to_string();
                let message = message
                    .split_once(": ")
                    .map(|(_, m)| m.to_string())
                    .unwrap_or(message);
                InputError::at_line(path, line, message)
            })?);
            Ok(prediction)
        },
    )
}

/// Index of the largest probability; the first one on ties (as numpy's argmax).
pub fn argmax(probs: &[f64]) -> usize {
    let mut best = 0;
    for (k, &p) in probs.iter().enumerate() {
        if p > probs[best] {
            best = k;
        }
    }
    best
}

/// Binary AUROC of `scores` for `positive` labels: the probability that a random positive scores
/// above a random negative, ties counting one half (Mann-Whitney U over average ranks).
/// `None` when either class is absent.
pub fn binary_auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let positives_in_tie = order[start..end].iter().filter(|&&i| positive[i]).count();
        rank_sum += average_rank * positives_in_tie as f64;
        start = end;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// AUROC: binary for K = 2 (score = probability of class 1), macro one-vs-rest for K > 2.
/// `None` when a class is absent from the labels (one-vs-rest is then undefined for it).
pub fn auroc(predictions: &[Prediction], classes: usize) -> Option<f64> {
    let labels: Vec<usize> = predictions.iter().map(|p| p.label).collect();
    let one_vs_rest = |k: usize| {
        let scores: Vec<f64> = predictions.iter().map(|p| p.probs[k]).collect();
        let positive: Vec<bool> = labels.iter().map(|&l| l == k).collect();
        binary_auroc(&scores, &positive)
    };
    if classes == 2 {
        return one_vs_rest(1);
    }
    let per_class: Option<Vec<f64>> = (0..classes).map(one_vs_rest).collect();
    per_class.map(|v| v.iter().sum::<f64>() / classes as f64)
}

/// The ECE bin (0-based) of a confidence: bin b (1-based) holds conf in ((b-1)/15, b/15], with the
/// edges taken as the f64 values of b/15.
fn ece_bin(confidence: f64) -> usize {
    (1..=ECE_BINS)
        .find(|&b| confidence <= b as f64 / ECE_BINS as f64)
        .unwrap_or(ECE_BINS)
        - 1
}

/// ECE = sum_b (n_b / n) |acc_b - conf_b| over 15 equal-width bins of the top probability.
pub fn ece(predictions: &[Prediction]) -> f64 {
    let mut count = [0usize; ECE_BINS];
    let mut correct = [0.0f64; ECE_BINS];
    let mut confidence = [0.0f64; ECE_BINS];
    for prediction in predictions {
        let predicted = argmax(&prediction.probs);
        let conf = prediction.probs[predicted];
        let bin = ece_bin(conf);
        count[bin] += 1;
        confidence[bin] += conf;
        if predicted == prediction.label {
            correct[bin] += 1.0;
        }
    }
    let n = predictions.len() as f64;
    (0..ECE_BINS)
        .filter(|&b| count[b] > 0)
        .map(|b| {
            let nb = count[b] as f64;
            (nb / n) * (correct[b] / nb - confidence[b] / nb).abs()
        })
        .sum()
}

/// Brier score, multi-class form: mean_i sum_k (p_ik - 1[y_i = k])^2.
pub fn brier(predictions: &[Prediction]) -> f64 {
    let total: f64 = predictions
        .iter()
        .map(|p| {
            p.probs
                .iter()
                .enumerate()
                .map(|(k, &q)| {
                    let target = if k == p.label { 1.0 } else { 0.0 };
                    (q - target) * (q - target)
                })
                .sum::<f64>()
        })
        .sum();
    total / predictions.len() as f64
}

pub fn accuracy(predictions: &[Prediction]) -> f64 {
    let correct = predictions
        .iter()
        .filter(|p| argmax(&p.probs) == p.label)
        .count();
    correct as f64 / predictions.len() as f64
}

/// All classification metrics, after validating the predictions.
pub fn classify_metrics(predictions: &[Prediction]) -> Result<ClassifyMetrics, PredictionError> {
    let classes = validate(predictions)?;
    Ok(ClassifyMetrics {
        accuracy: accuracy(predictions),
        auroc: auroc(predictions, classes),
        ece: ece(predictions),
        brier: brier(predictions),
        n: predictions.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(label: usize, probs: &[f64]) -> Prediction {
        Prediction {
            label,
            probs: probs.to_vec(),
        }
    }

    #[test]
    fn hand_computed_binary_case() {
        // scores of class 1: positives {0.9, 0.4}, negatives {0.4, 0.2}
        // pairs: (0.9>0.4) 1, (0.9>0.2) 1, (0.4=0.4) 0.5, (0.4>0.2) 1 -> 3.5 / 4
        let preds = vec![
            pred(1, &[0.1, 0.9]),
            pred(1, &[0.6, 0.4]),
            pred(0, &[0.6, 0.4]),
            pred(0, &[0.8, 0.2]),
        ];
        let m = classify_metrics(&preds).unwrap();
        assert_eq!(m.n, 4);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        assert!((m.auroc.unwrap() - 0.875).abs() < 1e-12);
        // Brier: 2*(0.1^2) + 2*(0.6^2) + 2*(0.4^2) + 2*(0.2^2), over 4
        let brier = (2.0 * 0.01 + 2.0 * 0.36 + 2.0 * 0.16 + 2.0 * 0.04) / 4.0;
        assert!((m.brier - brier).abs() < 1e-12);
        // ECE bins: 0.9 -> bin 14 (acc 1); 0.6, 0.6 -> bin 9 (acc 0.5, conf 0.6); 0.8 -> bin 12 (acc 1)
        let ece = 0.25 * 0.1 + 0.5 * 0.1 + 0.25 * 0.2;
        assert!((m.ece - ece).abs() < 1e-12, "{}", m.ece);
    }

    #[test]
    fn invalid_predictions_are_rejected() {
        assert_eq!(validate(&[]), Err(PredictionError::Empty));
        assert!(matches!(
            validate(&[pred(0, &[0.5, 0.4])]),
            Err(PredictionError::BadSum { .. })
        ));
        assert!(matches!(
            validate(&[pred(2, &[0.5, 0.5])]),
            Err(PredictionError::LabelOutOfRange { .. })
        ));
        assert!(matches!(
            validate(&[pred(0, &[1.0])]),
            Err(PredictionError::TooFewClasses { .. })
        ));
        assert!(matches!(
            validate(&[pred(0, &[f64::NAN, 1.0])]),
            Err(PredictionError::BadProbability { .. })
        ));
        assert!(matches!(
            validate(&[pred(0, &[1.5, -0.5])]),
            Err(PredictionError::BadProbability { .. })
        ));
        assert!(matches!(
            validate(&[pred(0, &[0.5, 0.5]), pred(0, &[0.2, 0.3, 0.5])]),
            Err(PredictionError::ClassCountMismatch { index: 1, .. })
        ));
    }

    #[test]
    fn argmax_ties_pick_the_first_class() {
        assert_eq!(argmax(&[0.5, 0.5]), 0);
        assert_eq!(argmax(&[0.2, 0.4, 0.4]), 1);
    }

    #[test]
    fn ece_bin_edges_are_right_closed() {
        assert_eq!(ece_bin(0.5), 7);
        assert_eq!(ece_bin(9.0 / 15.0), 8);
        assert_eq!(ece_bin(0.6), 8);
        assert_eq!(ece_bin(1.0), 14);
        assert_eq!(ece_bin(14.0 / 15.0), 13);
    }

    #[test]
    fn all_one_class_has_no_auroc() {
        let preds = vec![pred(1, &[0.3, 0.7]), pred(1, &[0.6, 0.4])];
        assert_eq!(classify_metrics(&preds).unwrap().auroc, None);
    }
}
