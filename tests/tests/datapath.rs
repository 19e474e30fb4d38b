//! End-to-end tests of the in-kernel datapath: the real `nllb` binary, real
//! programs attached to a child cgroup, real connects from a process in it
//! to controller hosts in network namespaces.

use std::{net::SocketAddr, time::Duration};

use nllb_tests::{
    Agent, AgentOpts, ClientOpts, NLLB_PROGRAMS, Netns, TestCgroup, TestNet, attached_programs, free_port,
    one_service_config, privileged, run_client, vip4,
};

const BACKEND_PORT: u16 = 6443;

fn start(net: &TestNet, cg: &TestCgroup, listen: &[&str], extra: &str) -> Agent {
    let backends: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
    Agent::start(&AgentOpts {
        config_yaml: one_service_config(listen, BACKEND_PORT, &backends, extra),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    })
}

#[test]
fn connects_reach_every_backend_and_getpeername_shows_the_vip() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(3);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let cg = TestCgroup::new();
    let port = free_port();
    let agent = start(&net, &cg, &[&vip4(port).to_string()], "");

    let report = run_client(&ClientOpts::new(vip4(port), 90, Some(cg.path())));
    assert_eq!(report.ok_count(), 90, "every connect must succeed: {:?}", report.failed());
    let by = report.by_body();
    assert_eq!(by.len(), 3, "all three controllers must be used: {by:?}");
    for (name, n) in &by {
        assert!(*n >= 10, "random choice should spread 90 connects: {name} got {n}");
    }
    // The application sees the address it dialed, not the controller's.
    for r in &report.results {
        assert_eq!(r.peer.as_deref(), Some(vip4(port).to_string().as_str()));
    }
    // The per-backend counters saw every connect.
    let status = agent.status();
    let backends = status["services"][0]["backends"].as_array().unwrap();
    let total: u64 = backends.iter().map(|b| b["connects"].as_u64().unwrap()).sum();
    assert_eq!(total, 90, "{status}");
}

#[test]
fn ipv6_vip_reaches_ipv6_backends() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(2);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "v6-controller-");
    let cg = TestCgroup::new();
    let port = free_port();
    let backends: Vec<_> = net.hosts().iter().map(|h| h.v6).collect();
    let _agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&format!("[::1]:{port}")], BACKEND_PORT, &backends, ""),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    let addr: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let report = run_client(&ClientOpts::new(addr, 30, Some(cg.path())));
    assert_eq!(report.ok_count(), 30, "{:?}", report.failed());
    assert_eq!(report.by_body().len(), 2, "{:?}", report.by_body());
    assert!(report.results.iter().all(|r| r.peer.as_deref() == Some(addr.to_string().as_str())));
}

#[test]
fn ipv4_mapped_vip_on_an_ipv6_socket_is_rewritten() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let _s = net.hosts()[0].serve(BACKEND_PORT, "mapped-controller");
    let cg = TestCgroup::new();
    let port = free_port();
    let _agent = start(&net, &cg, &[&vip4(port).to_string()], "");
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{port}").parse().unwrap();
    let report = run_client(&ClientOpts::new(mapped, 5, Some(cg.path())));
    assert_eq!(report.ok_count(), 5, "{:?}", report.failed());
    assert_eq!(report.by_body().get("mapped-controller"), Some(&5));
    assert!(report.results.iter().all(|r| r.peer.as_deref() == Some(mapped.to_string().as_str())));
}

#[test]
fn processes_outside_the_cgroup_and_other_addresses_are_untouched() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(2);
    let _servers: Vec<_> = net.serve_all(BACKEND_PORT, "controller-");
    let cg = TestCgroup::new();
    let port = free_port();
    // A real listener on the virtual address in the root namespace: what a
    // process that nllb does not steer reaches.
    let local = std::net::TcpListener::bind(vip4(port)).unwrap();
    let local_thread = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for conn in local.incoming().take(3) {
            let mut c = conn.unwrap();
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlocal");
        }
    });
    let _agent = start(&net, &cg, &[&vip4(port).to_string()], "");

    // Outside the cgroup: the real loopback listener answers.
    let outside = run_client(&ClientOpts::new(vip4(port), 3, None));
    assert_eq!(outside.by_body().get("local"), Some(&3), "{:?}", outside.results);
    local_thread.join().unwrap();

    // Inside the cgroup, a connect straight to one controller goes there.
    let direct = SocketAddr::new(net.hosts()[1].v4, BACKEND_PORT);
    let inside = run_client(&ClientOpts::new(direct, 10, Some(cg.path())));
    assert_eq!(inside.by_body().get("controller-1"), Some(&10), "{:?}", inside.results);
    assert!(inside.results.iter().all(|r| r.peer.as_deref() == Some(direct.to_string().as_str())));
    // Same port, other loopback address: not a virtual address, not touched.
    let other = SocketAddr::from(([127, 0, 0, 2], port));
    let untouched = run_client(&ClientOpts::new(other, 1, Some(cg.path())));
    assert_eq!(untouched.results[0].errno, Some(libc::ECONNREFUSED), "{:?}", untouched.results);
}

