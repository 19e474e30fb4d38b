//! The Envoy fallback datapath against the real Envoy binary: generated
//! config (golden files, `envoy --mode validate`), traffic to controller
//! hosts in network namespaces, membership changes, no-backend behaviour
//! and supervision.
//!
//! Envoy is found like the agent finds it (NLLB_ENVOY_BINARY, `envoy` on
//! PATH, the `cargo xtask setup` venv). Without it the tests skip with a
//! message, except under CI, where they fail.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nllb::{
    config::Config,
    envoy::{self, EnvoyDatapath, EnvoyOptions, render},
    model::{Plan, ServicePlan},
};
use nllb_tests::{ClientOpts, TestNet, envoy_binary, free_port, privileged, run_client, scaled, unique_name, wait_for};

const BACKEND_PORT: u16 = 6443;
const ECONNREFUSED: i32 = 111;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/envoy")
}

/// A unique scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn validate(binary: &Path, file: &Path) {
    let out = std::process::Command::new(binary)
        .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
        .arg(file)
        .output()
        .expect("run envoy --mode validate");
    assert!(
        out.status.success(),
        "envoy rejected {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Golden files: `UPDATE_GOLDEN=1 cargo test -p nllb-tests --test envoy`
/// rewrites them after an intended change (review the diff).
/// (input config, expected output, expected file name), compiled in so the
/// test also runs where the source tree is absent (kernel-matrix guests).
const GOLDEN: [(&str, &str, &str); 2] = [
    (
        include_str!("../golden/envoy/config.yaml"),
        include_str!("../golden/envoy/config.expected.yaml"),
        "config.expected.yaml",
    ),
    (
        include_str!("../golden/envoy/no-backends.config.yaml"),
        include_str!("../golden/envoy/no-backends.expected.yaml"),
        "no-backends.expected.yaml",
    ),
];

#[test]
fn generated_config_matches_golden_files_and_envoy_accepts_it() {
    for (input, want, file) in GOLDEN {
        let cfg = Config::parse(input).unwrap();
        let opts = envoy::render_options(&cfg.envoy, &cfg.passive);
        let plan = Plan::all_backends(&cfg.services, &cfg.backends);
        let text = render::render_all(&render::Layout::new("/run/nllb/envoy"), &plan, &opts);
        let golden = golden_dir().join(file);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &text).unwrap();
            continue;
        }
        assert_eq!(
            text,
            want,
            "generated Envoy config differs from {} (UPDATE_GOLDEN=1 rewrites it)",
            golden.display()
        );

        let Some(binary) = envoy_binary() else {
            continue;
        };
        let dir = TempDir::new("nllb-envoy-validate");
        // The real bootstrap (path-based xDS) ...
        let layout = render::Layout::new(&dir.0);
        for f in render::all_files(&layout, &plan, &opts) {
            std::fs::create_dir_all(f.path.parent().unwrap()).unwrap();
            std::fs::write(&f.path, &f.contents).unwrap();
        }
        validate(&binary, &layout.bootstrap());
        // ... and every listener, cluster and endpoint, inlined, because
        // validate mode does not read the xDS files.
        let inline = dir.0.join("static.yaml");
        std::fs::write(&inline, render::to_yaml(&render::static_bootstrap(&plan, &opts))).unwrap();
        validate(&binary, &inline);
    }
}

/// A running Envoy datapath in its own work dir.
struct Running {
    dp: EnvoyDatapath,
    _dir: TempDir,
}

fn start(binary: PathBuf, plan: &Plan, admin_port: Option<u16>) -> Running {
    start_with(binary, plan, render::RenderOptions { admin_port, eject_hold: Some(Duration::from_secs(10)) })
}

fn start_with(binary: PathBuf, plan: &Plan, render: render::RenderOptions) -> Running {
    let dir = TempDir::new("nllb-envoy");
    let opts = EnvoyOptions { binary, work_dir: dir.0.join("envoy"), render, concurrency: 1, log_level: "info".into() };
    let dp = EnvoyDatapath::start(opts, plan).unwrap_or_else(|e| panic!("envoy datapath did not start: {e}"));
    Running { dp, _dir: dir }
}

