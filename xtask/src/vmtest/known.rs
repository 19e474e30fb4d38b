//! Known failures: `xtask/vm-known-failures.txt` lists tests that fail on
//! a kernel for a reason already understood, so the matrix still shows them
//! (as "known failure", with the reason) without failing CI. Everything not
//! listed is required on every kernel.
//!
//! Format, one per line: `<kernel> <test> # reason`, where `<kernel>` is a
//! label (`6.1`: x86-64), `<arch>:<label>` (`armv7:6.1`), `<arch>:*`, or
//! `*` (every kernel of every architecture).

use anyhow::{Context as _, Result, bail};
use std::path::Path;

#[derive(Debug, Default)]
pub struct KnownFailures(Vec<(String, String, String)>);

impl KnownFailures {
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn parse(text: &str) -> Result<Self> {
        let mut list = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let (entry, reason) = line.split_once('#').unwrap_or((line, ""));
            let fields: Vec<&str> = entry.split_whitespace().collect();
            match fields.as_slice() {
                [] => {}
                [kernel, test] => list.push(((*kernel).to_owned(), (*test).to_owned(), reason.trim().to_owned())),
                _ => bail!("line {}: expected `<kernel or *> <test> # reason`, got `{line}`", n + 1),
            }
        }
        Ok(Self(list))
    }

    /// The reason when `test` is a known failure on `kernel` (a label, or
    /// `<arch>:<label>`).
    pub fn reason(&self, kernel: &str, test: &str) -> Option<&str> {
        let arch_any = kernel.split_once(':').map(|(a, _)| format!("{a}:*"));
        self.0
            .iter()
            .find(|(k, t, _)| (k == "*" || k == kernel || Some(k) == arch_any.as_ref()) && t == test)
            .map(|(_, _, r)| r.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_by_kernel_or_star() {
        let k = KnownFailures::parse("# header\n5.10 a::b # old kernel\n* c::d\n\n").unwrap();
        assert_eq!(k.reason("5.10", "a::b"), Some("old kernel"));
        assert_eq!(k.reason("6.1", "a::b"), None);
        assert_eq!(k.reason("7", "c::d"), Some(""));
        assert!(KnownFailures::parse("5.10 a b").is_err());
        let k = KnownFailures::parse("armv7:* e::f # slow\narm64:6.1 g::h\n").unwrap();
        assert_eq!(k.reason("armv7:7", "e::f"), Some("slow"));
        assert_eq!(k.reason("arm64:7", "g::h"), None);
        assert_eq!(k.reason("arm64:6.1", "g::h"), Some(""));
        assert_eq!(k.reason("6.1", "g::h"), None);
    }
}
