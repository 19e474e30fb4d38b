//! Security properties of the real agent on the real kernel:
//! - the pin directory and pins are root-only, and that is what stops an
//!   unprivileged user from rewriting the backend map (whoever can write it
//!   can redirect the node's API traffic);
//! - the agent works with exactly the documented capability set
//!   (`AGENT_CAPABILITIES`: BPF, NET_ADMIN, PERFMON, SYS_RESOURCE) and fails
//!   cleanly, leaving nothing behind, without the ones it needs.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use nllb_tests::{vip4, 
    AGENT_CAPABILITIES, Agent, AgentOpts, ClientOpts, NLLB_PROGRAMS, TestCgroup, TestNet, attached_programs, bpftool_cgroup_show,
    free_port, nllb_bin, one_service_config, privileged, run_client, unique_name,
};

const BACKEND_PORT: u16 = 6443;

/// The datapath's programs and the attach type `bpftool cgroup show` lists.
const PROGRAMS: [(&str, &str); 5] = [
    ("nllb_connect4", "cgroup_inet4_connect"),
    ("nllb_connect6", "cgroup_inet6_connect"),
    ("nllb_getpeername4", "cgroup_inet4_getpeername"),
    ("nllb_getpeername6", "cgroup_inet6_getpeername"),
    ("nllb_sock_ops", "cgroup_sock_ops"),
];
const NOBODY: &str = "65534";


/// Capability numbers from linux/capability.h.
fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("unknown capability {other}"),
    }
}

fn cap_mask(caps: &[&str]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << cap_bit(c))
}

/// A capability set line (`CapEff`, `CapBnd`) of /proc/<pid>/status.
fn proc_caps(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap();
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

/// A command prefix that runs the agent as root with only `caps`: the
/// bounding set caps what root gets at exec, and nothing is inherited.
fn with_only(caps: &[&str]) -> Vec<String> {
    let plus: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let bounding = if plus.is_empty() {
        "-all".to_string()
    } else {
        format!("-all,{}", plus.join(","))
    };
    [
        "setpriv",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        &format!("--bounding-set={bounding}"),
        "--",
    ]
    .into_iter()
    .map(str::to_string)
    .collect()
}

/// What `caps` gives a process started from this one: this test process
/// may itself lack some (a container's bounding set often has no
/// CAP_SYS_RESOURCE), and a child cannot get more.
fn grantable(caps: &[&str]) -> u64 {
    cap_mask(caps) & proc_caps("self", "CapBnd")
}

fn report_missing(caps: &[&str]) {
    let missing: Vec<&&str> = caps.iter().filter(|c| grantable(&[c]) == 0).collect();
    if !missing.is_empty() {
        eprintln!(
            "NOTE: this machine cannot grant {missing:?} (not in the test's bounding set); proving the rest"
        );
    }
}

/// Run a command as uid/gid nobody with no capabilities.
fn as_nobody(cmd: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(["--bounding-set=-all", "--", cmd])
        .args(args)
        .output()
        .expect("run setpriv (util-linux)")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn start_with(caps: &[&str], net: &TestNet, cg: &Path, port: u16) -> Agent {
    let backends: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
    Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &backends, ""),
        cgroup: cg.to_path_buf(),
        wrapper: with_only(caps),
        // aya logs what its feature probes found at debug level.
        env: vec![("RUST_LOG".into(), "info,aya::bpf=debug".into())],
        ..Default::default()
    })
}

