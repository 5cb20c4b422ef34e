//! Reports: plots of a run as SVG (written directly) and PNG (the same SVG rasterised).

pub mod classify;
pub mod generate;
pub mod loss;
pub mod parquet;
pub mod plot;
