//! deploy/monitoring: the alert rules load and fire as intended (promtool),
//! and every metric the rules and the dashboard name is one a real agent
//! exports. Also the scenario behind docs/dashboard.png.

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nllb_tests::{
    Agent, AgentOpts, ClientOpts, TestCgroup, TestNet, free_port, one_service_config, privileged, stop_client, unix_ms,
    vip4,
};

const BACKEND_PORT: u16 = 6443;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// The PrometheusRule's `spec`: the plain rule file Prometheus and promtool read.
fn plain_rules() -> serde_json::Value {
    let rule: serde_json::Value =
        serde_saphyr::from_str(&read("deploy/monitoring/nllb-alerts.yaml")).expect("nllb-alerts.yaml is YAML");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    rule["spec"].clone()
}

/// promtool as `cargo xtask setup` installs it (NLLB_PROMTOOL), or on PATH.
/// Missing: the test fails under CI and skips elsewhere.
fn promtool() -> Option<PathBuf> {
    let candidates = std::env::var_os("NLLB_PROMTOOL").map(PathBuf::from).into_iter().chain(
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).collect::<Vec<_>>()),
    );
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    if std::env::var_os("CI").is_some() && std::env::var_os("NLLB_IN_VM").is_none() {
        panic!("CI is set but promtool is missing: `cargo xtask setup` builds it (NLLB_PROMTOOL)");
    }
    eprintln!("SKIPPED: promtool not installed (`cargo xtask setup` builds it)");
    None
}

#[test]
fn the_alert_rules_load_and_fire_as_intended() {
    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The unit tests name the plain rule file beside them.
    std::fs::write(dir.path().join("nllb-alerts.rules.yaml"), serde_json::to_string_pretty(&plain_rules()).unwrap())
        .unwrap();
    std::fs::write(dir.path().join("nllb-alerts.test.yaml"), read("deploy/monitoring/nllb-alerts.test.yaml")).unwrap();
    for args in [["check", "rules", "nllb-alerts.rules.yaml"], ["test", "rules", "nllb-alerts.test.yaml"]] {
        let out = Command::new(&promtool).args(args).current_dir(dir.path()).output().expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_has_a_unit_test_that_fires_it() {
    let alerts: BTreeSet<String> = plain_rules()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    let tests: serde_json::Value = serde_saphyr::from_str(&read("deploy/monitoring/nllb-alerts.test.yaml")).unwrap();
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|c| c["alertname"].as_str().map(str::to_string))
        .collect();
    assert_eq!(alerts, fired, "alerts vs alerts a unit test expects to fire");
}

/// Metric names (`nllb_...`) in PromQL expressions.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("nllb_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The series names a Prometheus text exposition declares, also for
/// families without samples yet (`# TYPE` lines): counters as `_total`,
/// histograms as `_bucket`, `_sum` and `_count`.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in metrics.lines() {
        let mut f = line.split_whitespace();
        if f.next() != Some("#") || f.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (f.next(), f.next()) else { continue };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exported_by_the_agent() {
    if !privileged() {
        return;
    }
    let mut named = BTreeSet::new();
    for group in plain_rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            named.extend(metric_names(rule["expr"].as_str().unwrap()));
        }
    }
    let rules_only = named.len();
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/monitoring/nllb-dashboard.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            named.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    named.extend(metric_names(&dashboard["templating"].to_string()));
    assert!(rules_only >= 8 && named.len() > rules_only, "{named:?}");

    let net = TestNet::new(1);
    let _s = net.serve_all(BACKEND_PORT, "c");
    let cg = TestCgroup::new();
    let agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip4(free_port()).to_string()], BACKEND_PORT, &[net.hosts()[0].v4], ""),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    let (code, body) = agent.http_get("/metrics");
    assert_eq!(code, 200);
    // Alerts on increase() miss a first event whose series appears at 1.
    assert!(body.contains("nllb_config_reloads_total{mode=\"rejected\"} 0"), "{body}");
    let have = exported(&body);
    let missing: Vec<&String> = named.iter().filter(|n| !have.contains(*n)).collect();
    assert!(missing.is_empty(), "named in deploy/monitoring but not exported: {missing:?}\nexported: {have:?}");
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum by (backend) (rate(nllb_connects_total{instance=~\"$i\"}[5m])) / nllb_x"),
        BTreeSet::from(["nllb_connects_total".to_string(), "nllb_x".to_string()])
    );
    let text = "# HELP nllb_connects x\n# TYPE nllb_connects counter\n# TYPE nllb_probe_duration_seconds histogram\n\
                # TYPE nllb_panic_mode gauge\n";
    let e = exported(text);
    for n in ["nllb_connects_total", "nllb_probe_duration_seconds_bucket", "nllb_panic_mode"] {
        assert!(e.contains(n), "{n}");
    }
}

