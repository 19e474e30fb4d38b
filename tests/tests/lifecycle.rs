//! The datapath outlives the agent: exits, crashes, restarts and upgrades
//! never leave the virtual address without a program.

use std::time::Duration;

use nix::sys::signal::Signal;
use nllb_tests::{
    Agent, AgentOpts, ClientOpts, NLLB_PROGRAMS, TestCgroup, TestNet, attached_programs, free_port,
    one_service_config, privileged, run_client, stop_client, vip4,
};

const BACKEND_PORT: u16 = 6443;

fn agent(net: &TestNet, cg: &TestCgroup, port: u16) -> Agent {
    let backends: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
    Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &backends, ""),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    })
}

#[test]
fn after_sigterm_the_datapath_keeps_serving_until_uninstall() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(2);
    let _s: Vec<_> = net.serve_all(BACKEND_PORT, "c");
    let cg = TestCgroup::new();
    let port = free_port();
    let mut agent = agent(&net, &cg, port);
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(10)).expect("agent exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_eq!(attached_programs(cg.path()).len(), NLLB_PROGRAMS, "programs must stay attached");
    let report = run_client(&ClientOpts::new(vip4(port), 20, Some(cg.path())));
    assert_eq!(report.ok_count(), 20, "no agent, still steered: {:?}", report.failed());

    let st = agent.nllb(&["status", "--json"]);
    assert_eq!(st.status.code(), Some(1), "status must say the agent is not running");
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["agent_running"], false);
    assert_eq!(v["datapath_installed"], true);

    let out = agent.nllb(&["uninstall"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(attached_programs(cg.path()).is_empty(), "uninstall must detach everything");
    assert!(!agent.pin_path.exists(), "uninstall must remove the pins");
}

#[test]
fn kill_restart_and_upgrade_fail_no_connect() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(2);
    let _s: Vec<_> = net.serve_all(BACKEND_PORT, "c");
    let cg = TestCgroup::new();
    let port = free_port();
    let mut agent = agent(&net, &cg, port);

    // A steady client: one connect every 5 ms until stopped. Between the
    // steps below it makes 25 connects (~0.1 s on the host) through the datapath,
    // counted by the kernel, so every phase (agent up, killed, restarted,
    // upgraded) sees traffic.
    let mut opts = ClientOpts::new(vip4(port), u32::MAX, Some(cg.path()));
    opts.interval = Duration::from_millis(5);
    let client = opts.spawn();
    let progress = Duration::from_secs(10);

    agent.wait_connects(25, progress);
    agent.signal(Signal::SIGKILL);
    assert!(agent.wait_exit(Duration::from_secs(5)).is_some());
    agent.wait_connects(25, progress);
    agent.restart(&[]);
    assert!(agent.log().contains("adopting the pinned datapath"), "{}", agent.log());
    agent.wait_connects(25, progress);
    // An upgrade to a build with another map layout: the old agent stops
    // (keeping the datapath), the new one swaps programs and maps in place.
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(5)).is_some());
    // The old build also had a program this one has not (layout 2's
    // sock_release): a live link pinned under a name the new build does not
    // know must be detached, not left running the old program.
    let retired = agent.pin_path.join("link_nllb_sock_release");
    std::fs::rename(agent.pin_path.join("link_nllb_getpeername4"), &retired).unwrap();
    assert_eq!(attached_programs(cg.path()).len(), NLLB_PROGRAMS);
    agent.restart(&[("NLLB_LAYOUT_VERSION", "999")]);
    assert!(agent.log().contains("replacing a pinned datapath of another layout"), "{}", agent.log());
    assert!(!retired.exists(), "the retired link's pin is gone");
    assert!(agent.log().contains("detached the link of a program this build no longer has"), "{}", agent.log());
    agent.wait_connects(25, progress);

    let report = stop_client(client);
    assert!(report.results.len() >= 100, "{} connects", report.results.len());
    assert!(
        report.failed().is_empty(),
        "{} connects failed: {:?}",
        report.failed().len(),
        &report.failed()[..report.failed().len().min(5)]
    );
    assert_eq!(report.by_body().len(), 2);
    assert_eq!(attached_programs(cg.path()).len(), NLLB_PROGRAMS, "exactly one set of programs after the upgrade");
    // The new maps are the pinned ones: status reads counters from them.
    let after = run_client(&ClientOpts::new(vip4(port), 10, Some(cg.path())));
    assert_eq!(after.ok_count(), 10, "{:?}", after.failed());
    let status = agent.status();
    let total: u64 =
        status["services"][0]["backends"].as_array().unwrap().iter().map(|b| b["connects"].as_u64().unwrap()).sum();
    assert!(total >= 10, "{status}");
}

