//! One reader per datapath. A BPF ring buffer has a single consumer
//! position: two readers would each see a random part of the events. The
//! reader holds an exclusive `flock` on the pin directory (bpffs has no
//! regular files to lock); the kernel drops it when the reader exits,
//! however it exits. A second reader is told who holds it, from
//! `/proc/locks`.

use std::{fs::File, io, os::unix::fs::MetadataExt as _, path::Path};

use nix::fcntl::{Flock, FlockArg};

use super::TraceError;

pub struct ReaderLock {
    _dir: Flock<File>,
}

impl ReaderLock {
    pub fn acquire(pin_path: &Path) -> Result<ReaderLock, TraceError> {
        let dir =
            File::open(pin_path).map_err(|source| TraceError::NoDatapath { pin_path: pin_path.into(), source })?;
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(dir) => Ok(ReaderLock { _dir: dir }),
            Err((dir, nix::errno::Errno::EWOULDBLOCK)) => {
                Err(TraceError::Busy { pin_path: pin_path.into(), holder: holder(&dir) })
            }
            Err((_, errno)) => Err(TraceError::Lock { pin_path: pin_path.into(), source: io::Error::from(errno) }),
        }
    }
}

/// The pid holding a `flock` on `file`, if this pid namespace can see it.
fn holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    flock_holder(&locks, meta.dev(), meta.ino())
}

/// `/proc/locks` lines read `1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF`:
/// the device is `major:minor` in hex, then the inode in decimal.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed as "1: -> FLOCK ..."; only the holder counts.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str())).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_found_by_device_and_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 100 00:2d:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:2d:77 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 00:2d:77 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 5555 fd:01:77 0 EOF\n";
        let dev = nix::sys::stat::makedev(0, 0x2d);
        assert_eq!(flock_holder(locks, dev, 77), Some(4242));
        assert_eq!(flock_holder(locks, nix::sys::stat::makedev(0xfd, 1), 77), Some(5555));
        assert_eq!(flock_holder(locks, dev, 78), None);
    }

    #[test]
    fn a_second_reader_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = ReaderLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file, so a second open in this
        // process conflicts like another process would.
        match ReaderLock::acquire(dir.path()) {
            Err(TraceError::Busy { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Busy, got {:?}", other.err()),
        }
        drop(first);
        assert!(ReaderLock::acquire(dir.path()).is_ok());
    }
}
