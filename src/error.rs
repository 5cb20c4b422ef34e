//! Errors about user input: they say which file, which line, and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};

/// A problem with a file the user gave us. `line` is 1-based; `None` when the problem concerns the
/// whole file (empty, unreadable, inconsistent across lines).
#[derive(Debug, Clone, PartialEq)]
pub struct InputError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl InputError {
    pub fn at_line(path: &Path, line: usize, message: impl Into<String>) -> Self {
        InputError {
            path: path.to_path_buf(),
            line: Some(line),
            message: message.into(),
        }
    }

    pub fn in_file(path: &Path, message: impl Into<String>) -> Self {
        InputError {
            path: path.to_path_buf(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for InputError {}