fn plan(listen: &[SocketAddr], backends: &[SocketAddr]) -> Plan {
    Plan {
        services: vec![ServicePlan {
            name: "apiserver".into(),
            listen: listen.to_vec(),
            backends: backends.to_vec(),
            panic: false,
        }],
        backends: Default::default(),
    }
}

fn vips(port: u16) -> [SocketAddr; 2] {
    [SocketAddr::from(([127, 0, 0, 1], port)), format!("[::1]:{port}").parse().unwrap()]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn traffic_reaches_every_backend_on_ipv4_and_ipv6_virtual_addresses() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy_binary() else { return };
    let net = TestNet::new(3);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    // IPv4 and IPv6 controllers mixed in one service.
    let backends: Vec<SocketAddr> = net
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| SocketAddr::new(if i == 2 { h.v6 } else { h.v4 }, BACKEND_PORT))
        .collect();
    let port = free_port();
    let t0 = Instant::now();
    let run = start(binary, &plan(&vips(port), &backends), None);
    eprintln!("envoy listening on both virtual addresses {:?} after start", t0.elapsed());
    let pid = run.dp.status().pid.unwrap();
    eprintln!("envoy idle RSS: {} KiB", rss_kib(pid));

    for vip in vips(port) {
        let report = run_client(&ClientOpts::new(vip, 60, None));
        assert_eq!(report.ok_count(), 60, "{vip}: every connect must succeed: {:?}", report.failed());
        let by = report.by_body();
        assert_eq!(by.len(), 3, "{vip}: all three controllers must serve: {by:?}");
        // The client is connected to Envoy on the virtual address itself.
        assert!(report.results.iter().all(|r| r.peer.as_deref() == Some(vip.to_string().as_str())));
    }
    eprintln!("envoy RSS after 120 connections: {} KiB", rss_kib(pid));
    assert_eq!(run.dp.status().restarts, 0);
}

#[test]
fn zero_backends_refuse_connects_at_once_like_the_kernel_datapath() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy_binary() else { return };
    let net = TestNet::new(1);
    let _server = net.hosts()[0].serve(BACKEND_PORT, "controller-0");
    let backend = SocketAddr::new(net.hosts()[0].v4, BACKEND_PORT);
    let port = free_port();
    let mut run = start(binary, &plan(&vips(port), &[]), None);
    let pid = run.dp.status().pid.unwrap();

    let refused = |label: &str| {
        for vip in vips(port) {
            let report = run_client(&ClientOpts::new(vip, 5, None));
            for r in &report.results {
                assert!(!r.ok, "{label}: {vip} must refuse: {r:?}");
                assert_eq!(r.errno, Some(ECONNREFUSED), "{label}: {vip}: {r:?}");
                assert!(r.elapsed_us < 50_000, "{label}: refusal must be immediate: {r:?}");
            }
        }
    };
    refused("no backends at start");

    run.dp.apply(&plan(&vips(port), &[backend])).unwrap();
    let report = run_client(&ClientOpts::new(vips(port)[0], 5, None));
    assert_eq!(report.ok_count(), 5, "{:?}", report.failed());

    run.dp.apply(&plan(&vips(port), &[])).unwrap();
    refused("after the last backend left");
    assert_eq!(run.dp.status().pid, Some(pid), "listener changes must not restart Envoy");
}

