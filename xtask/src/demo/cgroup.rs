//! The demo's own child cgroup: the agent attaches there, never to the root.

use anyhow::{Context as _, Result, bail};
use std::ffi::CString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mount point of the cgroup v2 hierarchy (hybrid hosts have it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            (right.split(' ').next()? == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .context("no cgroup2 mount in /proc/self/mountinfo; nllb needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)")
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A uniquely named child of the cgroup2 mount; removed on drop.
pub struct DemoCgroup {
    pub path: PathBuf,
    procs: CString,
}

impl DemoCgroup {
    pub fn create(name: &str) -> Result<Self> {
        let path = cgroup2_mount()?.join(name);
        if path == Path::new("/") || path.parent().is_none() {
            bail!("refusing to use {} as the demo cgroup", path.display());
        }
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        let procs = CString::new(path.join("cgroup.procs").into_os_string().into_encoded_bytes())
            .context("cgroup path contains a NUL byte")?;
        Ok(Self { path, procs })
    }

    /// Makes `cmd`'s process start inside this cgroup.
    pub fn place(&self, cmd: &mut Command) {
        let procs = self.procs.clone();
        // SAFETY: only async-signal-safe calls (open/write/close) run between
        // fork and exec; writing "0" moves the writing process itself.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
}

impl Drop for DemoCgroup {
    fn drop(&mut self) {
        // Clients have exited by now; retry briefly while the kernel finishes
        // tearing the last one down.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/sys/fs/cgroup/with\040space"), "/sys/fs/cgroup/with space");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
