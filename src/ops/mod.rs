//! Custom operations with their own backward pass.

pub mod attention;
pub mod fused;
pub mod linear;
pub mod simd;
