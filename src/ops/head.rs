//! The next tokens a decoding step keeps: for each row of hidden states, the `keep` most likely
//! tokens under a language-model head with their log-probabilities.
//!
//! The head's product is a large part of a step (Qwen2.5-0.5B: 151,936 x 896, a quarter of the
//! model's weights), yet only a few tokens per row are kept. [`screened_top`] finds them with
//! the int8 product of [`super::int8`] (integer dot products, four times f32's rate with VNNI),
//! then recomputes the logits of the best `candidates` of each row from the f32 weights with the
//! same f32 product as the unscreened path ([`super::skinny`]). The kept tokens and their logits
//! are therefore f32's; the log-normaliser takes the f32 logits of the candidates and the int8
//! estimates of the rest of the vocabulary (tokens outside the candidates carry little of the
//! probability mass, and their int8 errors are a few hundredths of a logit).
//!
//! A screen can miss a token only when one outside the candidates is underestimated by more
//! than the gap to the kept ones. Each row checks this with the largest int8 error seen on its
//! candidates and widens its candidates until no token outside comes near (`screen_row`); a row
//! whose candidates would pass [`MAX_CANDIDATES`] (a flat distribution) is computed whole.

use super::int8::{self, Int8Rows, Int8Weight};
use rayon::prelude::*;

/// Slack added to twice the largest int8 error seen on a row's candidates (in logits).
pub const MARGIN: f32 = 0.25;

/// What a screened step did, for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScreenStats {
    pub rows: usize,
    /// Rows computed whole in f32 (too many candidates).
    pub recomputed: usize,
}

/// Rows screened and rows computed whole since the process started (for benchmarks).
static SCREENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static WHOLE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// (rows screened, rows computed whole) since the process started.
pub fn counts() -> (usize, usize) {
    use std::sync::atomic::Ordering::Relaxed;
    (SCREENED.load(Relaxed), WHOLE.load(Relaxed))
}

/// The `keep` largest entries of a logit row as (token, log-probability), best first.
pub fn top_logprobs(row: &[f32], keep: usize) -> Vec<(u32, f32)> {
    let log_norm = super::simd::log_sum_exp(row) as f64;
    top_entries(row, keep)
        .into_iter()
        .map(|(v, x)| (v, (x as f64 - log_norm) as f32))
        .collect()
}

/// The `keep` largest entries of a row as (index, value), largest first (ties: lower index
/// first).
fn top_entries(row: &[f32], keep: usize) -> Vec<(u32, f32)> {
    let keep = keep.min(row.len()).max(1);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(keep + 1);
    let offer = |top: &mut Vec<(u32, f32)>, v: usize, x: f32| {
        if top.len() < keep || x > top[top.len() - 1].1 {
            let at = top.partition_point(|&(_, y)| y >= x);
            top.insert(at, (v as u32, x));
            top.truncate(keep);
        }
    };
    for (v, &x) in row.iter().enumerate().take(keep) {
        offer(&mut top, v, x);
    }
    // Once `keep` entries are held, a run of values with none above the last one changes
    // nothing: such runs (nearly all of a vocabulary) are checked a vector at a time.
    const RUN: usize = 32;
    let mut v = keep;
    while v < row.len() {
        let run = &row[v..(v + RUN).min(row.len())];
        let last = top[top.len() - 1].1;
        if run.iter().fold(false, |any, &x| any | (x > last)) {
            for (i, &x) in run.iter().enumerate() {
                offer(&mut top, v + i, x);
            }
        }
        v += run.len();
    }
    top
}

/// Candidates screened per row for `keep` kept tokens.
pub fn candidates(keep: usize) -> usize {
    (4 * keep).max(64)
}

/// For each of the `rows` rows of `x` [rows, k]: the `keep` most likely tokens of the head `w`
/// [n, k] (f32, row-major) with their log-probabilities, best first, screened with `screen`
/// (the same weights in int8). `cap` applies Gemma's soft-capping c tanh(logit / c) to the
/// logits before the normaliser.
pub fn screened_top(
    x: &[f32],
    rows: usize,
    (w, screen): (&[f32], &Int8Weight),
    keep: usize,
    cap: Option<f32>,
) -> (Vec<Vec<(u32, f32)>>, ScreenStats) {
    let (n, k) = screen.dims();
    assert_eq!(w.len(), n * k, "screened head: weights of another shape");
    assert_eq!(x.len(), rows * k, "screened head: input of another width");
    // The int8 logits ([rows, V]: 24 MB for 40 rows of Qwen2.5's head) go into this thread's
    // buffer of the last step: fresh pages for them cost ~5% of a decoding step.
    let buffer = APPROX.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let mut approx = int8::matmul_into(
        int8::Kernel::detected(),
        &Int8Rows::quantize(x, rows, k),
        screen,
        None,
        int8::Epilogue::None,
        buffer,
    );
    let wanted = candidates(keep).min(n);
    let results: Vec<(Vec<(u32, f32)>, bool)> = approx
        .par_chunks_mut(n)
        .zip(x.par_chunks(k))
        .map(|(row, xr)| screen_row(row, xr, w, (k, n), (keep, wanted), cap))
        .collect();
    let stats = ScreenStats {
        rows,
        recomputed: results.iter().filter(|r| r.1).count(),
    };
    APPROX.with(|b| *b.borrow_mut() = approx);
    SCREENED.fetch_add(stats.rows, std::sync::atomic::Ordering::Relaxed);
    WHOLE.fetch_add(stats.recomputed, std::sync::atomic::Ordering::Relaxed);
    (results.into_iter().map(|r| r.0).collect(), stats)
}