/// Everything the agent sent to a notify socket so far (non-blocking).
fn notifications(sock: &std::os::unix::net::UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

fn count(messages: &[String], line: &str) -> usize {
    messages.iter().filter(|m| m.lines().any(|l| l == line)).count()
}

/// systemd's `Type=notify` over a real notify socket: `READY=1` comes only
/// when the datapath is attached and steering, `WATCHDOG=1` follows while
/// the watchdog is on, and an agent whose datapath cannot be installed
/// never says it is ready.
#[test]
fn systemd_hears_ready_only_once_the_datapath_serves() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(nllb_tests::unique_name("nllb-notify-"));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let net = TestNet::new(1);
    let _s: Vec<_> = net.serve_all(BACKEND_PORT, "c");
    let cg = TestCgroup::new();
    let port = free_port();
    let config = one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &[net.hosts()[0].v4], "");

    // A datapath that cannot be installed (the pin path is not on bpffs):
    // the agent fails, and never says it is ready.
    let config_path = dir.join("nllb.yaml");
    std::fs::write(&config_path, &config).unwrap();
    let failed = std::process::Command::new(nllb_tests::nllb_bin())
        .arg("agent")
        .arg("--config")
        .arg(&config_path)
        .arg("--cgroup")
        .arg(cg.path())
        .arg("--pin-path")
        .arg(dir.join("not-bpffs/nllb"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &socket_path)
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "{}", String::from_utf8_lossy(&failed.stderr));
    assert!(attached_programs(cg.path()).is_empty());
    let mut seen = Vec::new();
    notifications(&sock, &mut seen);
    assert_eq!(count(&seen, "READY=1"), 0, "READY=1 without a datapath: {seen:?}");

    // A working one: READY=1 arrives, and by then the programs are
    // attached and connects through the virtual address reach a controller.
    let agent = Agent::spawn(&AgentOpts {
        config_yaml: config,
        cgroup: cg.path().to_path_buf(),
        env: vec![
            ("NOTIFY_SOCKET".into(), socket_path.display().to_string()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        ..Default::default()
    });
    let ready = nllb_tests::wait_for(Duration::from_secs(20), || {
        notifications(&sock, &mut seen);
        (count(&seen, "READY=1") > 0).then_some(())
    });
    assert!(ready.is_some(), "no READY=1: {seen:?}\n{}", agent.log());
    assert_eq!(attached_programs(cg.path()).len(), NLLB_PROGRAMS, "READY=1 before the programs were attached");
    let report = run_client(&ClientOpts::new(vip4(port), 5, Some(cg.path())));
    assert_eq!(report.ok_count(), 5, "READY=1 before connects were steered: {:?}", report.failed());
    assert_eq!(count(&seen, "READY=1"), 1, "{seen:?}");
    // WatchdogSec=0.4s: pings keep coming from the agent's tick.
    let pinged = nllb_tests::wait_for(Duration::from_secs(5), || {
        notifications(&sock, &mut seen);
        (count(&seen, "WATCHDOG=1") >= 3).then_some(())
    });
    assert!(pinged.is_some(), "no watchdog pings: {seen:?}");
    // The log went to a file, not a terminal: no colour escape codes.
    assert!(!agent.log().contains('\u{1b}'), "ANSI escape codes in the log file:\n{}", agent.log());
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
