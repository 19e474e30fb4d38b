//! Long-lived connections through a virtual address that dial again when
//! they end, as kubelet's watches and konnectivity's tunnels do
//! (`nllb-testclient --hold --reconnect`), with what each one is connected
//! to and how each connection ended, as the test sees it.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::client::testclient_bin;

#[derive(Debug, Default)]
struct Seen {
    /// Controller name per connection index, None while it dials.
    up: BTreeMap<u32, Option<String>>,
    /// (when, errno) per ended connection.
    ended: Vec<(Instant, i32)>,
}

#[derive(Debug)]
pub struct Watches {
    child: Option<Child>,
    seen: Arc<Mutex<Seen>>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub count: u32,
}

impl Watches {
    /// `count` connections to `addr` from a process in `cgroup`; with
    /// `ping`, each one also sends a byte that often (a tunnel).
    pub fn start(addr: SocketAddr, count: u32, cgroup: &Path, ping: Option<Duration>) -> Watches {
        let mut cmd = Command::new(testclient_bin());
        cmd.args(["--hold", "--reconnect", "--timeout-ms", "3000", "--count", &count.to_string()])
            .args(["--addr", &addr.to_string()])
            .arg("--cgroup")
            .arg(cgroup)
            .stdout(Stdio::piped());
        if let Some(p) = ping {
            cmd.args(["--ping-ms", &p.as_millis().to_string()]);
        }
        let mut child = cmd.spawn().expect("spawn nllb-testclient");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let s = seen.clone();
        let reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut seen = s.lock().unwrap();
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["HOLD", "up", i, name] => {
                        seen.up.insert(i.parse().unwrap(), Some(name.to_string()));
                    }
                    ["HOLD", "closed", i, errno] => {
                        seen.up.insert(i.parse().unwrap(), None);
                        let errno = errno.trim_start_matches("errno=").parse().unwrap();
                        seen.ended.push((Instant::now(), errno));
                    }
                    _ => {}
                }
            }
        });
        Watches { child: Some(child), seen, reader: Some(reader), count }
    }

    /// Connections up right now, per controller name.
    pub fn by_controller(&self) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for name in self.seen.lock().unwrap().up.values().flatten() {
            *by.entry(name.clone()).or_default() += 1;
        }
        by
    }

    /// Connections up right now.
    pub fn connected(&self) -> usize {
        self.by_controller().values().sum()
    }

    /// When each connection that ended with `errno` ended (ECONNABORTED:
    /// destroyed by nllb; 0: closed by the controller).
    pub fn ended_with(&self, errno: i32) -> Vec<Instant> {
        self.seen.lock().unwrap().ended.iter().filter(|(_, e)| *e == errno).map(|(t, _)| *t).collect()
    }

    /// Every connection that ended, with its errno.
    pub fn ended(&self) -> Vec<(Instant, i32)> {
        self.seen.lock().unwrap().ended.clone()
    }

    /// SIGTERM, and wait for the client to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        self.stop();
    }
}