/// Open a connection through the virtual address and leave the HTTP
/// request unsent: the server answers only once it has it.
fn open(vip: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn finish(mut s: TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.rsplit("\r\n\r\n").next().unwrap_or_default().to_string()
}

#[test]
fn membership_change_keeps_established_connections_and_envoy_running() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy_binary() else { return };
    let net = TestNet::new(3);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let b: Vec<SocketAddr> = net.hosts().iter().map(|h| SocketAddr::new(h.v4, BACKEND_PORT)).collect();
    let port = free_port();
    let vip = vips(port)[0];
    let mut run = start(binary, &plan(&[vip], &b[..1]), None);
    let pid = run.dp.status().pid.unwrap();

    let established = open(vip);
    // Envoy has connected upstream (no health checks: the only connection
    // controller-0 accepts is this one's).
    wait_for(Duration::from_secs(5), || (_servers[0].served() == 1).then_some(()))
        .expect("envoy connected the established connection to controller-0");
    let t0 = Instant::now();
    run.dp.apply(&plan(&[vip], &b[1..])).unwrap();
    // New connects follow the new set (EDS applies asynchronously).
    let moved = wait_for(Duration::from_secs(5), || {
        let by = run_client(&ClientOpts::new(vip, 20, None)).by_body();
        (!by.contains_key("controller-0") && by.len() == 2).then_some(by)
    });
    assert!(moved.is_some(), "new connects must go to controller-1 and -2 only");
    eprintln!("membership change served {:?} after apply", t0.elapsed());
    // The connection made before the change still reaches its controller.
    assert_eq!(finish(established), "controller-0");
    let st = run.dp.status();
    assert_eq!((st.pid, st.restarts), (Some(pid), 0), "membership changes must not restart Envoy: {st:?}");
}

#[test]
fn killed_envoy_is_restarted_and_traffic_resumes() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy_binary() else { return };
    let net = TestNet::new(2);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let b: Vec<SocketAddr> = net.hosts().iter().map(|h| SocketAddr::new(h.v4, BACKEND_PORT)).collect();
    let port = free_port();
    let vip = vips(port)[0];
    let mut run = start(binary, &plan(&[vip], &b), None);
    let handle = run.dp.handle();
    let first = run.dp.status().pid.unwrap();
    let generation = handle.generation();
    assert_eq!(shared_memory(first), None, "Envoy {first} maps shared memory");

    // A membership change while Envoy is down must be served after restart.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    run.dp.apply(&plan(&[vip], &b[1..])).unwrap();
    let (_, second) = handle.wait_started(generation, Duration::from_secs(10)).expect("envoy must be restarted");
    assert_ne!(first, second);
    let served = wait_for(Duration::from_secs(10), || {
        let report = run_client(&ClientOpts::new(vip, 10, None));
        (report.ok_count() == 10).then_some(report)
    })
    .expect("traffic must resume after the restart");
    eprintln!("traffic resumed {:?} after SIGKILL", killed_at.elapsed());
    assert_eq!(
        served.by_body().keys().collect::<Vec<_>>(),
        ["controller-1"],
        "the restarted Envoy serves the latest plan"
    );
    let st = run.dp.status();
    assert_eq!(st.restarts, 1, "{st:?}");
    assert_eq!(st.last_exit.as_deref(), Some("killed by signal 9"), "{st:?}");
    assert!(st.running);
    assert_eq!(shared_memory(second), None, "the restarted Envoy {second} maps shared memory");
}

/// The hot-restart region Envoy `pid` maps, if any. With hot restart on,
/// every Envoy start leaves `/dev/shm/envoy_shared_memory_<base id>0`
/// behind, killed or not: a leak per restart on a node.
fn shared_memory(pid: u32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines().find(|l| l.contains("envoy_shared_memory")).map(str::to_string)
}

