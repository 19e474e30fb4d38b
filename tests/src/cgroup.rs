//! Child cgroups for tests: programs are attached here, never to the root.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::unique_name;

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    for line in info.lines() {
        // "... mountpoint opts ... - fstype source superopts"
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return PathBuf::from(mp);
        }
    }
    panic!("no cgroup2 mount found in /proc/self/mountinfo");
}

#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        let path = cgroup2_mount().join(unique_name("nllb-test-"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A cgroup can only be removed once empty: move stragglers to the parent.
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            let parent = self.path.parent().unwrap().join("cgroup.procs");
            for pid in procs.lines() {
                let _ = fs::write(&parent, pid);
            }
        }
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
