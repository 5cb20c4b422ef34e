//! Token-level probability estimation across tokenizers (METHOD.md section 4).
//!
//! A weak model's hypothesis comes with one log-probability per *weak* token; the strong model
//! learns over *its own* tokens. Whitespace-separated words are the bridge:
//! 1. every weak token is mapped to the word it spells; the word's score s_w is the sum of the
//!    log-probabilities of its weak tokens;
//! 2. the hypothesis text (+ end-of-sequence when the weak model ended it) is tokenised with the
//!    strong tokenizer, and every strong token is mapped to a word the same way;
//! 3. s_w is shared among the word's strong tokens: log p^_t = s_w * softmax_{t' in w}(-m(t'))_t,
//!    with m(t') the strong model's current (detached) top probability at that position, or
//!    uniformly (s_w / |w|);
//! 4. the soft target at position t gives the label token exactly p^_t; the remaining mass goes to
//!    the other tokens in proportion to the strong model's current distribution, or uniformly, or
//!    nowhere (one-hot target).
//!
//! Tokens are mapped to characters by decoding growing prefixes and comparing their non-whitespace
//! characters with the text's (case-insensitively, so lower-casing tokenizers work too). A token
//! that completes a character split over several byte tokens gets that character; a token that
//! spells no character (a lone space, a partial byte) belongs to the word of the next character.

use crate::models::tokenizer::Tokenizer;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// How a word's log-probability is shared among its strong tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Share {
    /// In proportion to softmax(-top probability of the strong model) over the word's tokens.
    #[default]
    Confidence,
    /// Equally: s_w / |w|.
    Uniform,
}

/// Where the mass not given to the label token goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Spread {
    /// In proportion to the strong model's current (detached) distribution over the other tokens.
    #[default]
    Strong,
    /// Equally over the other tokens.
    Uniform,
    /// Nowhere: the target is one-hot on the label token.
    OneHot,
}

/// The word (index in the whitespace split) of each character of `text`; `None` for whitespace.
/// Also returns the number of words.
fn char_words(text: &str) -> (Vec<Option<usize>>, usize) {
    let mut out = Vec::new();
    let mut words = 0usize;
    let mut in_word = false;
    for c in text.chars() {
        if c.is_whitespace() {
            in_word = false;
            out.push(None);
        } else {
            if !in_word {
                words += 1;
            }
            in_word = true;
            out.push(Some(words - 1));
        }
    }
    (out, words)
}

/// Non-whitespace characters of `text` (lower-cased), each with the index of its word.
fn word_chars(text: &str) -> (Vec<char>, Vec<usize>, usize) {
    let (of_char, count) = char_words(text);
    let mut chars = Vec::new();
    let mut words = Vec::new();
    for (c, word) in text.chars().zip(of_char) {
        if let Some(word) = word {
            for lower in c.to_lowercase() {
                chars.push(lower);
                words.push(word);
            }
        }
    }
    (chars, words, count)
}