#[test]
fn shutdown_stops_envoy_and_removes_its_config() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy_binary() else { return };
    let net = TestNet::new(1);
    let _server = net.hosts()[0].serve(BACKEND_PORT, "controller-0");
    let port = free_port();
    let admin = free_port();
    let vip = vips(port)[0];
    let mut run = start(binary, &plan(&[vip], &[SocketAddr::new(net.hosts()[0].v4, BACKEND_PORT)]), Some(admin));
    let pid = run.dp.status().pid.unwrap();
    // The admin interface answers on loopback only.
    let listening = envoy::listeners::listening_sockets(pid).unwrap();
    assert!(listening.contains(&SocketAddr::from(([127, 0, 0, 1], admin))), "{listening:?}");
    let mut a = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    a.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    a.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200") && resp.contains("LIVE"), "{resp}");

    // Per-controller counters come from the admin interface, read in the
    // background: the datapath shows the latest poll.
    let report = run_client(&ClientOpts::new(vip, 7, None));
    assert_eq!(report.ok_count(), 7);
    let want = vec![(SocketAddr::new(net.hosts()[0].v4, BACKEND_PORT), 7)];
    let per_backend = || -> Vec<Vec<(SocketAddr, u64)>> {
        run.dp.snapshot().services.iter().map(|s| s.backends.iter().map(|(a, c)| (*a, c.connects)).collect()).collect()
    };
    let counted = wait_for(Duration::from_secs(5), || (per_backend() == vec![want.clone()]).then_some(()));
    assert!(counted.is_some(), "counters never showed 7 connects: {:?}", per_backend());

    let dir = run.dp.layout().dir.clone();
    run.dp.shutdown().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "envoy {pid} must be gone");
    assert!(!run.dp.status().running);
    let e = TcpStream::connect(vip).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(ECONNREFUSED));
    assert!(!dir.join("bootstrap.yaml").exists() && !dir.join("eds").exists());
}

#[test]
fn a_port_already_in_use_fails_start_with_the_reason() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy_binary() else { return };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let vip = taken.local_addr().unwrap();
    let dir = TempDir::new("nllb-envoy-busy");
    let opts = EnvoyOptions {
        binary,
        work_dir: dir.0.join("envoy"),
        render: Default::default(),
        concurrency: 1,
        log_level: "warning".into(),
    };
    let started = Instant::now();
    let Err(e) = EnvoyDatapath::start(opts, &plan(&[vip], &["198.18.0.2:6443".parse().unwrap()])) else {
        panic!("start must fail while {vip} is taken");
    };
    let e = e.to_string();
    assert!(e.contains(&vip.to_string()), "the error must name the address: {e}");
    eprintln!("busy port detected after {:?}: {e}", started.elapsed());
}

// ---------------------------------------------------------------------
// Detection and mode selection
// ---------------------------------------------------------------------

use nllb::{
    config::Mode,
    detect::{self, DetectArgs},
};
use nllb_tests::TestCgroup;

#[test]
fn detect_attaches_the_real_programs_to_a_temporary_child_cgroup() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new();
    let report = detect::detect(Some(cg.path()));
    let attach = report.attach.as_ref().expect("the probe runs on a cgroup v2 directory");
    assert!(attach.cgroup.starts_with(cg.path()), "the probe uses a child of the target: {attach:?}");
    assert!(!attach.cgroup.exists(), "the probe cgroup must be removed");
    assert!(report.ebpf_usable(), "this kernel (6.x, root) runs the eBPF datapath: {}", detect::render(&report));
    for p in &attach.programs {
        assert!(p.attached && p.bpf_link, "{p:?}");
    }
    assert_eq!(report.auto_mode().0, Mode::Ebpf);
    assert_eq!(report.exit_code(), detect::EXIT_EBPF);
    // The table's minimum versions agree with what this kernel really does:
    // every probed row is available exactly when the version says so.
    let kernel = report.kernel.expect("uname parses");
    for f in &report.features {
        if f.source == "probe" && f.feature != nllb::compat::Feature::VmlinuxBtf {
            assert_eq!(
                f.available,
                Some(nllb::compat::by_version(f.feature, kernel)),
                "{} on {kernel}: probe and table disagree",
                f.name
            );
        }
    }
    // Nothing stays attached to the target.
    assert!(nllb_tests::attached_programs(cg.path()).is_empty());
    let text = detect::render(&report);
    for needle in ["kernel", "cgroup v2", "BPF syscall", "nllb_connect4", "getpeername", "auto mode"] {
        assert!(text.contains(needle), "report lacks {needle}:\n{text}");
    }
    // The agent destroys sockets with SOCK_DESTROY and aya reads kernel
    // BTF: neither row may say it is unused.
    for row in ["sock_diag SOCK_DESTROY", "kernel BTF"] {
        let line = text.lines().find(|l| l.contains(row)).unwrap_or_else(|| panic!("no {row} row:\n{text}"));
        assert!(!line.contains("not used"), "{line}");
    }
    eprintln!("{text}");
}

