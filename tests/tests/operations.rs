//! What an operator touches: live reload, metrics and health endpoints,
//! and the pinned maps as bpftool shows them.

use std::{process::Command, time::Duration};

use nix::sys::signal::Signal;
use nllb_tests::{
    Agent, AgentOpts, ClientOpts, TestCgroup, TestNet, free_port, one_service_config, privileged, run_client,
    stop_client, vip4, wait_for,
};

const BACKEND_PORT: u16 = 6443;

#[test]
fn config_changes_apply_live_and_bad_ones_are_rejected() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(3);
    let _s: Vec<_> = net.serve_all(BACKEND_PORT, "c");
    let h: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
    let cg = TestCgroup::new();
    let port = free_port();
    let agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &h[..1], ""),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    // Connects every 5 ms until stopped, across both edits.
    let mut opts = ClientOpts::new(vip4(port), u32::MAX, Some(cg.path()));
    opts.interval = Duration::from_millis(5);
    let client = opts.spawn();

    // The client's first connects all go to c0 (counted by the kernel).
    agent.wait_connects(25, Duration::from_secs(10));
    let before_edit = agent.connects() as usize;
    // File edit (like a ConfigMap update): new backends and a second service.
    let port2 = free_port();
    let two_services = format!(
        "{}  - name: konnectivity\n    listen: [\"{}\"]\n    backendPort: {BACKEND_PORT}\n",
        one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &h[1..], "").replace("backends:", "backends_:"),
        vip4(port2)
    )
    .replace("backends_:", "backends:");
    // Services come first in the generated YAML; keep `backends` after them.
    let yaml = reorder_backends_last(&two_services);
    agent.write_config(&yaml);
    // Applied once the status file shows the new backends published; every
    // connect the kernel counts from then on must go to them.
    let new_backends: std::collections::BTreeSet<String> =
        h[1..].iter().map(|ip| format!("{ip}:{BACKEND_PORT}")).collect();
    let applied = wait_for(Duration::from_secs(10), || {
        let s = agent.status();
        let published: std::collections::BTreeSet<String> = s["agent"]["services"][0]["published_backends"]
            .as_array()?
            .iter()
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect();
        (published == new_backends).then_some(())
    });
    assert!(applied.is_some(), "{}", agent.log());
    // Connects counted for the new backends alone (the removed one's
    // counter left the status with it): all made after the switch.
    let moved_by = agent.connects() as usize;
    let k = run_client(&ClientOpts::new(vip4(port2), 10, Some(cg.path())));
    assert_eq!(k.ok_count(), 10, "the added service works at once: {:?}", k.failed());

    // A bad edit is rejected and the running config stays.
    agent.write_config("services: [ {name: BAD} ]\n");
    let rejected = wait_for(Duration::from_secs(5), || agent.log().contains("reload rejected").then_some(()));
    assert!(rejected.is_some(), "{}", agent.log());
    agent.wait_connects(25, Duration::from_secs(10));

    let report = stop_client(client);
    assert!(
        report.failed().is_empty(),
        "{} connects failed during reloads: {:?}",
        report.failed().len(),
        report.failed()
    );
    // The client connects one after another: its results are in time
    // order. The switch to the new backends happens once, after the edit,
    // and for good: c0 up to some connect, then only c1 and c2, and more
    // than the connects made before the new set was confirmed published.
    let bodies: Vec<&str> = report.results.iter().map(|r| r.body.as_deref().unwrap_or("")).collect();
    let switch = bodies.iter().position(|b| *b != "c0").expect("traffic never moved to the new backends");
    assert!(switch >= before_edit, "moved at connect {switch}, before the edit (connect {before_edit})");
    assert!(bodies[switch..].iter().all(|b| matches!(*b, "c1" | "c2")), "traffic moved to the new backends for good");
    assert!(
        bodies.len() - switch > moved_by,
        "connects after the switch: {} of {}",
        bodies.len() - switch,
        bodies.len()
    );

    // SIGHUP reloads too.
    agent.write_config(&one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &h[2..], ""));
    agent.signal(Signal::SIGHUP);
    let moved = wait_for(Duration::from_secs(5), || {
        let r = run_client(&ClientOpts::new(vip4(port), 5, Some(cg.path())));
        (r.by_body().get("c2") == Some(&5)).then_some(())
    });
    assert!(moved.is_some(), "{}", agent.log());
}

