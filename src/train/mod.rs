//! The training engine: AdamW, learning-rate schedules, the training loop with length-bucketed
//! batches, gradient accumulation and clipping, evaluation, early stopping, atomic checkpoints
//! with resume, and NaN/Inf detection.

pub mod checkpoint;
pub mod convex;
pub mod lbfgs;
pub mod log;
pub mod objectives;
pub mod optimizer;
pub mod probe;
pub mod schedule;
pub mod trainer;
