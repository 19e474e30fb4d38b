//! nllb in place over k0s's own node-local load balancer ("k0s NLLB": a real
//! Envoy with the configuration k0s generates, `nllb_tests::k0s_nllb`), with
//! the real agent attached to a test cgroup and clients inside it:
//!
//! - connects to k0s's virtual addresses skip Envoy and reach the
//!   controllers directly;
//! - `nllb uninstall` under load hands the connects back to Envoy without a
//!   failure;
//! - a killed and a vanished controller, nllb next to k0s's Envoy alone in
//!   the same run (figures printed; docs/k0s.md records them);
//! - `--mode auto` where the eBPF datapath cannot attach stands aside
//!   instead of starting a second Envoy.
//!
//! Ports are free loopback ports (production: 7443/7132, `PRODUCTION_PORTS`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use nllb_tests::{
    Agent, AgentOpts, ClientOpts, ClientReport, ConnectResult, Server, TestCgroup, TestNet,
    k0s_nllb::{CONTROLLER_API_PORT, CONTROLLER_KONNECTIVITY_PORT, HealthPace, K0sNllb, K0sNllbOptions, K0sPorts},
    privileged, run_client, unix_ms, wait_client, wait_for,
};

/// A k0s worker: controllers in network namespaces serving the API server
/// and konnectivity ports, k0s's Envoy in front of them, and the k0s
/// ClusterConfig nllb derives its services from.
struct Node {
    net: TestNet,
    api: Vec<Server>,
    _konnectivity: Vec<Server>,
    k0s: K0sNllb,
    k0s_yaml: tempfile::NamedTempFile,
}

impl Node {
    /// None: the test skips (no root, or no Envoy outside CI).
    fn start(hosts: usize, health: HealthPace) -> Option<Node> {
        if !privileged() {
            return None;
        }
        let envoy = nllb_tests::envoy_binary()?;
        let net = TestNet::new(hosts);
        let api = net.serve_all(CONTROLLER_API_PORT, "api-");
        let konnectivity = net.serve_all(CONTROLLER_KONNECTIVITY_PORT, "konn-");
        let controllers: Vec<IpAddr> = net.hosts().iter().map(|h| h.v4).collect();
        let mut opts = K0sNllbOptions::new(K0sPorts::free(), &controllers);
        opts.health = health;
        let k0s_yaml = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(k0s_yaml.path(), nllb_tests::k0s_nllb::cluster_config(&opts)).unwrap();
        let k0s = K0sNllb::start(&envoy, opts);
        Some(Node { net, api, _konnectivity: konnectivity, k0s, k0s_yaml })
    }

    /// `nllb agent --k0s-config k0s.yaml` (services on k0s's ports, both
    /// families), the controllers as seed, default health, on `cgroup`.
    fn agent_opts(&self, cgroup: &std::path::Path, extra: &[&str]) -> AgentOpts {
        let backends: Vec<String> = self.net.hosts().iter().map(|h| format!("\"{}\"", h.v4)).collect();
        let mut extra_args = vec!["--k0s-config".to_string(), self.k0s_yaml.path().display().to_string()];
        extra_args.extend(extra.iter().map(|s| s.to_string()));
        AgentOpts {
            config_yaml: format!("backends: [{}]\n", backends.join(", ")),
            cgroup: cgroup.to_path_buf(),
            extra_args,
            ..Default::default()
        }
    }

    fn served_by_controllers(&self) -> u64 {
        self.api.iter().map(Server::served).sum()
    }
}

/// Whether the controller saw the client itself (its own address and port),
/// not a proxy connecting on its behalf.
fn direct(r: &nllb_tests::ConnectResult) -> bool {
    r.server_saw.is_some() && r.server_saw == r.local
}

