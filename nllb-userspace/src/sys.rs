//! Facts about the host the agent needs before it touches the kernel.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The first cgroup2 mount in /proc/self/mountinfo (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    find_mount("cgroup2")?.ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")
    })
}

fn find_mount(fstype: &str) -> io::Result<Option<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next() == Some(fstype))
            .then(|| left.split_whitespace().nth(4).map(unescape_mount))
            .flatten()
    }))
}

/// mountinfo escapes spaces and friends as octal (`\040`).
fn unescape_mount(s: &str) -> PathBuf {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(n as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    PathBuf::from(out)
}

/// Whether `path` is a directory on a cgroup2 filesystem.
pub fn is_cgroup2_dir(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Make sure the directory that will hold `pin_path` is on a bpffs,
/// mounting bpffs at /sys/fs/bpf when nothing is mounted there yet.
pub fn ensure_bpffs(pin_path: &Path) -> io::Result<()> {
    let parent = pin_path.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if parent.starts_with(default) && !is_bpffs(default) {
        fs::create_dir_all(default)?;
        nix::mount::mount(Some("bpf"), default, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| io::Error::other(format!("mounting bpffs at /sys/fs/bpf: {e}")))?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        fs::create_dir_all(parent)?;
        return Ok(());
    }
    if is_bpffs(parent) {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{} is not on a bpf filesystem; choose a --pin-path under a bpffs mount such as /sys/fs/bpf",
        parent.display()
    )))
}

/// The network namespace cookie of the calling thread (SO_NETNS_COOKIE,
/// Linux 5.14+); None on older kernels, where the datapath then compares
/// against the initial namespace.
pub fn netns_cookie() -> Option<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket syscalls on a socket we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        libc::close(fd);
        (rc == 0).then_some(cookie)
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
pub fn raise_memlock() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {}", io::Error::last_os_error());
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(unescape_mount("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount("/sys/fs/cgroup"), PathBuf::from("/sys/fs/cgroup"));
    }
}