/// The block aya logs after probing the kernel ("BPF Feature Detection:
/// Features { bpf_name: true, ... }"), without timestamps and colours.
fn aya_features(log: &str) -> String {
    let plain: String = {
        let mut out = String::new();
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for d in chars.by_ref() {
                    if d == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let start = plain
        .find("BPF Feature Detection")
        .expect("aya's feature detection is logged at debug");
    let block = &plain[start..];
    let end = block.find("\n}").expect("end of the Features block");
    block[..end].to_string()
}

#[test]
fn pins_are_root_only_and_nobody_cannot_rewrite_the_backends() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(2);
    let _servers: Vec<_> = net
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| h.serve(BACKEND_PORT, &format!("controller-{i}")))
        .collect();
    let cg = TestCgroup::new();
    let port = free_port();
    let backends: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
    let agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &backends, ""),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });

    let dir = std::fs::metadata(&agent.pin_path).unwrap();
    assert_eq!(dir.mode() & 0o7777, 0o700, "pin directory mode");
    assert_eq!((dir.uid(), dir.gid()), (0, 0), "pin directory owner");
    let mut pins = 0;
    for entry in std::fs::read_dir(&agent.pin_path).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        assert_eq!(
            meta.mode() & 0o7777,
            if meta.is_dir() { 0o700 } else { 0o600 },
            "{} mode",
            entry.path().display()
        );
        assert_eq!(meta.uid(), 0, "{} owner", entry.path().display());
        pins += 1;
    }
    assert!(pins >= 10, "maps and links are pinned: {pins}");

    let backends_pin = agent.pin_path.join("NLLB_CONFIG");
    let pin = backends_pin.to_str().unwrap();
    let before = map_value_hex(pin);
    // What an attacker would run. EACCES (file permissions), not EPERM
    // (capabilities), is the answer: the modes are the barrier.
    let mut update = vec![
        "map", "update", "pinned", pin, "key", "hex", "00", "00", "00", "00", "value", "hex",
    ];
    update.extend(before.iter().map(String::as_str));
    for (what, args) in [
        ("update the config map", update.clone()),
        ("read the config map", vec!["map", "dump", "pinned", pin]),
        (
            "detach the connect4 link",
            vec![
                "link",
                "detach",
                "pinned",
                &format!("{}/link_nllb_connect4", agent.pin_path.display()),
            ],
        ),
    ] {
        let out = as_nobody("bpftool", &args);
        assert!(!out.status.success(), "nobody could {what}: {}", text(&out));
        assert!(
            text(&out).contains("Permission denied"),
            "{what}: expected EACCES, got: {}",
            text(&out)
        );
    }
    assert_eq!(map_value_hex(pin), before, "the map must be unchanged");
    assert_eq!(
        attached_programs(cg.path()).len(),
        NLLB_PROGRAMS,
        "nothing was detached"
    );
    let report = run_client(&ClientOpts::new(vip4(port), 20, Some(cg.path())));
    assert_eq!(
        report.ok_count(),
        20,
        "still steering: {:?}",
        report.failed()
    );

    // Control: with the modes loosened, the same command as nobody goes
    // through. So the modes, not something else, stopped it above, and an
    // agent that forgot them would hand the node's API traffic to any user.
    let _restore = RestoreModes(vec![
        (agent.pin_path.clone(), 0o700),
        (backends_pin.clone(), 0o600),
    ]);
    std::fs::set_permissions(&agent.pin_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&backends_pin, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody("bpftool", &update);
    if text(&out).contains("Operation not permitted") {
        eprintln!(
            "NOTE: this kernel also gates bpf() on capabilities for nobody: {}",
            text(&out)
        );
    } else {
        assert!(
            out.status.success(),
            "control: nobody should reach a world-writable pin: {}",
            text(&out)
        );
    }
}

/// Pins outlive the agent, so whatever happened to them in between (an
/// operator's chmod, a tool that loosened them) is what the next agent
/// adopts: it must lock the directory again before it publishes.
#[test]
fn a_restarted_agent_locks_a_loosened_pin_directory_again() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let _s = net.hosts()[0].serve(BACKEND_PORT, "controller");
    let cg = TestCgroup::new();
    let port = free_port();
    let mut agent = start_with(&AGENT_CAPABILITIES, &net, cg.path(), port);
    agent.stop(Duration::from_secs(10)).expect("agent exits");
    let backends_pin = agent.pin_path.join("NLLB_CONFIG");
    std::fs::set_permissions(&agent.pin_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&backends_pin, std::fs::Permissions::from_mode(0o666)).unwrap();

    agent.restart(&[]);
    let mode = std::fs::metadata(&agent.pin_path).unwrap().mode() & 0o7777;
    assert_eq!(
        mode, 0o700,
        "the adopted pin directory must be root-only again"
    );
    let out = as_nobody(
        "bpftool",
        &["map", "dump", "pinned", backends_pin.to_str().unwrap()],
    );
    assert!(
        !out.status.success() && text(&out).contains("Permission denied"),
        "{}",
        text(&out)
    );
    let pin_mode = std::fs::metadata(&backends_pin).unwrap().mode() & 0o7777;
    if pin_mode != 0o600 {
        eprintln!(
            "NOTE: the adopted pin keeps mode {pin_mode:o}; the 0700 directory is what protects it"
        );
    }
    let report = run_client(&ClientOpts::new(vip4(port), 5, Some(cg.path())));
    assert_eq!(
        report.by_body().get("controller"),
        Some(&5),
        "{:?}",
        report.results
    );
}

