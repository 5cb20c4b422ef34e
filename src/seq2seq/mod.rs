//! The pieces of generation for weak-to-strong (METHOD.md sections 4 and 5), below the runs of
//! `experiment::generate`: decoders as sequence-to-sequence models (`model.rs`), the word bridge between tokenizers with token-level soft labels, joint decoding and
//! agreement weights, and the training tasks (cross-entropy, soft KL, token EDL, conservative DPO).

pub mod bridge;
pub mod joint;
pub mod model;
pub mod tasks;
