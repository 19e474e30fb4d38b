//! Booting one kernel under qemu (TCG: the host's KVM is unusable for stock
//! kernels) and scraping the guest's result lines from its console.

use crate::arch::Arch;
use anyhow::{Context as _, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct GuestRun {
    pub seconds: f64,
    pub timed_out: bool,
    /// `uname -r` in the guest (from NLLB-BOOT).
    pub uname: Option<String>,
    /// (test, ok|FAILED|ignored, seconds) in the order the guest ran them.
    pub results: Vec<(String, String, Option<u64>)>,
    pub detect: Option<String>,
    /// The guest reached the end of its init script.
    pub done: bool,
    /// The agent's VmRSS and VmHWM in KiB (small config, idle).
    pub rss_kib: Option<(u64, u64)>,
    /// On a kernel whose BPF JIT is off: whether it compiles nllb's
    /// programs once switched on.
    pub jit_when_enabled: Option<bool>,
}

pub fn boot(arch: &Arch, vmlinuz: &Path, initrd: &Path, console_log: &Path, timeout: Duration) -> Result<GuestRun> {
    let log = std::fs::File::create(console_log).with_context(|| format!("creating {}", console_log.display()))?;
    let start = Instant::now();
    let q = &arch.qemu;
    let mut child = Command::new(q.binary)
        .args(q.machine)
        .args(["-smp", "1", "-m", "512M", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", format!("console={} panic=-1 {}", q.console, q.append).trim_end()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} (`cargo xtask setup` installs {})", q.binary, q.package))?;
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = String::from_utf8_lossy(&std::fs::read(console_log)?).into_owned();
    let mut run = parse(&console);
    run.seconds = start.elapsed().as_secs_f64();
    run.timed_out = timed_out;
    Ok(run)
}

/// Markers are searched anywhere in a line: a stray kernel message can
/// still precede one on the serial console.
pub fn parse(console: &str) -> GuestRun {
    let mut run = GuestRun::default();
    let mut detect: Option<Vec<&str>> = None;
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(lines) = detect.as_mut() {
            if line.contains("NLLB-DETECT-END ") {
                run.detect = Some(lines.join("\n"));
                detect = None;
            } else {
                lines.push(line);
            }
            continue;
        }
        let Some(at) = ["NLLB-BOOT ", "NLLB-RESULT ", "NLLB-DETECT-BEGIN ", "NLLB-DONE ", "NLLB-RSS ", "NLLB-JIT-ON "]
            .iter()
            .filter_map(|m| line.find(m))
            .min()
        else {
            continue;
        };
        let fields: Vec<&str> = line[at..].split_whitespace().collect();
        match fields.as_slice() {
            ["NLLB-BOOT", _, uname, ..] => run.uname = Some((*uname).to_owned()),
            ["NLLB-RESULT", _, test, status, rest @ ..] => run.results.push((
                (*test).to_owned(),
                (*status).to_owned(),
                rest.first().and_then(|s| s.parse().ok()),
            )),
            ["NLLB-DETECT-BEGIN", ..] => detect = Some(Vec::new()),
            ["NLLB-DONE", ..] => run.done = true,
            ["NLLB-RSS", _, rss, hwm, ..] => run.rss_kib = rss.parse().ok().zip(hwm.parse().ok()),
            ["NLLB-JIT-ON", _, jited, ..] => run.jit_when_enabled = jited.parse().ok(),
            _ => {}
        }
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_scraped_even_after_kernel_noise() {
        let console = "[    1.0] veth: loaded\r\nNLLB-BOOT 6.1 6.1.0-50-amd64\r\n\
            NLLB-RESULT 6.1 smoke::nllb-runs ok\n[ 2.0] x: yNLLB-RESULT 6.1 datapath::refused FAILED 7\n\
            NLLB-DETECT-BEGIN 6.1\nconnect4 yes\nNLLB-DETECT-END 6.1\nNLLB-RSS 6.1 11520 12032\nNLLB-JIT-ON 6.1 true\nNLLB-DONE 6.1\n";
        let run = parse(console);
        assert_eq!(run.uname.as_deref(), Some("6.1.0-50-amd64"));
        assert_eq!(
            run.results,
            [
                ("smoke::nllb-runs".into(), "ok".into(), None),
                ("datapath::refused".into(), "FAILED".into(), Some(7))
            ]
        );
        assert_eq!(run.detect.as_deref(), Some("connect4 yes"));
        assert_eq!(run.rss_kib, Some((11520, 12032)));
        assert_eq!(run.jit_when_enabled, Some(true));
        assert!(run.done);
    }
}