/// Puts file modes back even when the test fails.
struct RestoreModes(Vec<(PathBuf, u32)>);

impl Drop for RestoreModes {
    fn drop(&mut self) {
        for (p, mode) in &self.0 {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(*mode));
        }
    }
}

/// Slot 0 of a pinned array map as bpftool hex bytes (without `0x`).
fn map_value_hex(pin: &str) -> Vec<String> {
    let out = Command::new("bpftool")
        .args([
            "-j", "map", "lookup", "pinned", pin, "key", "0", "0", "0", "0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool lookup: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().trim_start_matches("0x").to_string())
        .collect()
}

#[test]
fn agent_with_exactly_the_documented_capabilities_steers_and_uninstalls() {
    if !privileged() {
        return;
    }
    report_missing(&AGENT_CAPABILITIES);
    let net = TestNet::new(2);
    let _servers: Vec<_> = net
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| h.serve(BACKEND_PORT, &format!("controller-{i}")))
        .collect();
    let cg = TestCgroup::new();
    let port = free_port();
    let mut agent = start_with(&AGENT_CAPABILITIES, &net, cg.path(), port);

    let pid = agent.pid().unwrap().to_string();
    assert_eq!(
        proc_caps(&pid, "CapEff"),
        grantable(&AGENT_CAPABILITIES),
        "the agent must hold exactly the documented set (setpriv execs it, so the pid is the agent's)"
    );
    assert_eq!(
        proc_caps(&pid, "CapEff") & cap_mask(&["SYS_ADMIN"]),
        0,
        "no CAP_SYS_ADMIN"
    );
    assert_eq!(
        attached_programs(cg.path()).len(),
        NLLB_PROGRAMS,
        "all programs, passive health included: {}",
        agent.log()
    );
    assert!(
        !agent.log().contains("refused"),
        "no program may be refused: {}",
        agent.log()
    );
    // Nothing degrades silently: aya's kernel feature probes (program
    // names, BTF, global data, ...) find what they find as full root. Its
    // name probe loads a tracepoint program, which needs PERFMON.
    let root_cg = TestCgroup::new();
    let root_agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(
            &[&vip4(free_port()).to_string()],
            BACKEND_PORT,
            &[net.hosts()[0].v4],
            "",
        ),
        cgroup: root_cg.path().to_path_buf(),
        env: vec![("RUST_LOG".into(), "info,aya::bpf=debug".into())],
        ..Default::default()
    });
    assert_eq!(
        aya_features(&agent.log()),
        aya_features(&root_agent.log()),
        "feature probes differ from root's"
    );
    drop(root_agent);
    let listed = bpftool_cgroup_show(cg.path()).join("\n");
    for (prog, _) in PROGRAMS {
        assert!(
            listed.contains(prog),
            "bpftool shows {prog} by name: {listed}"
        );
    }

    let report = run_client(&ClientOpts::new(vip4(port), 40, Some(cg.path())));
    assert_eq!(report.ok_count(), 40, "{:?}", report.failed());
    assert_eq!(
        report.by_body().len(),
        2,
        "both controllers used: {:?}",
        report.by_body()
    );

    // The operator's tools work with the same set.
    let mut status = Command::new(with_only(&AGENT_CAPABILITIES)[0].clone());
    status
        .args(&with_only(&AGENT_CAPABILITIES)[1..])
        .arg(nllb_bin())
        .args(["status", "--json", "--pin-path"]);
    let out = status
        .arg(&agent.pin_path)
        .arg("--run-dir")
        .arg(&agent.run_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nllb status with the documented set: {}",
        text(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let connects: u64 = json["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["connects"].as_u64().unwrap())
        .sum();
    assert_eq!(connects, 40, "{json}");

    // The health endpoints the DaemonSet probes answer under the same set.
    assert_eq!(agent.http_get("/healthz").0, 200);
    assert_eq!(agent.http_get("/readyz").0, 200);

    // SIGTERM leaves the datapath steering (it outlives the agent), and
    // `nllb uninstall` with the same set removes it.
    let exit = agent.stop(Duration::from_secs(10)).expect("agent exits");
    assert_eq!(exit.code(), Some(0), "{}", agent.log());
    assert_eq!(
        attached_programs(cg.path()).len(),
        NLLB_PROGRAMS,
        "the datapath outlives the agent"
    );
    let mut uninstall = Command::new(with_only(&AGENT_CAPABILITIES)[0].clone());
    uninstall
        .args(&with_only(&AGENT_CAPABILITIES)[1..])
        .arg(nllb_bin())
        .args(["uninstall", "--pin-path"]);
    let out = uninstall.arg(&agent.pin_path).output().unwrap();
    assert!(
        out.status.success(),
        "nllb uninstall with the documented set: {}",
        text(&out)
    );
    assert!(
        attached_programs(cg.path()).is_empty(),
        "programs left attached"
    );
    assert!(!agent.pin_path.exists(), "pins left behind");
}

#[test]
fn without_bpf_or_net_admin_the_agent_fails_cleanly() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let cg = TestCgroup::new();
    // SYS_ADMIN stands in for BPF in the kernel's checks, so "no BPF"
    // means neither.
    for drop in ["BPF", "NET_ADMIN"] {
        let caps: Vec<&str> = AGENT_CAPABILITIES
            .into_iter()
            .filter(|c| *c != drop)
            .collect();
        let backends: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
        let mut agent = Agent::spawn(&AgentOpts {
            config_yaml: one_service_config(
                &[&vip4(free_port()).to_string()],
                BACKEND_PORT,
                &backends,
                "",
            ),
            cgroup: cg.path().to_path_buf(),
            wrapper: with_only(&caps),
            // Asked for the kernel datapath: no fallback to Envoy.
            extra_args: vec!["--mode".into(), "ebpf".into()],
            ..Default::default()
        });
        let exit = agent
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("without {drop} the agent must exit"));
        let log = agent.log();
        assert_eq!(
            exit.code(),
            Some(1),
            "without {drop}: a runtime failure, not a crash: {log}"
        );
        assert!(!log.contains("panicked"), "without {drop}: {log}");
        assert!(
            log.contains("Operation not permitted") || log.contains("missing privileges"),
            "without {drop}: the error must say what was refused: {log}"
        );
        assert!(log.contains("CAP_BPF"), "without {drop}: the error must name the capabilities: {log}");
        assert!(
            attached_programs(cg.path()).is_empty(),
            "without {drop}: nothing may stay attached"
        );
        assert!(
            !agent.pin_path.exists(),
            "without {drop}: nothing may stay pinned"
        );
        assert!(
            !agent.run_dir.join("status.json").exists(),
            "without {drop}: no status claiming a datapath"
        );
        if !log.contains("CAP_") {
            eprintln!(
                "NOTE: the error does not name the missing capability yet: {}",
                log.lines().last().unwrap_or("")
            );
        }
    }
}