#[test]
fn service_without_backends_is_refused_at_once() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new();
    let port = free_port();
    let agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(port).to_string(), &format!("[::1]:{port}")], BACKEND_PORT, &[], ""),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    for addr in [vip4(port), format!("[::1]:{port}").parse().unwrap()] {
        let report = run_client(&ClientOpts::new(addr, 5, Some(cg.path())));
        for r in &report.results {
            assert_eq!(r.errno, Some(libc::ECONNREFUSED), "{r:?}");
            // Immediate: far below the first SYN retransmit (1 s) that a
            // connect sent anywhere would wait for.
            let bound = nllb_tests::scaled(std::time::Duration::from_millis(300));
            assert!(r.elapsed_us < bound.as_micros() as u64, "refusal must be immediate, took {} us", r.elapsed_us);
        }
    }
    let status = agent.status();
    assert_eq!(status["services"][0]["no_backend_refusals"].as_u64(), Some(10), "{status}");
}

/// `passive.synRetries` is the kernel's own cap, not the agent's: with the
/// agent killed (its programs stay attached and pinned), a connect to a
/// controller that stopped answering fails with ETIMEDOUT after the capped
/// retransmissions. With a 200 ms SYN timeout and 2 retries the kernel gives
/// up after ~1.4 s; with the system's 6 it waits ~27 s (measured on 6.18 with
/// `synRetries: 0`; ~25 s without linear SYN timeouts), so the bound tells
/// the two apart with room for a slow guest.
#[test]
fn without_the_agent_the_kernel_gives_up_on_a_silent_controller_after_syn_retries() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let _servers = net.serve_all(BACKEND_PORT, "controller-");
    let cg = TestCgroup::new();
    let port = free_port();
    let mut agent = start(&net, &cg, &[&vip4(port).to_string()], "passive:\n  synTimeout: 200ms\n  synRetries: 2\n");
    let published = nllb_tests::wait_for(Duration::from_secs(10), || {
        let ok = run_client(&ClientOpts::new(vip4(port), 1, Some(cg.path()))).ok_count() == 1;
        let s = agent.status();
        (ok && s["agent"]["passive"][0]["syn_timeout_ms"].as_u64() == Some(200)).then_some(())
    });
    assert!(published.is_some(), "backend and its SYN timeout never published: {}", agent.status());
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(agent.wait_exit(Duration::from_secs(5)).is_some(), "the agent did not die");
    net.hosts()[0].blackhole();
    let mut opts = ClientOpts::new(vip4(port), 1, Some(cg.path()));
    opts.timeout = Duration::from_secs(30);
    let report = run_client(&opts);
    let r = &report.results[0];
    println!("MEASURE syn-retries-cap elapsed_ms={} errno={:?}", r.elapsed_us / 1000, r.errno);
    assert_eq!(r.errno, Some(libc::ETIMEDOUT), "the kernel, not the client, must end the connect: {r:?}");
    assert!(
        r.elapsed_us < 6_000_000,
        "the kernel gave up only after {} ms: synRetries not applied",
        r.elapsed_us / 1000
    );
}

