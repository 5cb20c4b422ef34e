//! Learning-rate schedules: constant, linear decay or cosine decay to zero, each after a linear
//! warm-up from 0 over the first `warmup_steps`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The learning rate of update number `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            kind: ScheduleKind::Linear,
            base_lr: 1.0,
            warmup_steps: 2,
            total_steps: 6,
        };
        let lrs: Vec<f64> = (0..6).map(|t| s.lr(t)).collect();
        assert_eq!(lrs, vec![0.5, 1.0, 1.0, 0.75, 0.5, 0.25]);
        let c = Schedule {
            kind: ScheduleKind::Cosine,
            base_lr: 2.0,
            warmup_steps: 0,
            total_steps: 4,
        };
        assert!((c.lr(0) - 2.0).abs() < 1e-12);
        assert!((c.lr(2) - 1.0).abs() < 1e-12);
        let k = Schedule {
            kind: ScheduleKind::Constant,
            base_lr: 3.0,
            warmup_steps: 1,
            total_steps: 10,
        };
        assert_eq!((k.lr(0), k.lr(9)), (3.0, 3.0));
    }
}
