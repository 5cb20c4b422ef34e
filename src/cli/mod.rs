//! The `ws2s` binary's modules: argument definitions and the commands' own code.

pub(crate) mod args;
pub(crate) mod commands;