#[test]
fn in_place_connects_skip_k0s_envoy_and_reach_the_controllers_directly() {
    let Some(n) = Node::start(3, HealthPace::AsK0s) else { return };
    let cg = TestCgroup::new();
    let agent = Agent::start(&n.agent_opts(cg.path(), &[]));
    assert_eq!(agent.status()["agent"]["mode"], "ebpf", "auto picks eBPF on this kernel");
    assert!(agent.log().contains("in place"), "the agent says it works in front of k0s's Envoy:\n{}", agent.log());

    for (vip, prefix) in [(n.k0s.api_vip(), "api-"), (n.k0s.konnectivity_vip(), "konn-")] {
        let r = run_client(&ClientOpts::new(vip, 30, Some(cg.path())));
        assert_eq!(r.ok_count(), 30, "{vip}: {:?}", r.failed());
        let by = r.by_body();
        assert_eq!(by.len(), 3, "{vip}: every controller serves: {by:?}");
        assert!(by.keys().all(|b| b.starts_with(prefix)), "{vip}: the right service: {by:?}");
        for x in &r.results {
            assert!(direct(x), "{vip}: the controller must see the client, not Envoy: {x:?}");
            assert_eq!(x.peer.as_deref(), Some(vip.to_string().as_str()), "getpeername shows the virtual address");
        }
        assert_eq!(n.k0s.downstream_connections(vip), 0, "{vip}: k0s's Envoy must not see a connection");
    }

    // The counter is real: a process outside nllb's cgroup still goes
    // through k0s's Envoy on the same address.
    let outside = TestCgroup::new();
    let vip = n.k0s.api_vip();
    let r = run_client(&ClientOpts::new(vip, 10, Some(outside.path())));
    assert_eq!(r.ok_count(), 10, "{:?}", r.failed());
    assert!(r.results.iter().all(|x| !direct(x)), "outside the cgroup Envoy connects on the client's behalf");
    let counted = wait_for(Duration::from_secs(5), || (n.k0s.downstream_connections(vip) == 10).then_some(()));
    assert!(counted.is_some(), "Envoy counts the 10 connects: {}", n.k0s.downstream_connections(vip));
}

/// Connects of the uninstall test: one every 10 ms for 4 s.
const UNINSTALL_CONNECTS: u32 = 400;

#[test]
fn uninstall_under_load_hands_connects_back_to_k0s_envoy_without_a_failure() {
    let Some(n) = Node::start(3, HealthPace::AsK0s) else { return };
    let cg = TestCgroup::new();
    let mut agent = Agent::start(&n.agent_opts(cg.path(), &[]));
    let vip = n.k0s.api_vip();
    let mut opts = ClientOpts::new(vip, UNINSTALL_CONNECTS, Some(cg.path()));
    opts.interval = Duration::from_millis(10);
    opts.timeout = Duration::from_secs(2);
    let client = opts.spawn();

    // Connects flow through nllb (controllers count them, Envoy does not).
    let flowing =
        |at_least: u64| wait_for(Duration::from_secs(10), || (n.served_by_controllers() >= at_least).then_some(()));
    assert!(flowing(50).is_some(), "the client's connects must reach the controllers");
    assert_eq!(n.k0s.downstream_connections(vip), 0);
    // The agent goes first (a DaemonSet deleted, a unit stopped): the
    // pinned datapath keeps steering.
    let exit = agent.stop(Duration::from_secs(10)).expect("agent exit status");
    assert!(exit.success(), "SIGTERM: exit 0, got {exit:?}");
    let before_uninstall = n.served_by_controllers();
    assert!(flowing(before_uninstall + 30).is_some(), "connects continue after the agent exited");
    assert_eq!(n.k0s.downstream_connections(vip), 0, "still steered by the pinned programs");
    // Then the datapath.
    let out = agent.nllb(&["uninstall"]);
    assert!(out.status.success(), "nllb uninstall: {}", String::from_utf8_lossy(&out.stderr));
    assert!(nllb_tests::attached_programs(cg.path()).is_empty(), "nothing stays attached");
    let moved = wait_for(Duration::from_secs(10), || (n.k0s.downstream_connections(vip) >= 30).then_some(()));
    assert!(moved.is_some(), "connects must land on k0s's Envoy after uninstall");

    let r = wait_client(client);
    assert!(r.failed().is_empty(), "no connect may fail across the hand-over: {:?}", r.failed());
    // One clean switch: every direct connect came before every proxied one.
    let last_direct = r.results.iter().filter(|x| direct(x)).map(|x| x.t_ms).max();
    let first_proxied = r.results.iter().filter(|x| !direct(x)).map(|x| x.t_ms).min();
    let (Some(last_direct), Some(first_proxied)) = (last_direct, first_proxied) else {
        panic!("both phases must show: {:?}", r.results.first());
    };
    assert!(last_direct <= first_proxied, "direct until {last_direct} ms, proxied from {first_proxied} ms");
    eprintln!(
        "uninstall under load: {} connects, 0 failed; direct until {last_direct} ms, through k0s's Envoy from {first_proxied} ms",
        r.results.len()
    );
}

