//! SLURP slot-filling metrics, as the official SLURP scorer defines them (METHOD.md section 2).
//!
//! Entities are (type, filler) pairs. Per utterance:
//! - span: a predicted entity equal to a remaining gold entity is a TP (that gold entity is used
//!   up), otherwise an FP; gold entities left over are FNs.
//! - word / char distance: walk the predicted entities in order; if a gold entity of the same type
//!   remains, take the one at the smallest distance d (the earliest on ties), TP += 1, FP += d,
//!   FN += d, and use it up; otherwise FP += 1. Gold entities left over: FN += 1.
//!   d is the word error rate (gold -> predicted, over gold words; it can exceed 1) at word level,
//!   the Levenshtein distance over characters divided by the longer length at char level.
//! - SLU: the word-level and char-level counts added together.
//!
//! Counts are summed over utterances (micro average). P = TP / (TP + FP), R = TP / (TP + FN),
//! F1 = 2PR / (P + R), each 0 where its denominator is 0 (as the reference scorer does).
//!
//! Differences from the reference scorer, both deliberate: an utterance without a prediction counts
//! as an empty prediction (the reference scorer skips it), and an empty gold filler (which makes the
//! reference scorer crash) has word distance 0 to an empty prediction and otherwise the number of
//! predicted words.

use crate::data::Entity;
use crate::error::InputError;
use crate::io::read_jsonl_map;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// One line of a gold or prediction file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub id: String,
    pub entities: Vec<Entity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
}

pub const RECORD_SHAPE: &str = "{\"id\": str, \"entities\": [{\"type\": str, \"filler\": str}]}";

/// Reads a gold or prediction file; a repeated id is an error naming both lines.
pub fn read_records(path: &Path) -> Result<Vec<SlotRecord>, InputError> {
    let mut first_line: HashMap<String, usize> = HashMap::new();
    read_jsonl_map(path, RECORD_SHAPE, |line, record: SlotRecord| {
        if let Some(previous) = first_line.insert(record.id.clone(), line) {
            return Err(InputError::at_line(
                path,
                line,
                format!(
                    "id `{}` repeats line {previous}; ids must be unique",
                    record.id
                ),
            ));
        }
        Ok(record)
    })
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
    }

    /// (precision, recall, F1), each 0 where undefined.
    pub fn prf(&self) -> (f64, f64, f64) {
        let ratio = |num: f64, den: f64| if den == 0.0 { 0.0 } else { num / den };
        let precision = ratio(self.tp, self.tp + self.fp);
        let recall = ratio(self.tp, self.tp + self.fn_);
        let f1 = ratio(2.0 * precision * recall, precision + recall);
        (precision, recall, f1)
    }
}

