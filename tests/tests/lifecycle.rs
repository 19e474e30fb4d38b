//! The datapath outlives the agent: exits, crashes, restarts and upgrades
//! never leave the virtual address without a program.

use std::time::Duration;

use nix::sys::signal::Signal;
use nllb_tests::{vip4, 
    Agent, AgentOpts, ClientOpts, NLLB_PROGRAMS, TestCgroup, TestNet, attached_programs, free_port, one_service_config, privileged,
    run_client, wait_client,
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

    // A steady client: one connect every 5 ms for ~6 s.
    let mut opts = ClientOpts::new(vip4(port), 1200, Some(cg.path()));
    opts.interval = Duration::from_millis(5);
    let client = opts.spawn();

    std::thread::sleep(Duration::from_millis(700));
    agent.signal(Signal::SIGKILL);
    assert!(agent.wait_exit(Duration::from_secs(5)).is_some());
    std::thread::sleep(Duration::from_millis(700));
    agent.restart(&[]);
    assert!(agent.log().contains("adopting the pinned datapath"), "{}", agent.log());
    std::thread::sleep(Duration::from_millis(700));
    // An upgrade to a build with another map layout: the old agent stops
    // (keeping the datapath), the new one swaps programs and maps in place.
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(5)).is_some());
    agent.restart(&[("NLLB_LAYOUT_VERSION", "999")]);
    assert!(agent.log().contains("replacing a pinned datapath of another layout"), "{}", agent.log());

    let report = wait_client(client);
    assert_eq!(report.results.len(), 1200);
    assert!(report.failed().is_empty(), "{} connects failed: {:?}", report.failed().len(), &report.failed()[..report.failed().len().min(5)]);
    assert_eq!(report.by_body().len(), 2);
    assert_eq!(attached_programs(cg.path()).len(), NLLB_PROGRAMS, "exactly one set of programs after the upgrade");
    // The new maps are the pinned ones: status reads counters from them.
    let after = run_client(&ClientOpts::new(vip4(port), 10, Some(cg.path())));
    assert_eq!(after.ok_count(), 10, "{:?}", after.failed());
    let status = agent.status();
    let total: u64 = status["services"][0]["backends"].as_array().unwrap().iter().map(|b| b["connects"].as_u64().unwrap()).sum();
    assert!(total >= 10, "{status}");
}