// ---------------------------------------------------------------------
// Failover: nllb next to k0s's Envoy alone, same run, same fault.
// ---------------------------------------------------------------------

/// One connect per client every 20 ms.
const FAILOVER_INTERVAL: Duration = Duration::from_millis(20);
/// Long enough for k0s's Envoy to eject the controller (5 failed checks 5 s
/// apart + the 1 s timeout ≈ 21–26 s) and show it stopped failing.
const FAILOVER_WINDOW: Duration = Duration::from_secs(30);
/// The clients' connect (and read) timeout. client-go dials with 30 s; a
/// shorter one keeps the test short and caps "longest wait" at it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Killed (refused) controller, nllb: passive ejection after the first RST
/// and probes within ~1 s; today 0–2 fail.
const NLLB_KILLED_MAX_FAILED: usize = 5;
const NLLB_KILLED_MAX_WAIT: Duration = Duration::from_secs(2);
/// Vanished (blackholed) controller, nllb: a connect that picked it before
/// the first SYN retransmit (~1 s) waits for the client's timeout; today 1–3
/// fail. The lead's SYN-timeout work shortens the wait.
const NLLB_VANISHED_MAX_FAILED: usize = 10;
const NLLB_VANISHED_MAX_WAIT: Duration = Duration::from_secs(4);
/// Sanity of the peer: k0s's Envoy picks the dead controller at random until
/// its health checks eject it, so some connects through it fail.
const K0S_MIN_FAILED: usize = 1;

#[derive(Debug)]
struct Figures {
    connects: usize,
    failed: usize,
    failed_before_fault: usize,
    /// The slowest connect (connect + request) started after the fault.
    longest_wait: Duration,
    /// When the last failed connect started, after the fault.
    last_failure: Option<Duration>,
}

/// `fault_unix_ms`: when the fault was inflicted (wall clock).
fn figures(r: &ClientReport, fault_unix_ms: u64) -> Figures {
    assert!(r.started_unix_ms > 0 && r.started_unix_ms <= fault_unix_ms, "client start {} ms", r.started_unix_ms);
    let fault_us = r.t_ms_of(fault_unix_ms) * 1000;
    let fault_ms = fault_us / 1000;
    // A connect belongs to the fault when it ended after it: one that started
    // just before a kill and was waiting for its answer fails because of it.
    // Its start (`t_ms`) and the client's start are whole milliseconds, so
    // its end is known to ±2 ms; a reset from a killed Envoy upstream comes
    // within a millisecond of the kill. 10 ms of slack keeps those after it.
    let ended_us = |x: &&ConnectResult| x.t_ms * 1000 + x.elapsed_us + 10_000;
    let (after, before): (Vec<_>, Vec<_>) = r.results.iter().partition(|x| ended_us(x) >= fault_us);
    Figures {
        connects: r.results.len(),
        failed: after.iter().filter(|x| !x.ok).count(),
        failed_before_fault: before.iter().filter(|x| !x.ok).count(),
        longest_wait: Duration::from_micros(after.iter().map(|x| x.elapsed_us).max().unwrap_or(0)),
        last_failure: after.iter().filter(|x| !x.ok).map(|x| Duration::from_millis(x.t_ms.saturating_sub(fault_ms))).max(),
    }
}

