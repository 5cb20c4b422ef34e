//! The training log: every optimiser update (AdamW) and every iteration of a probe's final
//! solve (L-BFGS) as one record. Training code calls [`record`]; whoever runs a stage wraps it
//! in [`capture`] and receives the records of that stage alone (the sink is per thread, so the
//! cross-validation folds solved on other threads are not logged: only the refit whose model is
//! kept).

use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// One step of a training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// 1-based epoch (fine-tuning) or continuation stage (a staged probe objective; 1 otherwise).
    pub epoch: usize,
    /// 1-based optimiser update or L-BFGS iteration, counted over the whole training.
    pub step: usize,
    /// Mean training loss of the update's micro-batches (fine-tuning) or the regularised
    /// objective after the iteration (probes).
    pub loss: f64,
    /// The learning rate of the update (none for L-BFGS, whose steps come from a line search).
    pub lr: Option<f64>,
    /// The global gradient norm before clipping (fine-tuning) or the largest absolute gradient
    /// entry (probes).
    pub grad_norm: f64,
    /// Seconds since the training started.
    pub seconds: f64,
}

/// One line of a run's `train_log.jsonl`: a step and the training it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The run's stage: weak, ceiling, student, gen-weak-train, gen-student, gen-dpo.
    pub stage: String,
    pub model: String,
    pub seed: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    #[serde(flatten)]
    pub step: Step,
}

thread_local! {
    static SINK: RefCell<Option<Vec<Step>>> = const { RefCell::new(None) };
}

/// Adds a step to the log of the stage running on this thread (nothing when none captures).
pub fn record(step: Step) {
    SINK.with(|sink| {
        if let Some(steps) = sink.borrow_mut().as_mut() {
            steps.push(step);
        }
    });
}

/// Runs `f` and returns its result with the steps it recorded on this thread. Nested captures
/// each receive their own steps (the outer one resumes afterwards).
pub fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<Step>) {
    let outer = SINK.with(|sink| sink.borrow_mut().replace(Vec::new()));
    let value = f();
    let steps = SINK.with(|sink| std::mem::replace(&mut *sink.borrow_mut(), outer));
    (value, steps.unwrap_or_default())
}

/// Reads a log written by [`to_jsonl`]; a missing or unreadable file is an empty log (the log
/// is a report, never an input to a computation).
pub fn read_jsonl(path: &std::path::Path) -> Vec<Step> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .map(serde_json::from_str)
                .collect::<Result<Vec<Step>, _>>()
                .ok()
        })
        .unwrap_or_default()
}

pub fn to_jsonl(steps: &[Step]) -> String {
    steps
        .iter()
        .filter_map(|s| serde_json::to_string(s).ok())
        .map(|line| line + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(n: usize) -> Step {
        Step {
            epoch: 1,
            step: n,
            loss: 1.0 / n as f64,
            lr: None,
            grad_norm: 0.5,
            seconds: 0.0,
        }
    }

    #[test]
    fn captures_are_per_stage_and_nest() {
        record(step(99)); // no capture: dropped
        let (((), inner), outer) = capture(|| {
            record(step(1));
            let inner = capture(|| record(step(2)));
            record(step(3));
            inner
        });
        assert_eq!(inner, vec![step(2)]);
        assert_eq!(outer, vec![step(1), step(3)]);
        // Other threads do not write into this thread's capture.
        let ((), steps) = capture(|| {
            std::thread::spawn(|| record(step(7))).join().unwrap();
        });
        assert!(steps.is_empty());
    }

    #[test]
    fn jsonl_round_trip_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let steps = vec![step(1), step(2)];
        std::fs::write(&path, to_jsonl(&steps)).unwrap();
        assert_eq!(read_jsonl(&path), steps);
        assert!(read_jsonl(&dir.path().join("none.jsonl")).is_empty());
        std::fs::write(&path, "{not json\n").unwrap();
        assert!(read_jsonl(&path).is_empty());
    }
}
