//! Metrics (METHOD.md section 2): classification, SLURP slot filling, PGR and bootstrap intervals.

pub mod classify;
pub mod paired;
pub mod slurp;
pub mod summary;
