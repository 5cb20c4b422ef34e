//! Dawid-Skene EM (Dawid & Skene 1979): weak-model reliability learned from agreement, without
//! ground truth (METHOD.md 3.4). Each model j has a confusion matrix pi_j[k][l] = P(model says l |
//! true class k); the classes have a prior rho. E-step: T_ik proportional to rho_k prod_j
//! pi_j[k][L_ij]; M-step: rho and pi_j from T (with add-one smoothing). Initialised from the
//! (unweighted) vote. The learned accuracy of model j is sum_k rho_k pi_j[k][k].

#[derive(Debug, Clone, PartialEq)]
pub struct DawidSkene {
    /// Posterior class probabilities of each item: the joint label.
    pub posteriors: Vec<Vec<f64>>,
    /// Per model: confusion matrix [true class][given label].
    pub confusion: Vec<Vec<Vec<f64>>>,
    pub prior: Vec<f64>,
    /// Per model: estimated accuracy.
    pub accuracy: Vec<f64>,
    pub iterations: usize,
}

/// Runs EM on hard labels `labels[j][i]` in 0..k of J models on N items.
pub fn fit(labels: &[Vec<usize>], k: usize, max_iterations: usize) -> DawidSkene {
    let j_models = labels.len();
    let n = labels.first().map_or(0, Vec::len);
    let mut posteriors: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut votes = vec![0.0; k];
            for model in labels {
                votes[model[i]] += 1.0;
            }
            votes.iter().map(|v| v / j_models as f64).collect()
        })
        .collect();
    let mut prior = vec![1.0 / k as f64; k];
    let mut confusion = vec![vec![vec![1.0 / k as f64; k]; k]; j_models];
    let mut iterations = 0;
    for _ in 0..max_iterations {
        iterations += 1;
        // M-step
        for c in 0..k {
            prior[c] = (posteriors.iter().map(|t| t[c]).sum::<f64>() + 1.0) / (n as f64 + k as f64);
        }
        for (model, matrix) in labels.iter().zip(confusion.iter_mut()) {
            for (true_class, row) in matrix.iter_mut().enumerate() {
                let mut counts = vec![1.0; k];
                for (i, &given) in model.iter().enumerate() {
                    counts[given] += posteriors[i][true_class];
                }
                let total: f64 = counts.iter().sum();
                for (cell, count) in row.iter_mut().zip(counts) {
                    *cell = count / total;
                }
            }
        }
        // E-step
        let mut change = 0.0f64;
        for (i, posterior) in posteriors.iter_mut().enumerate() {
            let mut log_p: Vec<f64> = (0..k)
                .map(|c| {
                    prior[c].ln()
                        + labels
                            .iter()
                            .zip(&confusion)
                            .map(|(m, pi)| pi[c][m[i]].ln())
                            .sum::<f64>()
                })
                .collect();
            let max = log_p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            log_p.iter_mut().for_each(|v| *v = (*v - max).exp());
            let total: f64 = log_p.iter().sum();
            for (old, new) in posterior.iter_mut().zip(&log_p) {
                let new = new / total;
                change = change.max((new - *old).abs());
                *old = new;
            }
        }
        if change < 1e-8 {
            break;
        }
    }
    let accuracy = confusion
        .iter()
        .map(|pi| (0..k).map(|c| prior[c] * pi[c][c]).sum())
        .collect();
    DawidSkene {
        posteriors,
        confusion,
        prior,
        accuracy,
        iterations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn recovers_annotator_accuracies_without_ground_truth() {
        let mut rng = Rng::new(42);
        let truth: Vec<usize> = (0..4000)
            .map(|_| usize::from(rng.next_f64() < 0.4))
            .collect();
        let accuracies = [0.9, 0.8, 0.7, 0.6, 0.55];
        let labels: Vec<Vec<usize>> = accuracies
            .iter()
            .map(|&a| {
                truth
                    .iter()
                    .map(|&t| if rng.next_f64() < a { t } else { 1 - t })
                    .collect()
            })
            .collect();
        let result = fit(&labels, 2, 500);
        for (estimated, true_accuracy) in result.accuracy.iter().zip(accuracies) {
            assert!(
                (estimated - true_accuracy).abs() < 0.03,
                "{estimated} vs {true_accuracy}"
            );
        }
        assert!((result.prior[1] - 0.4).abs() < 0.03);
        let correct = result
            .posteriors
            .iter()
            .zip(&truth)
            .filter(|(p, &t)| (p[1] > 0.5) == (t == 1))
            .count();
        // better than the best single annotator
        assert!(correct as f64 / 4000.0 > 0.905, "{correct}");
    }
}