#[test]
fn auto_falls_back_to_envoy_when_the_cgroup_is_not_cgroup_v2_and_ebpf_fails_clearly() {
    let Some(binary) = envoy_binary() else { return };
    let not_cgroup = TempDir::new("nllb-not-a-cgroup");
    let report = detect::detect_with(Some(&not_cgroup.0), Some(&binary));
    assert!(!report.ebpf_usable());
    let (mode, reason) = report.auto_mode();
    assert_eq!(mode, Mode::Envoy);
    assert!(reason.contains("not a cgroup v2 directory"), "{reason}");
    assert_eq!(report.exit_code(), detect::EXIT_ENVOY_ONLY);

    assert_eq!(detect::select_mode(Mode::Auto, &not_cgroup.0, Some(&binary)).unwrap(), Mode::Envoy);
    let e = detect::select_mode(Mode::Ebpf, &not_cgroup.0, Some(&binary)).unwrap_err().to_string();
    assert!(e.contains("--mode ebpf") && e.contains("not a cgroup v2 directory"), "{e}");
    assert_eq!(detect::select_mode(Mode::Envoy, &not_cgroup.0, Some(&binary)).unwrap(), Mode::Envoy);

    // Neither: exit status 4 and an error naming both causes.
    let missing = Path::new("/nonexistent/envoy");
    let report = detect::detect_with(Some(&not_cgroup.0), Some(missing));
    assert_eq!(report.exit_code(), detect::EXIT_NEITHER);
    let e = detect::select_mode(Mode::Auto, &not_cgroup.0, Some(missing)).unwrap_err().to_string();
    assert!(e.contains("not a cgroup v2") && e.contains("/nonexistent/envoy"), "{e}");
    let args = DetectArgs { json: true, cgroup: Some(not_cgroup.0.clone()), envoy_binary: Some(missing.into()) };
    assert_eq!(detect::run_detect(args), detect::EXIT_NEITHER);
}

#[test]
fn auto_picks_ebpf_on_a_cgroup_v2_target() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new();
    assert_eq!(detect::select_mode(Mode::Auto, cg.path(), None).unwrap(), Mode::Ebpf);
}

#[test]
fn a_dead_or_blackholed_controller_is_retried_on_another_one_then_ejected() {
    if !privileged() {
        return;
    }
    let Some(binary) = envoy_binary() else { return };
    let net = TestNet::new(3);
    let mut servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let b: Vec<SocketAddr> = net.hosts().iter().map(|h| SocketAddr::new(h.v4, BACKEND_PORT)).collect();
    let vip = vips(free_port())[0];
    // controller-0 refuses (RST), controller-1 drops every packet; the
    // agent has not noticed yet (same plan).
    servers[0].stop();
    net.hosts()[1].blackhole();

    // Retries alone (no ejection): round robin walks all three controllers
    // within max_connect_attempts, so every connect lands on controller-2.
    let run = start_with(binary.clone(), &plan(&[vip], &b), render::RenderOptions::default());
    let report = run_client(&ClientOpts::new(vip, 30, None));
    assert_eq!(report.ok_count(), 30, "every connect must succeed through a retry: {:?}", report.failed());
    assert_eq!(report.by_body().keys().collect::<Vec<_>>(), ["controller-2"]);
    let slowest = report.results.iter().map(|r| r.elapsed_us).max().unwrap();
    eprintln!("retries only: slowest connect+request {slowest} us (one blackholed attempt costs 250 ms)");
    assert!(slowest < 1_000_000, "{slowest} us");
    drop(run);

    // With outlier detection (passive ejection) the two bad controllers
    // leave the pick after their failures: later connects are fast.
    let vip = vips(free_port())[0];
    let run = start(binary, &plan(&[vip], &b), None);
    let report = run_client(&ClientOpts::new(vip, 30, None));
    net.hosts()[1].unblackhole();
    let late = &report.results[15..];
    assert!(late.iter().all(|r| r.ok && r.body.as_deref() == Some("controller-2")), "{late:?}");
    let slowest_late = late.iter().map(|r| r.elapsed_us).max().unwrap();
    eprintln!("with ejection: slowest of the last 15 connects {slowest_late} us");
    assert!(slowest_late < 200_000, "ejected controllers must not be tried again: {slowest_late} us");
    assert_eq!(run.dp.status().restarts, 0);
}