fn non_whitespace_lower(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// The word index (in `text`'s whitespace split) of each token of `tokens`; `None` for a token
/// after the last character (trailing whitespace, special tokens at the end). Also returns the
/// number of words.
pub fn token_words(
    tokenizer: &Tokenizer,
    tokens: &[u32],
    text: &str,
) -> Result<(Vec<Option<usize>>, usize)> {
    let (chars, word_of_char, words) = word_chars(text);
    let mut done = 0usize;
    let mut out = Vec::with_capacity(tokens.len());
    for i in 0..tokens.len() {
        let prefix = non_whitespace_lower(&tokenizer.decode(&tokens[..=i])?);
        let common = prefix
            .iter()
            .zip(&chars)
            .take_while(|(a, b)| a == b)
            .count();
        out.push(word_of_char.get(done).copied());
        done = done.max(common);
    }
    Ok((out, words))
}

/// Encodes `text` (no special tokens) and maps each token to its word through the tokenizer's
/// character offsets, which survive normalisation (lower-casing, accents, NFC): a token belongs
/// to the word of the first non-whitespace character of its span, or of the next one after it.
pub fn encode_with_words(
    tokenizer: &Tokenizer,
    text: &str,
) -> Result<(Vec<u32>, Vec<Option<usize>>)> {
    let encoding = tokenizer
        .inner
        .encode_char_offsets(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let (word_of_char, _) = char_words(text);
    let words = encoding
        .get_offsets()
        .iter()
        .map(|&(start, end)| {
            let start = start.min(word_of_char.len());
            let end = end.clamp(start, word_of_char.len());
            word_of_char[start..end]
                .iter()
                .chain(&word_of_char[end..])
                .find_map(|w| *w)
        })
        .collect();
    Ok((encoding.get_ids().to_vec(), words))
}

/// A weak hypothesis carried over to the strong tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgedTarget {
    /// The hypothesis text (the weak tokens decoded, special tokens dropped).
    pub text: String,
    /// Strong token ids of the text, then the strong end-of-sequence token when the weak model
    /// ended its hypothesis.
    pub tokens: Vec<u32>,
    /// The unit (word, or end-of-sequence, or a token outside every word) of each strong token.
    pub unit_of: Vec<usize>,
    /// Log-probability of each unit under the weak model (sum over its weak tokens; <= 0).
    pub unit_scores: Vec<f32>,
}

/// Carries a weak hypothesis (its tokens and their log-probabilities) over to the strong
/// tokenizer. `weak_eos` are the weak model's end-of-sequence ids; `strong_eos` is appended when
/// the hypothesis ended with one of them.
pub fn bridge(
    weak: &Tokenizer,
    weak_tokens: &[u32],
    weak_logprobs: &[f32],
    weak_eos: &[u32],
    strong: &Tokenizer,
    strong_eos: Option<u32>,
) -> Result<BridgedTarget> {
    let (body, eos_logprob) = match weak_tokens.last() {
        Some(last) if weak_eos.contains(last) => (
            &weak_tokens[..weak_tokens.len() - 1],
            Some(weak_logprobs[weak_tokens.len() - 1]),
        ),
        _ => (weak_tokens, None),
    };
    let text = weak.decode(body)?;
    let (weak_words, words) = token_words(weak, body, &text)?;
    let mut unit_scores = vec![0f32; words];
    for (word, &lp) in weak_words.iter().zip(weak_logprobs) {
        if let Some(w) = word {
            unit_scores[*w] += lp;
        }
    }
    // As a continuation: one space, then the text (what `Seq2Seq::target_ids` builds), whether
    // or not the weak tokenizer's decoder kept a leading space.
    let continuation = format!(" {}", text.trim());
    let (mut tokens, strong_words) = encode_with_words(strong, &continuation)?;
    let mut unit_of = Vec::with_capacity(tokens.len() + 1);
    for word in strong_words {
        match word {
            Some(w) => unit_of.push(w),
            None => {
                // Outside every word: a unit of its own that the weak model is taken to be sure of.
                unit_of.push(unit_scores.len());
                unit_scores.push(0.0);
            }
        }
    }
    if let (Some(lp), Some(eos)) = (eos_logprob, strong_eos) {
        tokens.push(eos);
        unit_of.push(unit_scores.len());
        unit_scores.push(lp);
    }
    if tokens.is_empty() {
        // Nothing to learn from but the end of the sequence.
        tokens.extend(strong_eos);
        unit_of.extend(strong_eos.map(|_| unit_scores.len()));
        unit_scores.extend(strong_eos.map(|_| 0.0));
    }
    Ok(BridgedTarget {
        text: text.trim().to_string(),
        tokens,
        unit_of,
        unit_scores,
    })
}

/// Estimated log-probability log p^_t of each strong token of `target`, given the strong model's
/// top probability `max_prob[t]` at each position (only read for [`Share::Confidence`]).
pub fn token_logprobs(target: &BridgedTarget, max_prob: &[f32], share: Share) -> Vec<f32> {
    let mut out = vec![0f32; target.tokens.len()];
    for (unit, &score) in target.unit_scores.iter().enumerate() {
        let members: Vec<usize> = (0..target.tokens.len())
            .filter(|&t| target.unit_of[t] == unit)
            .collect();
        if members.is_empty() {
            continue;
        }
        let weights: Vec<f64> = match share {
            Share::Uniform => vec![1.0 / members.len() as f64; members.len()],
            Share::Confidence => {
                let logits: Vec<f64> = members.iter().map(|&t| -(max_prob[t] as f64)).collect();
                let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                let total: f64 = exps.iter().sum();
                exps.iter().map(|e| e / total).collect()
            }
        };
        for (&t, w) in members.iter().zip(weights) {
            out[t] = (score as f64 * w) as f32;
        }
    }
    out
}

/// Writes the soft target of one position into `out` (length V): the label token gets exactly
/// `q_label`, the rest 1 - q_label is spread as `spread` says over the other tokens, using the
/// strong model's probabilities `strong` (length V) for [`Spread::Strong`].
pub fn soft_target_row(
    label: usize,
    q_label: f32,
    strong: &[f32],
    spread: Spread,
    out: &mut [f32],
) {
    let v = out.len();
    let q = q_label.clamp(0.0, 1.0);
    match spread {
        Spread::OneHot => {
            out.fill(0.0);
            out[label] = 1.0;
            return;
        }
        Spread::Strong => {
            let others: f64 = strong
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != label)
                .map(|(_, &p)| p.max(0.0) as f64)
                .sum();
            if others > 1e-12 {
                let scale = (1.0 - q as f64) / others;
                for (o, &p) in out.iter_mut().zip(strong) {
                    *o = (p.max(0.0) as f64 * scale) as f32;
                }
                out[label] = q;
                return;
            }
            // The strong model puts (almost) all its mass on the label: spread uniformly instead.
        }
        Spread::Uniform => {}
    }
    let each = if v > 1 {
        (1.0 - q) / (v - 1) as f32
    } else {
        0.0
    };
    out.fill(each);
    out[label] = if v > 1 { q } else { 1.0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_characters() {
        let (chars, words, n) = word_chars("  {\"a\": \"B c\"} ");
        assert_eq!(n, 3);
        assert_eq!(chars.iter().collect::<String>(), "{\"a\":\"bc\"}");
        assert_eq!(words, vec![0, 0, 0, 0, 0, 1, 1, 2, 2, 2]);
    }

    #[test]
    fn shares_sum_to_the_word_score() {
        let target = BridgedTarget {
            text: "ab c".into(),
            tokens: vec![1, 2, 3, 9],
            unit_of: vec![0, 0, 1, 2],
            unit_scores: vec![-1.0, -0.5, -0.1],
        };
        let max_prob = [0.9, 0.1, 0.5, 0.7];
        let lp = token_logprobs(&target, &max_prob, Share::Confidence);
        assert!((lp[0] + lp[1] + 1.0).abs() < 1e-6);
        // the less confident position takes the larger share of the (negative) score
        let w0 = (-0.9f64).exp() / ((-0.9f64).exp() + (-0.1f64).exp());
        assert!((lp[0] as f64 + w0).abs() < 1e-6);
        assert!(lp[1] < lp[0]);
        assert_eq!(lp[2], -0.5);
        assert_eq!(lp[3], -0.1);
        let uniform = token_logprobs(&target, &max_prob, Share::Uniform);
        assert_eq!(&uniform[..2], &[-0.5, -0.5]);
    }

    #[test]
    fn soft_rows_sum_to_one_and_keep_the_label_probability() {
        let strong = [0.1f32, 0.6, 0.3, 0.0];
        for spread in [Spread::Strong, Spread::Uniform] {
            let mut out = [0f32; 4];
            soft_target_row(2, 0.25, &strong, spread, &mut out);
            assert_eq!(out[2], 0.25);
            let total: f32 = out.iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "{spread:?}: {out:?}");
        }
        let mut out = [0f32; 4];
        soft_target_row(2, 0.25, &strong, Spread::Strong, &mut out);
        // the rest (0.75) in proportion to 0.1 : 0.6 : 0.0
        assert!((out[0] - 0.75 / 7.0).abs() < 1e-6 && (out[1] - 0.75 * 6.0 / 7.0).abs() < 1e-6);
        assert_eq!(out[3], 0.0);
        // the strong model sure of the label: uniform fallback
        let sure = [0.0f32, 0.0, 1.0, 0.0];
        soft_target_row(2, 0.4, &sure, Spread::Strong, &mut out);
        assert_eq!(out, [0.2, 0.2, 0.4, 0.2]);
        soft_target_row(1, 0.4, &sure, Spread::OneHot, &mut out);
        assert_eq!(out, [0.0, 1.0, 0.0, 0.0]);
    }
}
