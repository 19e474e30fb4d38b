//! Facts about the host the agent needs before it touches the kernel.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

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
        // Two agents starting at once (the tests do; so can a restart that
        // overlaps the old process) would both see no bpffs and both mount
        // one, and the second mount hides the first agent's pins. The check
        // and the mount happen under a lock on /sys/fs, which, unlike
        // /sys/fs/bpf, is the same directory before and after the mount.
        let _lock = fs::File::open("/sys/fs").ok().and_then(|d| Flock::lock(d, FlockArg::LockExclusive).ok());
        if !is_bpffs(default) {
            fs::create_dir_all(default)?;
            nix::mount::mount(Some("bpf"), default, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
                .map_err(|e| io::Error::other(format!("mounting bpffs at /sys/fs/bpf: {e}")))?;
            tracing::info!("mounted bpffs at /sys/fs/bpf");
        }
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

/// The kernel's CONFIG_HZ (jiffies per second): sock_ops answers the SYN
/// timeout in jiffies. From the kernel config when it is on disk, else
/// measured from /proc/timer_list (jiffies and the monotonic clock, read
/// 100 ms apart) and rounded to the nearest value a kernel can be built with;
/// 250 (Debian's default) if neither can be read. Measured once per process.
pub fn kernel_hz() -> u32 {
    static HZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        if let Some(hz) = hz_from_config() {
            return hz;
        }
        let first = timer_list_sample();
        std::thread::sleep(std::time::Duration::from_millis(100));
        match (first, timer_list_sample()) {
            (Some((j0, t0)), Some((j1, t1))) if t1 > t0 && j1 >= j0 => {
                let measured = (j1 - j0) as f64 * 1e9 / (t1 - t0) as f64;
                nearest_hz(measured)
            }
            _ => {
                tracing::warn!("cannot tell the kernel's HZ (no kernel config, no /proc/timer_list): assuming 250");
                250
            }
        }
    })
}

const HZ_CHOICES: [u32; 4] = [100, 250, 300, 1000];

fn nearest_hz(measured: f64) -> u32 {
    *HZ_CHOICES
        .iter()
        .min_by(|a, b| (f64::from(**a) - measured).abs().total_cmp(&(f64::from(**b) - measured).abs()))
        .expect("choices")
}

fn hz_from_config() -> Option<u32> {
    let release = crate::compat::kernel_release();
    let text = std::fs::read_to_string(format!("/boot/config-{release}")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("CONFIG_HZ=")).and_then(|v| v.trim().parse().ok())
}

/// (jiffies, ns) as /proc/timer_list prints them together.
fn timer_list_sample() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    let now = text.lines().find_map(|l| l.strip_prefix("now at ")?.strip_suffix(" nsecs")?.trim().parse().ok())?;
    let jiffies = text.lines().find_map(|l| l.trim().strip_prefix("jiffies:")?.trim().parse().ok())?;
    Some((jiffies, now))
}

#[cfg(test)]
mod hz_tests {
    #[test]
    fn hz_rounds_to_a_kernel_value() {
        assert_eq!(super::nearest_hz(247.0), 250);
        assert_eq!(super::nearest_hz(104.0), 100);
        assert_eq!(super::nearest_hz(290.0), 300);
        assert_eq!(super::nearest_hz(990.0), 1000);
    }
}
