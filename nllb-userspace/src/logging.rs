//! tracing set-up, and the bridge that brings the eBPF programs' aya-log
//! records into it.

use std::{ffi::OsStr, io::IsTerminal as _};

use tracing_subscriber::{EnvFilter, fmt};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logs go to stderr; `RUST_LOG` overrides the default `info` level.
/// aya-log speaks the `log` crate; tracing-subscriber's log bridge
/// (installed by `init`) turns those records into tracing events.
/// Text is coloured only on a terminal, and never with `NO_COLOR` set:
/// journald and `kubectl logs` would show the escape codes verbatim.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Forward records of the programs' ring buffer to the log. Without a tokio
/// runtime (e.g. `nllb detect`) the records are simply not read.
pub fn bridge_ebpf_logs(ebpf: &mut aya::Ebpf) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            handle.spawn(async move {
                // SAFETY: the AsyncFd owns the logger, which owns the ring
                // buffer's fd, so the fd stays open while it is registered.
                let Ok(mut fd) = (unsafe { tokio::io::unix::AsyncFd::register(logger) }) else {
                    return;
                };
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "eBPF log records will not be shown"),
    }
}

/// Colour on a terminal unless `NO_COLOR` is set to anything but the empty
/// string (https://no-color.org).
fn colour(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
