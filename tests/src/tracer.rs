//! `nllb trace --json` as a child process next to an agent, its lines
//! collected as they come (the trace tests, and tests of features that
//! show in the trace).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use nix::sys::signal::{Signal, kill};
use serde_json::Value;

use crate::{Agent, nllb_bin, wait_for};

/// `nllb trace --json` against an agent's pins and run dir, its lines
/// collected as they come.
pub struct Tracer {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    threads: Vec<JoinHandle<()>>,
}

impl Tracer {
    pub fn spawn(agent: &Agent, extra: &[&str]) -> Tracer {
        let mut child = Command::new(nllb_bin())
            .args(["trace", "--json"])
            .args(extra)
            .arg("--pin-path")
            .arg(&agent.pin_path)
            .arg("--run-dir")
            .arg(&agent.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nllb trace");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        let t1 = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                l.lock().unwrap().push(v);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let e = stderr.clone();
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Tracer { child: Some(child), lines, stderr, threads: vec![t1, t2] }
    }

    /// Started and reading: it says so once the programs emit.
    pub fn start(agent: &Agent, extra: &[&str]) -> Tracer {
        let mut t = Tracer::spawn(agent, extra);
        let ready = wait_for(Duration::from_secs(10), || {
            if t.stderr().contains("nllb trace: reading") {
                return Some(true);
            }
            t.child.as_mut().unwrap().try_wait().ok().flatten().map(|_| false)
        });
        assert_eq!(ready, Some(true), "nllb trace did not start: {}", t.stderr());
        t
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until `f` holds for the lines so far.
    pub fn wait(&self, what: &str, timeout: Duration, f: impl Fn(&[Value]) -> bool) {
        let ok = wait_for(timeout, || f(&self.lines.lock().unwrap()).then_some(()));
        assert!(ok.is_some(), "{what}: not seen in the trace; lines:\n{:#?}\nstderr: {}", self.lines, self.stderr());
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }

    /// Waits for the exit (after a signal or by itself): status, every line.
    pub fn finish(mut self) -> (ExitStatus, Vec<Value>, String) {
        let mut child = self.child.take().unwrap();
        let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
        let status = status.unwrap_or_else(|| {
            let _ = child.kill();
            panic!("nllb trace did not exit; stderr: {}", self.stderr())
        });
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let lines = self.lines.lock().unwrap().clone();
        (status, lines, self.stderr())
    }

    pub fn stop(self) -> (ExitStatus, Vec<Value>, String) {
        self.signal(Signal::SIGINT);
        self.finish()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
