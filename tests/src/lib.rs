//! Test harness for nllb.

pub mod fake_apiserver;