/// Why CAP_PERFMON is in the set: the verifier gives perfmon-capable
/// loaders more leeway (pointer arithmetic the programs' logging does into
/// the ring buffer). Measured without it: 5.10 and 6.1 refuse connect4 (the
/// agent cannot start), this machine's 6.18 refuses sock_ops (passive
/// health is lost), 6.12 and 7.2 accept everything. Whatever the kernel
/// does, the agent must never lose a program silently: it either exits 1
/// with nothing attached, or names each refused program in its log.
#[test]
fn without_perfmon_no_program_is_lost_silently() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let _s = net.hosts()[0].serve(BACKEND_PORT, "controller");
    let cg = TestCgroup::new();
    let port = free_port();
    let caps: Vec<&str> = AGENT_CAPABILITIES
        .into_iter()
        .filter(|c| *c != "PERFMON")
        .collect();
    let backends: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
    let mut agent = Agent::spawn(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &backends, ""),
        cgroup: cg.path().to_path_buf(),
        wrapper: with_only(&caps),
        ..Default::default()
    });
    let ready = nllb_tests::wait_for(Duration::from_secs(20), || {
        agent.run_dir.join("status.json").exists().then_some(true)
    });
    if ready.is_none() {
        let exit = agent
            .wait_exit(Duration::from_secs(10))
            .expect("neither ready nor exited");
        assert_eq!(exit.code(), Some(1), "{}", agent.log());
        assert!(attached_programs(cg.path()).is_empty());
        assert!(!agent.pin_path.exists());
        eprintln!(
            "NOTE: without PERFMON this kernel refuses a required program; the agent exited 1 cleanly"
        );
        return;
    }
    let log = agent.log();
    if log.contains("falling back to Envoy") {
        // auto mode: a required program was refused, so nothing of the
        // datapath stays and the log names every refused program and the
        // capability set.
        assert!(attached_programs(cg.path()).is_empty(), "{log}");
        for needle in ["nllb_connect4", "CAP_PERFMON"] {
            assert!(log.contains(needle), "the fallback must name {needle}: {log}");
        }
        eprintln!("NOTE: without PERFMON this kernel refuses a required program; the agent fell back to Envoy");
    } else {
        // By attach type: without PERFMON aya's feature probes fail too, so
        // the programs are loaded without names.
        let attached = bpftool_cgroup_show(cg.path());
        for (prog, attach_type) in PROGRAMS {
            if !attached.iter().any(|l| l.split_whitespace().nth(1) == Some(attach_type)) {
                assert!(log.contains(prog), "{prog} is not attached and the log does not say so: {log}");
                eprintln!("NOTE: without PERFMON this kernel refuses {prog} (logged)");
            }
        }
    }
    // The rewrite itself works in every case where the agent started.
    let report = run_client(&ClientOpts::new(vip4(port), 5, Some(cg.path())));
    assert_eq!(report.ok_count(), 5, "{:?}", report.failed());
}

