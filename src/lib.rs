//! ws2s: weak-to-strong and Bayesian WeakS-to-Strong experiments on language models.
//!
//! The library is organised by job: `data` loads and splits tasks, `eval` holds the metrics,
//! `experiment` the configuration of a run. The `ws2s` binary is a thin CLI over these modules.

pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod hash;
pub mod home;
pub mod io;
pub mod losses;
pub mod models;
pub mod ops;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod seq2seq;
pub mod supervision;
pub mod train;

pub use error::InputError;
