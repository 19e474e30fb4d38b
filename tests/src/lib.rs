//! Test harness for nllb's end-to-end tests: controller hosts in network
//! namespaces, child cgroups, a client process placed in a cgroup, and the
//! real `nllb` binary. Every kernel object gets a unique name and is removed
//! on drop, also when a test fails.

mod agent;
mod cgroup;
mod client;
pub mod fake_apiserver;
mod hold_server;
pub mod k0s_nllb;
pub mod kube;
mod net;
mod server;
mod tracer;
mod watches;

use std::sync::atomic::{AtomicU32, Ordering};

pub use agent::{AGENT_CAPABILITIES, Agent, AgentOpts, nllb_bin};
pub use cgroup::{TestCgroup, cgroup2_mount};
pub use client::{ClientOpts, ClientReport, ConnectResult, run_client, stop_client, testclient_bin, wait_client};
pub use hold_server::HoldServer;
pub use net::{Netns, TestHost, TestNet};
pub use server::Server;
pub use tracer::Tracer;
pub use watches::Watches;

/// Whether privileged tests can run. Without root they skip with a message,
/// except under CI (`CI` set), where skipping would hide a failure.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but the tests are not running as root: privileged tests must run in CI");
    }
    eprintln!("SKIPPED: this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    false
}

/// A name no other test (in this or another process) uses at the same time.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id(), next_serial())
}

/// A number no other call in this process got: with the pid, a name unique
/// on the machine.
pub(crate) fn next_serial() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A binary of this workspace: `$env` when set, else `name` in the target
/// directory the test executables run from (beside their `deps/`).
pub(crate) fn built_binary(env: &str, name: &str) -> std::path::PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Run a command, panicking with its output when it fails.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `d` stretched by `NLLB_TIMEOUT_SCALE` (set in slow guests such as the
/// TCG kernel matrix, where loading the programs alone takes seconds).
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    let scale: f64 = std::env::var("NLLB_TIMEOUT_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    d.mul_f64(scale.max(1.0))
}

/// Milliseconds since the epoch: the clock `ClientReport::started_unix_ms`
/// uses, so a test can place its own events on a client's `t_ms` scale.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Wait until `f` returns Some, polling every 20 ms, for at most `timeout`
/// (scaled, see [`scaled`]).
pub fn wait_for<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + scaled(timeout);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A YAML config for one service `apiserver` on `listen` → `backend_port`.
pub fn one_service_config(listen: &[&str], backend_port: u16, backends: &[std::net::IpAddr], extra: &str) -> String {
    let listen: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
    let backends: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "services:\n  - name: apiserver\n    listen: [{}]\n    backendPort: {backend_port}\nbackends: [{}]\n{extra}",
        listen.join(", "),
        backends.join(", ")
    )
}

/// A loopback port nobody on this machine listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Programs the agent attaches to its cgroup: connect4/6, getpeername4/6
/// and sock_ops.
pub const NLLB_PROGRAMS: usize = 5;

/// Programs attached to a cgroup at nllb's hooks, one entry per program
/// (`"<hook> prog <id>"`). Asks the kernel directly (BPF_PROG_QUERY per
/// attach type): bpftool's listing gives up on kernels that lack attach
/// types it knows (5.10).
pub fn attached_programs(cgroup: &std::path::Path) -> Vec<String> {
    const HOOKS: [(u32, &str); 6] = [
        (10, "connect4"),
        (11, "connect6"),
        (29, "getpeername4"),
        (30, "getpeername6"),
        (3, "sock_ops"),
        // nllb attaches none here any more (layout 2 did): a leftover shows.
        (34, "sock_release"),
    ];
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let dir = std::fs::File::open(cgroup).expect("open cgroup");
    let mut out = Vec::new();
    for (attach_type, hook) in HOOKS {
        let mut ids = [0u32; 64];
        let mut q = Query {
            target_fd: std::os::fd::AsRawFd::as_raw_fd(&dir) as u32,
            attach_type,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: 0,
        };
        const BPF_PROG_QUERY: libc::c_long = 16;
        // SAFETY: q is a valid prefix of bpf_attr and ids outlives the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut q as *mut Query, std::mem::size_of::<Query>() as u32)
        };
        if rc == 0 {
            out.extend(ids[..q.prog_cnt as usize].iter().map(|id| format!("{hook} prog {id}")));
        }
    }
    out
}

/// `bpftool cgroup show` lines (attach type and program name), for tests
/// that check what an operator sees.
pub fn bpftool_cgroup_show(cgroup: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("run bpftool (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).lines().skip(1).filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

/// `127.0.0.1:port`, the usual virtual address in tests.
pub fn vip4(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// `[::1]:port`.
pub fn vip6(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// The Envoy binary `cargo xtask setup` installed (NLLB_ENVOY_BINARY, PATH,
/// the venv), or None when the test must skip: not installed (outside CI)
/// or inside a kernel-matrix guest, which carries no Envoy. Under CI a
/// missing Envoy fails the test.
pub fn envoy_binary() -> Option<std::path::PathBuf> {
    match nllb::envoy::resolve_binary(None) {
        Ok(p) => Some(p),
        Err(e) if std::env::var_os("NLLB_IN_VM").is_some() => {
            eprintln!("SKIPPED in the kernel-matrix guest (no Envoy in the initramfs): {e}");
            None
        }
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but Envoy is missing: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}
