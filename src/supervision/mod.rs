//! Weak supervision: combining the labels of several weak models (joint labels, majority vote,
//! reliability learned from their agreement).

pub mod dawid_skene;

/// The weighted average of soft labels: y = sum_j w_j y_j (weights normalised to sum 1).
pub fn weighted_average(labels: &[Vec<Vec<f64>>], weights: &[f64]) -> Vec<Vec<f64>> {
    let total: f64 = weights.iter().sum();
    let n = labels.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let k = labels[0][i].len();
            (0..k)
                .map(|c| {
                    labels
                        .iter()
                        .zip(weights)
                        .map(|(l, w)| w * l[i][c])
                        .sum::<f64>()
                        / total
                })
                .collect()
        })
        .collect()
}

/// Majority vote of the weak models' hard labels (weighted by `weights`), as one-hot rows; ties
/// go to the class with the larger weighted average probability.
pub fn majority_vote(labels: &[Vec<Vec<f64>>], weights: &[f64]) -> Vec<Vec<f64>> {
    let average = weighted_average(labels, weights);
    average
        .iter()
        .enumerate()
        .map(|(i, avg)| {
            let k = avg.len();
            let mut votes = vec![0.0; k];
            for (l, w) in labels.iter().zip(weights) {
                votes[crate::eval::classify::argmax(&l[i])] += w;
            }
            let best = (0..k)
                .max_by(|&a, &b| {
                    votes[a]
                        .total_cmp(&votes[b])
                        .then(avg[a].total_cmp(&avg[b]))
                })
                .unwrap_or(0);
            (0..k).map(|c| if c == best { 1.0 } else { 0.0 }).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_and_vote() {
        let labels = vec![
            vec![vec![0.9, 0.1], vec![0.4, 0.6]],
            vec![vec![0.2, 0.8], vec![0.3, 0.7]],
            vec![vec![0.6, 0.4], vec![0.45, 0.55]],
        ];
        let avg = weighted_average(&labels, &[1.0, 1.0, 2.0]);
        assert!((avg[0][0] - (0.9 + 0.2 + 1.2) / 4.0).abs() < 1e-12);
        let vote = majority_vote(&labels, &[1.0, 1.0, 1.0]);
        assert_eq!(vote, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        // a tie of votes (weights 1 and 1) is broken by the average probability
        let tie = majority_vote(&labels[..2], &[1.0, 1.0]);
        assert_eq!(tie[0], vec![1.0, 0.0]);
    }
}