thread_local! {
    /// The int8 logits' buffer of this thread's last [`screened_top`].
    static APPROX: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most candidates a row may gather before it is recomputed whole.
pub const MAX_CANDIDATES: usize = 4096;

/// One row: `row` holds the int8 logits on entry and the logits the normaliser uses on exit.
/// Returns the kept tokens and whether the row was recomputed whole.
///
/// The candidates start as the `wanted` best estimates. With `err` the largest int8 error seen
/// on them and `last` the `keep`-th best f32 logit among them, a token outside can beat `last`
/// only if its estimate is at least `last - 2 err - MARGIN`; every such token joins the
/// candidates (f32 logits computed), and the check repeats until no token outside reaches the
/// threshold, or the candidates pass [`MAX_CANDIDATES`] (then the row is computed whole).
fn screen_row(
    row: &mut [f32],
    x: &[f32],
    w: &[f32],
    (k, n): (usize, usize),
    (keep, wanted): (usize, usize),
    cap: Option<f32>,
) -> (Vec<(u32, f32)>, bool) {
    let mut ids: Vec<u32> = top_entries(row, wanted).into_iter().map(|c| c.0).collect();
    let mut member = vec![false; n];
    for &v in &ids {
        member[v as usize] = true;
    }
    let mut exact: Vec<f32> = Vec::new();
    let mut whole = false;
    loop {
        exact.extend(f32_logits(x, w, k, &ids[exact.len()..]));
        let err = ids
            .iter()
            .zip(&exact)
            .map(|(&v, e)| (row[v as usize] - e).abs())
            .fold(0f32, f32::max);
        let mut best = exact.clone();
        best.sort_by(|a, b| b.total_cmp(a));
        let last = best[keep.min(best.len()).max(1) - 1];
        let threshold = last - 2.0 * err - MARGIN;
        let before = ids.len();
        for (v, &estimate) in row.iter().enumerate() {
            if estimate >= threshold && !member[v] {
                member[v] = true;
                ids.push(v as u32);
            }
        }
        if ids.len() == before {
            break;
        }
        if ids.len() > MAX_CANDIDATES {
            whole = true;
            break;
        }
    }
    if whole {
        row.fill(0.0);
        super::skinny::accumulate(x, w, (1, k, n), row);
    } else {
        for (&v, &e) in ids.iter().zip(&exact) {
            row[v as usize] = e;
        }
    }
    if let Some(c) = cap {
        for v in row.iter_mut() {
            *v = c * (*v / c).tanh();
        }
    }
    (top_logprobs(row, keep), whole)
}

/// The f32 logits of the tokens `ids` (their rows of W gathered side by side, through the same
/// few-rows product as an unscreened head).
fn f32_logits(x: &[f32], w: &[f32], k: usize, ids: &[u32]) -> Vec<f32> {
    let mut gathered = Vec::with_capacity(ids.len() * k);
    for &v in ids {
        gathered.extend_from_slice(&w[v as usize * k..(v as usize + 1) * k]);
    }
    let mut out = vec![0f32; ids.len()];
    if !ids.is_empty() {
        super::skinny::accumulate(x, &gathered, (1, k, ids.len()), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::testing::random_f32 as random;

    /// The unscreened reference: every logit in f32 by the same product, then the top entries.
    fn reference(
        x: &[f32],
        rows: usize,
        w: &[f32],
        (k, n): (usize, usize),
        keep: usize,
        cap: Option<f32>,
    ) -> Vec<Vec<(u32, f32)>> {
        (0..rows)
            .map(|r| {
                let mut row = vec![0f32; n];
                super::super::skinny::accumulate(&x[r * k..(r + 1) * k], w, (1, k, n), &mut row);
                if let Some(c) = cap {
                    row.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
                }
                top_logprobs(&row, keep)
            })
            .collect()
    }

    #[test]
    fn screened_tokens_and_log_probabilities_match_the_f32_head() {
        let (rows, k, n, keep) = (5, 96, 3000, 10);
        let w = random(n * k, 1, 0.2);
        let x = random(rows * k, 2, 1.5);
        let screen = Int8Weight::pack(&w, n, k);
        for cap in [None, Some(3.0)] {
            let (ours, stats) = screened_top(&x, rows, (&w, &screen), keep, cap);
            let want = reference(&x, rows, &w, (k, n), keep, cap);
            assert_eq!(stats.rows, rows);
            for (a, b) in ours.iter().zip(&want) {
                let tokens: Vec<u32> = a.iter().map(|t| t.0).collect();
                let expected: Vec<u32> = b.iter().map(|t| t.0).collect();
                assert_eq!(tokens, expected, "cap {cap:?}");
                for (p, q) in a.iter().zip(b) {
                    // Only the normaliser's tail is int8: log-probabilities within 1e-3.
                    assert!((p.1 - q.1).abs() < 1e-3, "{} vs {}", p.1, q.1);
                }
            }
        }
    }

    #[test]
    fn a_flat_row_widens_its_candidates_or_is_computed_whole() {
        // Logits nearly equal: the first candidates cannot separate the kept tokens from the
        // rest, so the candidates widen to every token within reach (a small vocabulary) or the
        // row is computed whole (past MAX_CANDIDATES); either way the result is f32's.
        let (k, keep) = (64, 4);
        for (n, whole) in [(500, 0), (MAX_CANDIDATES + 500, 1)] {
            let mut w = vec![0.01f32; n * k];
            for (i, v) in w.iter_mut().enumerate() {
                *v += ((i * 7919) % 13) as f32 * 1e-4;
            }
            let x = vec![1.0f32; k];
            let screen = Int8Weight::pack(&w, n, k);
            let (ours, stats) = screened_top(&x, 1, (&w, &screen), keep, None);
            assert_eq!(stats.recomputed, whole, "vocabulary {n}");
            let want = reference(&x, 1, &w, (k, n), keep, None);
            let tokens = |r: &[(u32, f32)]| r.iter().map(|t| t.0).collect::<Vec<_>>();
            assert_eq!(tokens(&ours[0]), tokens(&want[0]), "vocabulary {n}");
            for (p, q) in ours[0].iter().zip(&want[0]) {
                assert!(
                    (p.1 - q.1).abs() < 1e-5,
                    "vocabulary {n}: {} vs {}",
                    p.1,
                    q.1
                );
            }
        }
    }

    #[test]
    fn top_entries_equal_a_stable_sort_on_rows_with_many_ties() {
        for (seed, n, keep) in [
            (1u64, 5000usize, 64usize),
            (2, 1000, 7),
            (3, 40, 64),
            (4, 33, 1),
        ] {
            // Values on a coarse grid: many ties.
            let row: Vec<f32> = random(n, seed, 1.0)
                .iter()
                .map(|v| (v * 20.0).round())
                .collect();
            let mut want: Vec<(u32, f32)> = row
                .iter()
                .enumerate()
                .map(|(i, &x)| (i as u32, x))
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(keep.min(n));
            assert_eq!(top_entries(&row, keep), want, "n {n}, keep {keep}");
        }
    }

    #[test]
    fn top_entries_keep_the_largest_first_and_lower_index_on_ties() {
        let row = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        assert_eq!(top_entries(&row, 3), vec![(1, 2.0), (3, 2.0), (4, 1.0)]);
        assert_eq!(top_entries(&row, 10).len(), 5);
        let lp = top_logprobs(&[0.0, 0.0], 1);
        assert!((lp[0].1 - (0.5f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn a_candidate_logit_is_bit_identical_to_the_full_products() {
        // The row alone against its gathered candidates, and every row of a 40-row product
        // (a step with 40 live beams): the same additions in the same order.
        let (k, n, rows) = (896, 1000, 40);
        let w = random(n * k, 3, 0.5);
        let x = random(rows * k, 4, 0.5);
        let mut gathered = Vec::new();
        let picks = [3usize, 17, 999, 500, 2, 64, 65, 66];
        for &p in &picks {
            gathered.extend_from_slice(&w[p * k..(p + 1) * k]);
        }
        use super::super::skinny::{accumulate_with, Kernel};
        for kernel in [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512] {
            if !kernel.available() {
                continue;
            }
            let mut full = vec![0f32; rows * n];
            accumulate_with(kernel, &x, &w, (rows, k, n), &mut full);
            for r in 0..rows {
                let mut e = vec![0f32; picks.len()];
                let xr = &x[r * k..(r + 1) * k];
                accumulate_with(kernel, xr, &gathered, (1, k, picks.len()), &mut e);
                for (i, &p) in picks.iter().enumerate() {
                    let (a, b) = (e[i].to_bits(), full[r * n + p].to_bits());
                    assert_eq!(a, b, "{kernel:?}: row {r}, column {p}");
                }
            }
        }
    }
}