// ---------------------------------------------------------------------
// The same scenarios against both datapaths (real eBPF programs attached
// to a test cgroup, real Envoy), from one test body per scenario. The
// client always runs inside the test cgroup; Envoy serves it as well as
// any other host process.
// ---------------------------------------------------------------------

use std::os::unix::process::CommandExt as _;

use nllb::datapath::{
    Datapath,
    ebpf::{EbpfDatapath, EbpfOptions},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ebpf,
    Envoy,
}

struct Fixture {
    dp: Box<dyn Datapath>,
    cg: TestCgroup,
    _dir: Option<TempDir>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.dp.shutdown();
    }
}

/// The datapath of `kind` serving `plan` for processes in a fresh cgroup;
/// None when the test must skip (no root, no Envoy).
fn install(kind: Kind, plan: &Plan) -> Option<Fixture> {
    if !privileged() {
        return None;
    }
    let cg = TestCgroup::new();
    Some(match kind {
        Kind::Ebpf => {
            let opts = EbpfOptions {
                cgroup: cg.path().to_path_buf(),
                pin_path: PathBuf::from("/sys/fs/bpf").join(unique_name("nllb-modes")),
                host_network_only: true,
                passive: true,
                eject_hold: Duration::from_secs(10),
                syn_retries: 2,
            };
            let dp = EbpfDatapath::install(opts, plan).unwrap_or_else(|e| panic!("eBPF datapath: {e}"));
            Fixture { dp: Box::new(dp), cg, _dir: None }
        }
        Kind::Envoy => {
            let binary = envoy_binary()?;
            let run = start(binary, plan, None);
            let Running { dp, _dir } = run;
            Fixture { dp: Box::new(dp), cg, _dir: Some(_dir) }
        }
    })
}

/// Every controller serves both families under one name.
fn dual_stack_backends(net: &TestNet) -> Vec<SocketAddr> {
    let v4 = net.hosts().iter().map(|h| SocketAddr::new(h.v4, BACKEND_PORT));
    let v6 = net.hosts().iter().map(|h| SocketAddr::new(h.v6, BACKEND_PORT));
    v4.chain(v6).collect()
}

fn scenario_traffic_reaches_every_backend(kind: Kind) {
    let net = TestNet::new(3);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let port = free_port();
    let Some(f) = install(kind, &plan(&vips(port), &dual_stack_backends(&net))) else {
        return;
    };
    for vip in vips(port) {
        let report = run_client(&ClientOpts::new(vip, 60, Some(f.cg.path())));
        assert_eq!(report.ok_count(), 60, "{kind:?} {vip}: {:?}", report.failed());
        assert_eq!(report.by_body().len(), 3, "{kind:?} {vip}: every controller serves: {:?}", report.by_body());
        assert!(
            report.results.iter().all(|r| r.peer.as_deref() == Some(vip.to_string().as_str())),
            "{kind:?} {vip}: getpeername shows the virtual address"
        );
    }
}

