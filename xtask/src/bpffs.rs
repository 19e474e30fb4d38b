//! The tests, the bench and the demo start real agents, and an agent mounts
//! bpffs at /sys/fs/bpf when nothing is mounted there (as a node needs). A
//! run on a machine that had none would leave the mount behind, and the
//! kernel's bpf_preload puts `maps.debug` and `progs.debug` into every new
//! bpffs: to whoever checks the machine afterwards they look like pins the
//! run leaked. So a run puts the machine back as it found it.

use std::path::Path;

const BPFFS: &str = "/sys/fs/bpf";
/// What the kernel itself places in a fresh bpffs (CONFIG_BPF_PRELOAD).
const KERNEL_ENTRIES: [&str; 2] = ["maps.debug", "progs.debug"];

/// Unmounts, when dropped, a bpffs at /sys/fs/bpf that was not there when
/// it was created, if nothing but the kernel's own entries is in it.
pub struct Restore {
    was_mounted: bool,
}

impl Restore {
    pub fn record() -> Self {
        Restore { was_mounted: mounted() }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if self.was_mounted {
            return;
        }
        // Agents of builds before the mount lock could race and stack two
        // mounts: each umount takes the top one off, and what it uncovers is
        // looked at again.
        let mut n = 0;
        while mounted() && n < 8 {
            let left: Vec<String> = std::fs::read_dir(BPFFS)
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            if left.iter().any(|name| !KERNEL_ENTRIES.contains(&name.as_str())) {
                // A pin a test failed to remove, or an agent someone started
                // meanwhile: unmounting would hide it, so it stays visible.
                println!("[bpffs] {BPFFS} was mounted during the run and still holds {left:?}: left mounted");
                return;
            }
            if let Err(e) = nix::mount::umount(BPFFS) {
                println!("[bpffs] could not unmount {BPFFS}, which the run mounted: {e}");
                return;
            }
            n += 1;
        }
        if n > 0 {
            println!("[bpffs] unmounted {BPFFS} ({n} mount(s)): the run mounted it (the machine had none)");
        }
    }
}

fn mounted() -> bool {
    nix::sys::statfs::statfs(Path::new(BPFFS)).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}