/// deploy/daemonset.yaml mounts the host's cgroup tree read-only and the
/// systemd unit sets ProtectControlGroups=yes: attaching must work through
/// a read-only view.
#[test]
fn attaching_needs_only_a_read_only_view_of_the_cgroup() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(1);
    let _s = net.hosts()[0].serve(BACKEND_PORT, "controller");
    let cg = TestCgroup::new();
    let ro = ReadOnlyBind::new(cg.path());
    assert!(
        std::fs::write(ro.path.join("cgroup.procs"), "0").is_err(),
        "the bind must be read-only"
    );
    let port = free_port();
    let _agent = start_with(&AGENT_CAPABILITIES, &net, &ro.path, port);
    assert_eq!(attached_programs(cg.path()).len(), NLLB_PROGRAMS);
    let report = run_client(&ClientOpts::new(vip4(port), 5, Some(cg.path())));
    assert_eq!(
        report.by_body().get("controller"),
        Some(&5),
        "{:?}",
        report.results
    );
}

/// A read-only bind mount of a directory, unmounted on drop.
struct ReadOnlyBind {
    path: PathBuf,
}

impl ReadOnlyBind {
    fn new(src: &Path) -> ReadOnlyBind {
        use nix::mount::{MsFlags, mount};
        let path = std::env::temp_dir().join(unique_name("nllb-ro-cgroup-"));
        std::fs::create_dir_all(&path).unwrap();
        let bind = ReadOnlyBind { path };
        mount(
            Some(src),
            &bind.path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount");
        mount(
            None::<&str>,
            &bind.path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .expect("remount read-only");
        bind
    }
}

impl Drop for ReadOnlyBind {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}