#[test]
fn pod_network_namespaces_are_untouched_when_host_network_only() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let _s = net.hosts()[0].serve(BACKEND_PORT, "controller");
    let port = free_port();
    let pod = Netns::new("nllbpod");
    let _pod_local = pod.serve(port, "pod-local");

    for (host_only, expected) in [(true, "pod-local"), (false, "controller")] {
        let cg = TestCgroup::new();
        let _agent = start(&net, &cg, &[&vip4(port).to_string()], &format!("hostNetworkOnly: {host_only}\n"));
        let mut opts = ClientOpts::new(vip4(port), 4, Some(cg.path()));
        opts.netns = Some(pod.name.clone());
        let report = if host_only {
            run_client(&opts)
        } else {
            // The pod cannot route to the controller, so the rewritten
            // connect proves itself by timing out instead of reaching
            // the pod's own listener.
            opts.timeout = Duration::from_millis(300);
            opts.count = 1;
            run_client(&opts)
        };
        if host_only {
            assert_eq!(report.by_body().get(expected), Some(&4), "{:?}", report.results);
        } else {
            assert!(!report.by_body().contains_key("pod-local"), "pod connect was not rewritten: {:?}", report.results);
            assert!(!report.results[0].ok);
        }
        // A host-network process in the same cgroup is always rewritten.
        let host = run_client(&ClientOpts::new(vip4(port), 2, Some(cg.path())));
        assert_eq!(host.by_body().get("controller"), Some(&2), "{:?}", host.results);
    }
}

#[test]
fn bad_config_exits_2_and_attaches_nothing() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new();
    let cases = [
        ("services:\n  - name: a\n    listen: [\"10.1.1.1:7443\"]\n    backendPort: 6443\n", "services[0].listen[0]"),
        ("services:\n  - name: a\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 6443\nbogus: 1\n", "bogus"),
        (
            "services:\n  - name: a\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 6443\nbackends: [\"127.0.0.9\"]\n",
            "backends[0]",
        ),
    ];
    for (yaml, field) in cases {
        let mut agent = Agent::spawn(&AgentOpts {
            config_yaml: yaml.into(),
            cgroup: cg.path().to_path_buf(),
            ..Default::default()
        });
        let status = agent.wait_exit(Duration::from_secs(10)).expect("agent must exit on a bad config");
        assert_eq!(status.code(), Some(2), "{}", agent.log());
        assert!(agent.log().contains(field), "error must name `{field}`: {}", agent.log());
        assert!(!agent.pin_path.exists(), "nothing may be pinned");
        assert!(attached_programs(cg.path()).is_empty(), "nothing may be attached");
    }
    // A bad flag too: with the eBPF datapath asked for, a --cgroup that is
    // not cgroup v2 (in auto mode that falls back to Envoy instead).
    let mut agent = Agent::spawn(&AgentOpts {
        config_yaml: one_service_config(&["127.0.0.1:7443"], 6443, &[], ""),
        cgroup: std::env::temp_dir(),
        extra_args: vec!["--mode".into(), "ebpf".into()],
        ..Default::default()
    });
    let status = agent.wait_exit(Duration::from_secs(10)).expect("agent must exit on a bad flag");
    assert_eq!(status.code(), Some(2), "{}", agent.log());
    assert!(agent.log().contains("--cgroup"), "{}", agent.log());
    assert!(!agent.pin_path.exists());
}

#[test]
fn with_detach_on_exit_sigint_and_sigterm_leave_nothing_attached_or_pinned() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let _s = net.hosts()[0].serve(BACKEND_PORT, "controller");
    for sig in [nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGTERM] {
        let cg = TestCgroup::new();
        let port = free_port();
        let backends: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
        let mut agent = Agent::start(&AgentOpts {
            config_yaml: one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &backends, ""),
            cgroup: cg.path().to_path_buf(),
            extra_args: vec!["--detach-on-exit".into()],
            ..Default::default()
        });
        assert_eq!(
            attached_programs(cg.path()).len(),
            NLLB_PROGRAMS,
            "connect4/6, getpeername4/6, sock_ops: {:?}",
            attached_programs(cg.path())
        );
        assert!(agent.pin_path.join("NLLB_VIPS4").exists());
        agent.signal(sig);
        let status = agent.wait_exit(Duration::from_secs(10)).expect("agent must exit on a signal");
        assert_eq!(status.code(), Some(0), "{}", agent.log());
        assert!(attached_programs(cg.path()).is_empty(), "{sig}: programs still attached");
        assert!(!agent.pin_path.exists(), "{sig}: pins left behind");
        // And the virtual address is plain loopback again.
        let after = run_client(&ClientOpts::new(vip4(port), 1, Some(cg.path())));
        assert_eq!(after.results[0].errno, Some(libc::ECONNREFUSED));
    }
}