fn reorder_backends_last(yaml: &str) -> String {
    let (mut head, mut tail) = (String::new(), String::new());
    for line in yaml.lines() {
        if line.starts_with("backends:") {
            tail.push_str(line);
            tail.push('\n');
        } else {
            head.push_str(line);
            head.push('\n');
        }
    }
    head + &tail
}

#[test]
fn metrics_healthz_and_readyz() {
    if !privileged() {
        return;
    }
    let net = TestNet::new(2);
    let _s: Vec<_> = net.serve_all(BACKEND_PORT, "c");
    let h: Vec<_> = net.hosts().iter().map(|h| h.v4).collect();
    let cg = TestCgroup::new();
    let port = free_port();
    let agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &h, ""),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    assert!(agent.metrics_addr().ip().is_loopback());
    let report = run_client(&ClientOpts::new(vip4(port), 40, Some(cg.path())));
    assert_eq!(report.ok_count(), 40);
    assert_eq!(agent.http_get("/healthz").0, 200);
    assert_eq!(agent.http_get("/readyz").0, 200);
    let counted = wait_for(Duration::from_secs(3), || {
        let (code, text) = agent.http_get("/metrics");
        assert_eq!(code, 200);
        let total: u64 = text
            .lines()
            .filter(|l| l.starts_with("nllb_connects_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        (total == 40).then_some(text)
    });
    let text = counted.expect("nllb_connects_total must reach 40");
    for name in ["nllb_backends_published", "nllb_datapath_mode{mode=\"ebpf\"} 1", "nllb_build_info", "nllb_panic_mode"]
    {
        assert!(text.contains(name), "missing {name}:\n{text}");
    }

    // No backend published: not ready.
    let cg2 = TestCgroup::new();
    let empty = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(free_port()).to_string()], BACKEND_PORT, &[], ""),
        cgroup: cg2.path().to_path_buf(),
        ..Default::default()
    });
    assert_eq!(empty.http_get("/readyz").0, 503);
    assert_eq!(empty.http_get("/healthz").0, 200);
}

#[test]
fn bpftool_dumps_maps_with_field_names() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new();
    let agent = Agent::start(&AgentOpts {
        // No probes: the backend does not exist, and the panic-mode publish
        // the probes would trigger replaces the table between the two dumps.
        config_yaml: one_service_config(
            &["127.0.0.1:7443"],
            BACKEND_PORT,
            &["198.18.1.2".parse().unwrap()],
            "health:\n  enabled: false\n",
        ),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    // A virtual address leads to its service's table (a map of its own,
    // replaced whole on every publish), which bpftool shows with field
    // names. bpftool prints a map-of-maps' key in hex and its value as the
    // table's map id.
    let vips = agent.dump_pinned_map("NLLB_VIPS4");
    let hex = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
            .collect()
    };
    let key = hex(&vips[0]["key"]);
    assert_eq!(key[..6], [127, 0, 0, 1, 0x1d, 0x13], "127.0.0.1:7443: {vips}");
    let id = hex(&vips[0]["value"]);
    let table_id = u32::from_ne_bytes([id[0], id[1], id[2], id[3]]);
    // The table is pinned under its map id too, so the same works without
    // CAP_SYS_ADMIN (which `map dump id` needs).
    let pinned_table = agent.pin_path.join("tables").join(table_id.to_string());
    assert!(pinned_table.exists(), "{} is not pinned", pinned_table.display());
    let out = Command::new("bpftool").args(["-j", "map", "dump", "id", &table_id.to_string()]).output().unwrap();
    assert!(
        out.status.success(),
        "bpftool map dump id {table_id}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &table[0]["formatted"]["value"];
    assert_eq!(t["count4"], 1, "{table}");
    let first = &t["backends4"][0];
    assert_eq!(first["family"], 2, "{table}");
    assert_eq!(first["addr"][0], u32::from_ne_bytes([198, 18, 1, 2]));
    assert_eq!(first["port"], 6443u16.to_be());
    let config = agent.dump_pinned_map("NLLB_CONFIG");
    assert!(config[0]["formatted"]["value"].get("eject_hold_ms").is_some(), "{config}");
    // Root only: the pin directory and its maps.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&agent.pin_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}