/// The data of docs/dashboard.png: a real agent's /metrics scraped every
/// second while controllers die and come back, written as JSON lines to
/// `$NLLB_DASHBOARD_SCRAPES` (`{"t_ms", "metrics"}` per scrape,
/// `{"t_ms", "event"}` per step). docs/dashboard/make.sh runs it.
#[test]
#[ignore = "makes the data for docs/dashboard.png (docs/dashboard/make.sh)"]
fn dashboard_scenario() {
    assert!(privileged(), "needs root");
    let out_path = std::env::var("NLLB_DASHBOARD_SCRAPES").expect("NLLB_DASHBOARD_SCRAPES=<file>");
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::fs::File::create(&out_path).unwrap()));
    let note = |event: &str| {
        let line = serde_json::json!({ "t_ms": unix_ms(), "event": event });
        writeln!(out.lock().unwrap(), "{line}").unwrap();
        eprintln!("[scenario] {event}");
    };

    let net = TestNet::new(3);
    let mut servers = net.serve_all(BACKEND_PORT, "c");
    let cg = TestCgroup::new();
    let port = free_port();
    let backends: Vec<IpAddr> = net.hosts().iter().map(|h| h.v4).collect();
    let config = one_service_config(&[&vip4(port).to_string()], BACKEND_PORT, &backends, "");
    let agent =
        Agent::start(&AgentOpts { config_yaml: config.clone(), cgroup: cg.path().to_path_buf(), ..Default::default() });
    let addr = agent.metrics_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (out, stop) = (out.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Read as _;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: nllb\r\nConnection: close\r\n\r\n");
                    let mut text = String::new();
                    let _ = s.read_to_string(&mut text);
                    if let Some((_, body)) = text.split_once("\r\n\r\n") {
                        let line = serde_json::json!({ "t_ms": unix_ms(), "metrics": body });
                        writeln!(out.lock().unwrap(), "{line}").unwrap();
                    }
                }
                std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
            }
        })
    };
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut o = ClientOpts::new(vip4(port), 1_000_000, Some(cg.path()));
            o.interval = Duration::from_millis(50);
            o.retry = true;
            o.spawn()
        })
        .collect();
    let step = |secs: u64| std::thread::sleep(Duration::from_secs(secs));
    note("start: 3 controllers, 4 clients at 20 connects/s each");
    step(20);
    servers[0].stop();
    note("c0 killed");
    step(20);
    net.hosts()[1].blackhole();
    note("c1 blackholed");
    step(20);
    servers[0] = net.hosts()[0].serve(BACKEND_PORT, "c0");
    net.hosts()[1].unblackhole();
    note("c0 and c1 back");
    step(15);
    agent.write_config("services: [oops");
    note("bad config written");
    step(5);
    agent.write_config(&config);
    note("config restored");
    step(10);
    for s in &mut servers {
        s.stop();
    }
    note("all controllers down");
    step(15);
    drop(servers);
    let _back = net.serve_all(BACKEND_PORT, "c");
    note("all controllers back");
    step(20);
    note("end");
    for c in clients {
        stop_client(c);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    scraper.join().unwrap();
}
