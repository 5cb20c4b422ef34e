//! Experiments: their configuration (and, as the pipeline grows, its stages and their cache).

pub mod config;
pub mod generation;
pub mod learner;
pub mod pipeline;
pub mod precision_study;
pub mod preflight;
pub mod stages;
pub mod study;
pub mod sweep;