/// The same fault seen by a client steered by nllb and by one going through
/// k0s's Envoy, both running at once. Each client connects one after the
/// other: while a connect waits for a vanished controller it makes no other,
/// so a node with many concurrent connects loses more of them in that first
/// second than the figures show (about a third of those it makes).
fn compare(fault: &str, inflict: impl FnOnce(&mut Node)) -> (Figures, Figures) {
    let mut n = Node::start(3, HealthPace::SteadyState).expect("the caller checked root and Envoy");
    let (nllb_cg, k0s_cg) = (TestCgroup::new(), TestCgroup::new());
    let _agent = Agent::start(&n.agent_opts(nllb_cg.path(), &[]));
    let vip = n.k0s.api_vip();
    let count = (FAILOVER_WINDOW.as_millis() / FAILOVER_INTERVAL.as_millis()) as u32;
    let client = |cg: &TestCgroup| {
        let mut o = ClientOpts::new(vip, count, Some(cg.path()));
        o.interval = FAILOVER_INTERVAL;
        o.timeout = CLIENT_TIMEOUT;
        o.spawn()
    };
    let (a, b) = (client(&nllb_cg), client(&k0s_cg));
    // Both clients are under way before the fault.
    let flowing = wait_for(Duration::from_secs(10), || {
        (n.served_by_controllers() >= 60 && n.k0s.downstream_connections(vip) >= 20).then_some(())
    });
    assert!(flowing.is_some(), "{fault}: both clients must be connecting before the fault");
    let fault_unix_ms = unix_ms();
    inflict(&mut n);
    let (ra, rb) = (wait_client(a), wait_client(b));
    (figures(&ra, fault_unix_ms), figures(&rb, fault_unix_ms))
}

#[test]
fn killed_then_vanished_controller_nllb_next_to_k0s_envoy_alone() {
    if !privileged() || nllb_tests::envoy_binary().is_none() {
        return;
    }
    let killed = compare("killed", |n| n.api[0].stop());
    let vanished = compare("vanished", |n| n.net.hosts()[0].blackhole());

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    eprintln!(
        "\nk0s NLLB vs nllb in place (kernel {}): 3 controllers, one connect every {} ms per client for {} s, \
         client timeout {} s, connects one after the other; the fault hits controller 0 once both clients \
         are connecting (about 1 s in)",
        kernel.trim(),
        FAILOVER_INTERVAL.as_millis(),
        FAILOVER_WINDOW.as_secs(),
        CLIENT_TIMEOUT.as_secs()
    );
    eprintln!(
        "| fault | path | connects | failed | longest wait | last failure after the fault |\n|---|---|---:|---:|---:|---:|"
    );
    for (fault, (nllb, k0s)) in [("killed", &killed), ("vanished", &vanished)] {
        for (path, f) in [("nllb in place (eBPF)", nllb), ("k0s NLLB (Envoy) alone", k0s)] {
            eprintln!(
                "| {fault} | {path} | {} | {} | {} ms | {} |",
                f.connects,
                f.failed,
                f.longest_wait.as_millis(),
                f.last_failure.map_or("none failed".into(), |d| format!("{:.2} s", d.as_secs_f64()))
            );
        }
    }

    for (fault, (nllb, k0s)) in [("killed", &killed), ("vanished", &vanished)] {
        assert_eq!(
            (nllb.failed_before_fault, k0s.failed_before_fault),
            (0, 0),
            "{fault}: nothing fails before the fault"
        );
        assert!(
            k0s.failed >= K0S_MIN_FAILED,
            "{fault}: k0s's Envoy must have the dead controller in rotation: {k0s:?}"
        );
        assert!(
            nllb.failed <= k0s.failed,
            "{fault}: nllb must not lose more connects than k0s's Envoy: {nllb:?} vs {k0s:?}"
        );
    }
    let (nllb, _) = &killed;
    assert!(nllb.failed <= NLLB_KILLED_MAX_FAILED, "killed: {nllb:?}");
    assert!(nllb.longest_wait <= NLLB_KILLED_MAX_WAIT, "killed: {nllb:?}");
    let (nllb, _) = &vanished;
    assert!(nllb.failed <= NLLB_VANISHED_MAX_FAILED, "vanished: {nllb:?}");
    assert!(nllb.longest_wait <= NLLB_VANISHED_MAX_WAIT, "vanished: {nllb:?}");
}

