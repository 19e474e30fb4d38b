//! The real `kubectl` (from the machine image), optionally started inside
//! a test cgroup so its connects go through nllb's programs.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

/// `kubectl` with one kubeconfig and a discovery cache of its own.
#[derive(Clone, Debug)]
pub struct Kubectl {
    pub kubeconfig: PathBuf,
    /// When set, every kubectl process joins this cgroup before it execs.
    pub cgroup: Option<PathBuf>,
    home: PathBuf,
}

/// One kubectl run: what it printed and how long it took.
#[derive(Debug)]
pub struct KubectlRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Kubectl {
    /// `home` holds kubectl's cache (`$HOME/.kube/cache`), so the user's
    /// own is never read or written.
    pub fn new(kubeconfig: &Path, home: &Path) -> Kubectl {
        std::fs::create_dir_all(home).unwrap();
        Kubectl {
            kubeconfig: kubeconfig.to_path_buf(),
            cgroup: None,
            home: home.to_path_buf(),
        }
    }

    pub fn in_cgroup(mut self, cgroup: &Path) -> Kubectl {
        self.cgroup = Some(cgroup.to_path_buf());
        self
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.env("HOME", &self.home)
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.join("cache"))
            .args(args);
        if let Some(cg) = &self.cgroup {
            let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
            // SAFETY: open/write/close only (async-signal-safe); `procs` is
            // moved into the closure, allocated before the fork.
            unsafe {
                c.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0": the writing process itself.
                    let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if rc != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> KubectlRun {
        let started = Instant::now();
        let out: Output = self
            .command(args)
            .output()
            .expect("run kubectl (it is in the machine image)");
        KubectlRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    }

    /// Runs and panics with kubectl's output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(
            r.ok,
            "kubectl {} failed after {:?}:\n{}{}",
            args.join(" "),
            r.took,
            r.stdout,
            r.stderr
        );
        r.stdout
    }

    /// `kubectl apply` of YAML text (through stdin).
    pub fn apply_yaml(&self, yaml: &str, extra: &[&str]) -> KubectlRun {
        use std::io::Write as _;
        let started = Instant::now();
        let mut args = vec!["apply", "-f", "-"];
        args.extend_from_slice(extra);
        let mut child = self
            .command(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        KubectlRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    }
}