fn scenario_no_backend_refuses_at_once(kind: Kind) {
    let port = free_port();
    let Some(f) = install(kind, &plan(&vips(port), &[])) else {
        return;
    };
    for vip in vips(port) {
        let report = run_client(&ClientOpts::new(vip, 5, Some(f.cg.path())));
        for r in &report.results {
            assert_eq!((r.ok, r.errno), (false, Some(ECONNREFUSED)), "{kind:?} {vip}: {r:?}");
            assert!(u128::from(r.elapsed_us) < scaled(Duration::from_millis(50)).as_micros(), "{kind:?} {vip}: {r:?}");
        }
    }
}

/// `busybox nc` connected through `vip` from inside `cgroup`, request not
/// yet sent.
fn nc_in_cgroup(cgroup: &Path, vip: SocketAddr) -> std::process::Child {
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
    let mut cmd = std::process::Command::new("busybox");
    cmd.args(["nc", &vip.ip().to_string(), &vip.port().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    // SAFETY: only open/write/close between fork and exec; writing "0"
    // moves the writing process itself into the cgroup.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    cmd.spawn().expect("busybox nc (busybox-static is installed by cargo xtask setup)")
}

fn scenario_membership_change_keeps_established_connections(kind: Kind) {
    let net = TestNet::new(3);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let b: Vec<SocketAddr> = net.hosts().iter().map(|h| SocketAddr::new(h.v4, BACKEND_PORT)).collect();
    let vip = vips(free_port())[0];
    let Some(mut f) = install(kind, &plan(&[vip], &b[..1])) else {
        return;
    };
    let mut nc = nc_in_cgroup(f.cg.path(), vip);
    // Until controller-0 has accepted, the connection is not established.
    assert!(
        wait_for(Duration::from_secs(3), || (_servers[0].served() > 0).then_some(())).is_some(),
        "{kind:?}: the held connection must reach controller-0"
    );
    f.dp.apply(&plan(&[vip], &b[1..])).unwrap();
    let moved = wait_for(Duration::from_secs(5), || {
        let by = run_client(&ClientOpts::new(vip, 20, Some(f.cg.path()))).by_body();
        (!by.contains_key("controller-0") && by.len() == 2).then_some(by)
    });
    assert!(moved.is_some(), "{kind:?}: new connects must follow the new set");
    nc.stdin.as_mut().unwrap().write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let out = nc.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\r\n\r\ncontroller-0"), "{kind:?}: the established connection must survive: {text:?}");
}

fn scenario_failover_when_a_controller_dies(kind: Kind) {
    let net = TestNet::new(3);
    let mut servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let b: Vec<SocketAddr> = net.hosts().iter().map(|h| SocketAddr::new(h.v4, BACKEND_PORT)).collect();
    let vip = vips(free_port())[0];
    let Some(mut f) = install(kind, &plan(&[vip], &b)) else {
        return;
    };
    servers[0].stop();
    // The agent's probes notice and publish the two live controllers.
    f.dp.apply(&plan(&[vip], &b[1..])).unwrap();
    let report = wait_for(Duration::from_secs(5), || {
        let r = run_client(&ClientOpts::new(vip, 30, Some(f.cg.path())));
        (r.ok_count() == 30).then_some(r)
    })
    .unwrap_or_else(|| panic!("{kind:?}: connects must succeed once the dead controller is out"));
    let by = report.by_body();
    assert_eq!(by.keys().collect::<Vec<_>>(), ["controller-1", "controller-2"], "{kind:?}");
}

macro_rules! both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod ebpf_mode {
            $(#[test] fn $scenario() { super::$scenario(super::Kind::Ebpf) })*
        }
        mod envoy_mode {
            $(#[test] fn $scenario() { super::$scenario(super::Kind::Envoy) })*
        }
    };
}

both_modes!(
    scenario_traffic_reaches_every_backend,
    scenario_no_backend_refuses_at_once,
    scenario_membership_change_keeps_established_connections,
    scenario_failover_when_a_controller_dies,
);