/// Levenshtein distance between two sequences (unit costs).
fn levenshtein<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(x != y);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// Words as the reference scorer's WER sees them: runs of two or more whitespace characters become
/// one space, the ends are trimmed, the text is split on spaces, and empty pieces are dropped (a
/// single tab between two words does not separate them).
fn wer_words(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut collapsed = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() && i + 1 < chars.len() && chars[i + 1].is_whitespace() {
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            collapsed.push(' ');
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    collapsed
        .trim()
        .split(' ')
        .filter(|w| !w.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Word error rate of `hypothesis` against `reference`: edits / reference words.
pub fn word_error_rate(reference: &str, hypothesis: &str) -> f64 {
    let reference = wer_words(reference);
    let hypothesis = wer_words(hypothesis);
    if reference.is_empty() {
        return hypothesis.len() as f64;
    }
    levenshtein(&reference, &hypothesis) as f64 / reference.len() as f64
}

/// Levenshtein distance over Unicode scalar values divided by the longer length (0 for two empty
/// strings).
pub fn char_distance(reference: &str, hypothesis: &str) -> f64 {
    let a: Vec<char> = reference.chars().collect();
    let b: Vec<char> = hypothesis.chars().collect();
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 0.0;
    }
    levenshtein(&a, &b) as f64 / longest as f64
}

/// Exact (type, filler) matches between two entity multisets: true positives, false positives
/// (predicted, unmatched), false negatives (gold, unmatched).
pub fn span_counts(gold: &[Entity], predicted: &[Entity]) -> Counts {
    let mut remaining: Vec<&Entity> = gold.iter().collect();
    let mut counts = Counts::default();
    for entity in predicted {
        match remaining.iter().position(|g| *g == entity) {
            Some(i) => {
                remaining.remove(i);
                counts.tp += 1.0;
            }
            None => counts.fp += 1.0,
        }
    }
    counts.fn_ += remaining.len() as f64;
    counts
}

fn distance_counts(
    gold: &[Entity],
    predicted: &[Entity],
    distance: fn(&str, &str) -> f64,
) -> Counts {
    let mut remaining: Vec<&Entity> = gold.iter().collect();
    let mut counts = Counts::default();
    for entity in predicted {
        let mut best: Option<(usize, f64)> = None;
        for (i, g) in remaining
            .iter()
            .enumerate()
            .filter(|(_, g)| g.kind == entity.kind)
        {
            let d = distance(&g.filler, &entity.filler);
            if best.is_none_or(|(_, best_d)| d < best_d) {
                best = Some((i, d));
            }
        }
        match best {
            Some((i, d)) => {
                remaining.remove(i);
                counts.tp += 1.0;
                counts.fp += d;
                counts.fn_ += d;
            }
            None => counts.fp += 1.0,
        }
    }
    counts.fn_ += remaining.len() as f64;
    counts
}

fn same_multiset(a: &[Entity], b: &[Entity]) -> bool {
    let key = |e: &&Entity| (e.kind.clone(), e.filler.clone());
    let mut a: Vec<_> = a.iter().map(|e| key(&e)).collect();
    let mut b: Vec<_> = b.iter().map(|e| key(&e)).collect();
    a.sort();
    b.sort();
    a == b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlurpMetrics {
    pub span_precision: f64,
    pub span_recall: f64,
    pub span_f1: f64,
    pub word_precision: f64,
    pub word_recall: f64,
    pub word_f1: f64,
    pub char_precision: f64,
    pub char_recall: f64,
    pub char_f1: f64,
    pub slu_precision: f64,
    pub slu_recall: f64,
    pub slu_f1: f64,
    /// Fraction of utterances whose predicted entity multiset equals the gold one.
    pub exact_match: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent_accuracy: Option<f64>,
    /// Gold utterances without a prediction (scored as empty predictions).
    pub missing_predictions: usize,
    /// Number of gold utterances.
    pub n: usize,
}

/// Scores predictions against gold, matched by id. Predictions whose id is not in gold are
/// ignored; their ids are returned so the caller can warn.
pub fn slurp_metrics(gold: &[SlotRecord], predicted: &[SlotRecord]) -> (SlurpMetrics, Vec<String>) {
    let by_id: HashMap<&str, &SlotRecord> = predicted.iter().map(|p| (p.id.as_str(), p)).collect();
    let gold_ids: HashSet<&str> = gold.iter().map(|g| g.id.as_str()).collect();
    let unknown: Vec<String> = predicted
        .iter()
        .filter(|p| !gold_ids.contains(p.id.as_str()))
        .map(|p| p.id.clone())
        .collect();
    let (mut span, mut word, mut char) = (Counts::default(), Counts::default(), Counts::default());
    let (mut exact, mut missing) = (0usize, 0usize);
    let no_entities: Vec<Entity> = Vec::new();
    // Accuracy of a field where the predictions carry it: (correct, scored).
    let mut field_hits = [(0usize, 0usize); 3];
    let any_field =
        |get: fn(&SlotRecord) -> &Option<String>| predicted.iter().any(|p| get(p).is_some());
    let fields: [fn(&SlotRecord) -> &Option<String>; 3] =
        [|r| &r.scenario, |r| &r.action, |r| &r.intent];
    let predicted_fields: Vec<bool> = fields.iter().map(|&f| any_field(f)).collect();
    for g in gold {
        let prediction = by_id.get(g.id.as_str());
        if prediction.is_none() {
            missing += 1;
        }
        let entities = prediction.map(|p| &p.entities).unwrap_or(&no_entities);
        span.add(span_counts(&g.entities, entities));
        word.add(distance_counts(&g.entities, entities, word_error_rate));
        char.add(distance_counts(&g.entities, entities, char_distance));
        if same_multiset(&g.entities, entities) {
            exact += 1;
        }
        for (k, field) in fields.iter().enumerate() {
            if let (true, Some(gold_value)) = (predicted_fields[k], field(g)) {
                field_hits[k].1 += 1;
                if prediction.and_then(|p| field(p).as_ref()) == Some(gold_value) {
                    field_hits[k].0 += 1;
                }
            }
        }
    }
    let mut slu = word;
    slu.add(char);
    let n = gold.len();
    let rate = |(hits, total): (usize, usize)| (total > 0).then(|| hits as f64 / total as f64);
    let (span_precision, span_recall, span_f1) = span.prf();
    let (word_precision, word_recall, word_f1) = word.prf();
    let (char_precision, char_recall, char_f1) = char.prf();
    let (slu_precision, slu_recall, slu_f1) = slu.prf();
    let metrics = SlurpMetrics {
        span_precision,
        span_recall,
        span_f1,
        word_precision,
        word_recall,
        word_f1,
        char_precision,
        char_recall,
        char_f1,
        slu_precision,
        slu_recall,
        slu_f1,
        exact_match: if n == 0 { 0.0 } else { exact as f64 / n as f64 },
        scenario_accuracy: rate(field_hits[0]),
        action_accuracy: rate(field_hits[1]),
        intent_accuracy: rate(field_hits[2]),
        missing_predictions: missing,
        n,
    };
    (metrics, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: &str, filler: &str) -> Entity {
        Entity::new(kind, filler)
    }

    #[test]
    fn word_error_rate_known_values() {
        assert_eq!(word_error_rate("a b c", "a b c"), 0.0);
        assert!((word_error_rate("a b c", "a x c") - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(word_error_rate("a", "x y z"), 3.0);
        assert_eq!(word_error_rate("a b", ""), 1.0);
        // runs of whitespace collapse; a single tab does not split
        assert_eq!(wer_words("  a \t b  "), vec!["a", "b"]);
        assert_eq!(wer_words("a\tb"), vec!["a\tb"]);
        assert_eq!(word_error_rate("", ""), 0.0);
    }

    #[test]
    fn char_distance_known_values() {
        assert!((char_distance("café de flore", "cafe de flore") - 1.0 / 13.0).abs() < 1e-12);
        assert_eq!(char_distance("abc", ""), 1.0);
        assert_eq!(char_distance("kitten", "sitting"), 3.0 / 7.0);
        assert_eq!(char_distance("", ""), 0.0);
    }

    #[test]
    fn greedy_walk_picks_the_closest_gold_of_the_same_type() {
        // "morning" is closer to the second gold entity; the first prediction takes it.
        let gold = vec![e("time", "five pm"), e("time", "morning")];
        let predicted = vec![e("time", "this morning"), e("date", "friday")];
        let counts = distance_counts(&gold, &predicted, word_error_rate);
        // d(morning -> this morning) = 1 insertion / 1 word = 1
        assert_eq!(
            counts,
            Counts {
                tp: 1.0,
                fp: 1.0 + 1.0,
                fn_: 1.0 + 1.0
            }
        );
        let span = span_counts(&gold, &predicted);
        assert_eq!(
            span,
            Counts {
                tp: 0.0,
                fp: 2.0,
                fn_: 2.0
            }
        );
    }

    #[test]
    fn f1_is_zero_when_nothing_is_predicted_or_expected() {
        let (m, unknown) = slurp_metrics(
            &[SlotRecord {
                id: "a".into(),
                entities: vec![],
                scenario: None,
                action: None,
                intent: None,
            }],
            &[],
        );
        assert!(unknown.is_empty());
        assert_eq!(
            (m.span_f1, m.slu_f1, m.exact_match, m.missing_predictions),
            (0.0, 0.0, 1.0, 1)
        );
    }
}
