//! Errors every module shares: a config problem that names its field, and
//! error text for people (an error and its causes on one line).
//!
//! This module imports nothing from the crate, so every subsystem can use
//! [`ConfigError`] for its own config section without a cycle through
//! `config.rs`.

/// A config problem: which field, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct ConfigError {
    /// The path of the field as the operator wrote it (`services[0].listen[1]`,
    /// `health.timeout`) or the flag (`--cgroup`).
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// "a: b: c", skipping a cause whose text the message already contains.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
