//! Custom operations with their own backward pass.

pub mod frozen_matmul;
pub mod fused;