// ---------------------------------------------------------------------
// Auto mode where the eBPF datapath cannot run: stand aside.
// ---------------------------------------------------------------------

/// Children of `pid` (every thread's).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn auto_mode_stands_aside_when_k0s_envoy_serves_and_ebpf_cannot_attach() {
    let Some(n) = Node::start(1, HealthPace::AsK0s) else { return };
    // A directory that is not a cgroup v2 directory: the kernel datapath
    // cannot attach there, as on a node without it (modes.rs does the same
    // for the Envoy fallback). nllb's own Envoy is available
    // (NLLB_ENVOY_BINARY): it must still not start one.
    let not_cgroup = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&n.agent_opts(not_cgroup.path(), &["--mode", "auto"]));
    let pid = agent.pid().unwrap();
    let k0s_pid = n.k0s.pid();
    let (api, konn) = (n.k0s.api_vip(), n.k0s.konnectivity_vip());
    let v6 = |a: SocketAddr| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()));

    // The log says so, with the reason and who serves.
    let log = agent.log();
    for needle in ["standing aside", "not a cgroup v2 directory", &format!("envoy (pid {k0s_pid})"), &api.to_string()] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }

    // nllb status: mode aside, who serves what, exit 0 (the node is served).
    let out = agent.nllb(&["status", "--json"]);
    assert!(out.status.success(), "nllb status exits 0 standing aside: {}", String::from_utf8_lossy(&out.stdout));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["agent"]["mode"], "aside", "{status:#}");
    assert_eq!(status["datapath_installed"], false, "nllb installed nothing: {status:#}");
    let aside = &status["agent"]["extra"]["aside"];
    let served: Vec<(String, u64, String)> = aside["served_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["vip"].as_str().unwrap().to_string(),
                s["pid"].as_u64().unwrap_or(0),
                s["process"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let want: Vec<(String, u64, String)> =
        [api, konn].iter().map(|a| (a.to_string(), u64::from(k0s_pid), "envoy".to_string())).collect();
    assert_eq!(served, want, "{aside:#}");
    let not_served: Vec<&str> = aside["not_served"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(not_served, [v6(api).to_string(), v6(konn).to_string()], "k0s binds one family only: {aside:#}");
    let text = String::from_utf8_lossy(&agent.nllb(&["status"]).stdout).into_owned();
    assert!(text.contains("mode aside") && text.contains(&format!("envoy (pid {k0s_pid})")), "{text}");
    let aside_lines: Vec<&str> = log.lines().filter(|l| l.contains("aside")).collect();
    eprintln!("--- agent log (aside) ---\n{}\n--- nllb status ---\n{text}", aside_lines.join("\n"));
    let (code, metrics) = agent.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("nllb_datapath_mode{mode=\"aside\"} 1"), "{metrics}");

    // No second Envoy, nothing bound: the agent has no children, listens on
    // none of the virtual addresses, and k0s's Envoy is the only server.
    assert!(children(pid).is_empty(), "the agent must start nothing: children {:?}", children(pid));
    let own = nllb::envoy::listeners::listening_sockets(pid).unwrap();
    for vip in [api, konn, v6(api), v6(konn)] {
        assert!(!own.contains(&vip), "the agent must not bind {vip}: {own:?}");
    }
    let (by, _) = nllb::stand_aside::who_serves(&[api, konn], &nllb::stand_aside::listeners());
    assert!(by.iter().all(|b| b.pid == Some(k0s_pid)), "{by:?}");

    // The node keeps working through k0s's Envoy.
    let r = run_client(&ClientOpts::new(api, 5, None));
    assert_eq!(r.ok_count(), 5, "{:?}", r.failed());
    assert!(r.results.iter().all(|x| !direct(x)), "through k0s's Envoy");

    let exit = agent.stop(Duration::from_secs(10)).expect("exit status");
    assert!(exit.success(), "SIGTERM in mode aside: exit 0, got {exit:?}");
    assert!(!agent.run_dir.join("status.json").exists(), "the status file goes with the agent");
}
