//! nllb against a real control plane: kube-apiserver and etcd built from
//! their Go modules (`cargo xtask setup --kube`), each API server on its own
//! controller host, publishing itself in `default/kubernetes` through the
//! lease reconciler. The worker side is the real `nllb` binary attached to
//! a test cgroup, configured from deploy/daemonset.yaml's own ConfigMap and
//! authenticated as its ServiceAccount, and the real `kubectl` in that
//! cgroup going through the virtual address.
//!
//! What a real API server cannot be made to do on demand (invalid objects,
//! a 410 on every watch, bookmarks on a schedule) stays with the fake one
//! in discovery.rs.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nllb_tests::{
    Agent, AgentOpts, TestCgroup, free_port,
    kube::{APISERVER_PORT, ControlPlane, ControlPlaneOpts, KubeAuth, Kubectl, sockets},
    nllb_bin, unix_ms, wait_for,
};

/// The seed's story: the first kubectl call through the virtual address
/// that succeeds after a controller lost power comes at most this long
/// after the power-off (failed calls before it included).
const FIRST_KUBECTL_AFTER_POWER_OFF: Duration = Duration::from_secs(3);

/// nllb ejects a silent controller within its health bounds: two missed
/// TCP probes at 500 ms / 250 ms, ≤ 1.35 s (docs/health.md), plus slack
/// for a loaded 2-core machine.
const EJECTED_WITHIN: Duration = Duration::from_secs(3);

/// The timeline's name for the ejection.
/// nllb's discovered set follows the API's removal of a silent controller
/// within this (a watch event on a live controller, plus slack).
const DISCOVERY_FOLLOWS_WITHIN: Duration = Duration::from_secs(10);

const EJECTED: &str = "nllb ejects it (no longer published)";

/// A kubectl call that should succeed: generous for a loaded machine, and
/// far below a connect stuck on a silent controller (minutes).
const KUBECTL_TIMEOUT: &str = "--request-timeout=10s";

/// Calls made right after a power-off give up early, so a call stuck on
/// the silent controller does not hide when the next one would work.
const KUBECTL_RETRY_TIMEOUT: &str = "--request-timeout=750ms";

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn set(ips: &[IpAddr]) -> BTreeSet<IpAddr> {
    ips.iter().copied().collect()
}

/// The ConfigMap in deploy/daemonset.yaml: the agent config and the
/// kubeconfig a DaemonSet pod runs with.
struct Shipped {
    config: String,
    kubeconfig: String,
}

fn shipped() -> Shipped {
    let text = repo_file("deploy/daemonset.yaml");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("deploy/daemonset.yaml is valid YAML");
    for v in docs {
        if v["kind"].as_str() == Some("ConfigMap") {
            let data = &v["data"];
            return Shipped {
                config: data["config.yaml"]
                    .as_str()
                    .expect("config.yaml in the ConfigMap")
                    .to_string(),
                kubeconfig: data["kubeconfig"]
                    .as_str()
                    .expect("kubeconfig in the ConfigMap")
                    .to_string(),
            };
        }
    }
    panic!("no ConfigMap in deploy/daemonset.yaml");
}

/// `text` with `from` replaced; fails when `from` is not there, so the
/// shipped files cannot drift away from what the test rewrites (the seed
/// addresses in particular must never reach the agent).
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not found in:\n{text}");
    text.replace(from, to)
}

/// A worker node: a test cgroup, the agent attached to it (the DaemonSet's
/// config and kubeconfig, its ServiceAccount's token), and kubectl inside
/// the cgroup with a kubeconfig `nllb kubeconfig` pointed at the virtual
/// address.
struct Worker {
    kubectl: Kubectl,
    agent: Agent,
    vip: SocketAddr,
    /// Held for the agent and kubectl; removed last.
    _cg: TestCgroup,
}

fn worker(cp: &mut ControlPlane, seed: IpAddr) -> Worker {
    let admin = cp.admin();
    let applied = admin.apply_yaml(&repo_file("deploy/daemonset.yaml"), &[]);
    assert!(
        applied.ok,
        "kubectl apply -f deploy/daemonset.yaml: {}{}",
        applied.stdout, applied.stderr
    );
    let token = cp.service_account_token("kube-system", "nllb");
    let dir = cp.work_dir().join(nllb_tests::unique_name("worker-"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let vip = SocketAddr::from(([127, 0, 0, 1], port));

    let shipped = shipped();
    let kubeconfig = replaced(
        &shipped.kubeconfig,
        "https://127.0.0.1:7443",
        &format!("https://{vip}"),
    );
    let kubeconfig = replaced(
        &kubeconfig,
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        &cp.pki.ca_cert.display().to_string(),
    );
    let kubeconfig = replaced(
        &kubeconfig,
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        &token.display().to_string(),
    );
    let kubeconfig_path = dir.join("agent.kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig).unwrap();

    let config = replaced(
        &shipped.config,
        "\"127.0.0.1:7443\", \"[::1]:7443\"",
        &format!("\"{vip}\", \"[::1]:{port}\""),
    );
    let config = replaced(
        &config,
        "[\"10.0.0.11\", \"10.0.0.12\", \"10.0.0.13\"]",
        &format!("[\"{seed}\"]"),
    );
    let config = replaced(
        &config,
        "/etc/nllb/kubeconfig",
        &kubeconfig_path.display().to_string(),
    );

    let cg = TestCgroup::new();
    let agent = Agent::start(&AgentOpts {
        config_yaml: config,
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });

    // kubectl's kubeconfig: the admin one for controller 0, rewritten by
    // `nllb kubeconfig` to the service's virtual address.
    let direct = dir.join("admin.kubeconfig");
    cp.write_kubeconfig(
        &direct,
        &cp.url(0),
        &KubeAuth::Cert(cp.pki.admin.clone()),
        None,
    );
    let via_vip = dir.join("admin-vip.kubeconfig");
    let out = std::process::Command::new(nllb_bin())
        .arg("kubeconfig")
        .arg("--in")
        .arg(&direct)
        .arg("--out")
        .arg(&via_vip)
        .args(["--service", "apiserver", "--config"])
        .arg(&agent.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nllb kubeconfig: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        cp.url(0),
        "prints the original server"
    );
    let written = std::fs::read_to_string(&via_vip).unwrap();
    assert!(written.contains(&format!("https://{vip}")), "{written}");
    let kubectl = Kubectl::new(&via_vip, &dir.join("kubectl-home")).in_cgroup(cg.path());
    Worker {
        kubectl,
        agent,
        vip,
        _cg: cg,
    }
}

fn status(agent: &Agent) -> serde_json::Value {
    status_file(&agent.run_dir.join("status.json"))
}

/// The agent's status file; Null while it cannot be read.
fn status_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or_default()
}

fn backends(status: &serde_json::Value, field: &str) -> BTreeSet<IpAddr> {
    status["services"][0][field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.as_str()?.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .collect()
}

/// The controllers the agent knows (discovered; what health filters).
fn known(agent: &Agent) -> BTreeSet<IpAddr> {
    backends(&status(agent), "known_backends")
}

/// The controllers the datapath sends to now (healthy ones).
fn published(agent: &Agent) -> BTreeSet<IpAddr> {
    backends(&status(agent), "published_backends")
}

fn wait_known(agent: &Agent, want: &BTreeSet<IpAddr>, timeout: Duration) {
    let ok = wait_for(timeout, || (known(agent) == *want).then_some(()));
    assert!(
        ok.is_some(),
        "the agent never knew {want:?} (knows {:?}); log:\n{}",
        known(agent),
        agent.log()
    );
}

fn wait_published(agent: &Agent, want: &BTreeSet<IpAddr>, timeout: Duration) {
    let ok = wait_for(timeout, || (published(agent) == *want).then_some(()));
    assert!(
        ok.is_some(),
        "the agent never published {want:?} (has {:?}); log:\n{}",
        published(agent),
        agent.log()
    );
}

/// A control plane and a worker whose agent has discovered every API
/// server (seeded with controller 0 only). None when the test skips.
fn discovered(opts: ControlPlaneOpts) -> Option<(ControlPlane, Worker, Vec<IpAddr>)> {
    let mut cp = ControlPlane::start(&opts)?;
    let controllers = cp.controllers();
    let w = worker(&mut cp, controllers[0]);
    wait_known(&w.agent, &set(&controllers), Duration::from_secs(60));
    Some((cp, w, controllers))
}

fn apiservers(n: usize) -> ControlPlaneOpts {
    ControlPlaneOpts { apiservers: n, ..Default::default() }
}

/// Both manifests pass the real API server's validation and admission
/// (`--dry-run=server`), and, applied for real, grant exactly discovery's
/// reads to the identities they name.
#[test]
fn manifests_are_accepted_by_the_real_api_server() {
    let Some(mut cp) = ControlPlane::start(&apiservers(1)) else {
        return;
    };
    let admin = cp.admin();
    for file in ["deploy/daemonset.yaml", "deploy/rbac.yaml"] {
        let run = admin.apply_yaml(&repo_file(file), &["--dry-run=server"]);
        assert!(
            run.ok,
            "{file} rejected by kube-apiserver:\n{}{}",
            run.stdout, run.stderr
        );
        assert!(
            run.stdout.contains("(server dry run)"),
            "{file}: {}",
            run.stdout
        );
        let applied = admin.apply_yaml(&repo_file(file), &[]);
        assert!(applied.ok, "{file}: {}{}", applied.stdout, applied.stderr);
    }
    // The real RBAC engine agrees with what the manifests say they grant.
    let can = |who: &[&str], verb: &str, what: &str| -> bool {
        let mut args = vec!["auth", "can-i", verb, what, "-n", "default"];
        args.extend_from_slice(who);
        admin.run(&args).stdout.trim() == "yes"
    };
    let service_account = ["--as", "system:serviceaccount:kube-system:nllb"];
    let user = ["--as", "nllb"];
    let node = ["--as", "system:node:worker-1", "--as-group", "system:nodes"];
    for who in [&service_account[..], &user[..], &node[..]] {
        for verb in ["list", "watch"] {
            assert!(
                can(who, verb, "endpointslices.discovery.k8s.io"),
                "{who:?} may not {verb} endpointslices"
            );
            assert!(
                can(who, verb, "endpoints/kubernetes"),
                "{who:?} may not {verb} endpoints/kubernetes"
            );
        }
        assert!(!can(who, "get", "secrets"), "{who:?} may read secrets");
        assert!(
            !can(who, "update", "endpointslices.discovery.k8s.io"),
            "{who:?} may write endpointslices"
        );
    }
}

/// Discovery against three real API servers: the agent starts with one
/// seed controller, learns all three from the EndpointSlice they publish
/// themselves, and kubectl's calls through the virtual address (with the
/// kubeconfig `nllb kubeconfig` wrote) land on every one of them.
#[test]
fn agent_discovers_the_real_apiservers_and_kubectl_reaches_each_through_the_vip() {
    let Some((cp, w, controllers)) = discovered(apiservers(3)) else {
        return;
    };
    let st = status(&w.agent);
    assert_eq!(st["extra"]["discovery"]["source"], "api", "{st}");
    assert_eq!(backends(&st, "known_backends").len(), 3);
    assert!(
        st["services"][0]["known_backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b.as_str().unwrap().ends_with(&format!(":{APISERVER_PORT}"))),
        "{st}"
    );

    const CALLS: usize = 30;
    for i in 0..CALLS {
        let name = format!("nllb-probe-{i}");
        let run = w.kubectl.run(&[
            KUBECTL_TIMEOUT,
            "get",
            "configmap",
            &name,
            "--ignore-not-found",
            "-o",
            "name",
        ]);
        assert!(
            run.ok,
            "kubectl call {i} through {} failed after {:?}: {}",
            w.vip, run.took, run.stderr
        );
    }
    let served: Vec<usize> = (0..controllers.len())
        .map(|i| {
            cp.apiserver(i)
                .audit_events()
                .iter()
                .filter(|e| {
                    e["objectRef"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("nllb-probe-"))
                })
                .count()
        })
        .collect();
    eprintln!("kubectl calls served per API server: {served:?}");
    assert_eq!(
        served.iter().sum::<usize>(),
        CALLS,
        "every call is one GET, audited once: {served:?}"
    );
    assert!(
        served.iter().all(|n| *n > 0),
        "every API server gets calls through the VIP: {served:?}"
    );
}

/// Discovery's identity loses `watch` on EndpointSlices: a new watch is
/// refused with 403, which the agent logs and shows in `nllb status`
/// (naming the RBAC it needs) while it keeps its controller set; with the
/// verb back it follows the API again.
#[test]
fn forbidden_discovery_is_reported_and_the_set_kept() {
    let Some((mut cp, w, controllers)) = discovered(apiservers(2)) else {
        return;
    };
    let all = set(&controllers);
    let admin = cp.admin();
    let role: serde_json::Value =
        serde_json::from_str(&admin.ok(&["get", "role", "nllb", "-n", "default", "-o", "json"]))
            .unwrap();
    let rule = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .position(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "endpointslices")
        })
        .expect("a rule for endpointslices in deploy/daemonset.yaml's Role");
    let set_verbs = |v: &[&str]| {
        let patch = format!(
            r#"[{{"op":"replace","path":"/rules/{rule}/verbs","value":{}}}]"#,
            serde_json::json!(v)
        );
        admin.ok(&["patch", "role", "nllb", "-n", "default", "--type=json", "-p", &patch]);
    };
    let before = unix_ms();
    set_verbs(&["get", "list"]);
    // The running watch was authorized when it started; the next is not.
    let pid = w.agent.pid().unwrap();
    let conns = wait_for(Duration::from_secs(30), || {
        let c = sockets::long_lived_api_connections(pid, Duration::from_millis(300));
        (!c.is_empty()).then_some(c)
    })
    .expect("the agent keeps a watch open to an API server");
    sockets::kill_connections(&conns);

    let reported = wait_for(Duration::from_secs(30), || {
        let e = status(&w.agent)["extra"]["discovery"]["last_error"].clone();
        (e["at_unix_ms"].as_u64().is_some_and(|t| t >= before)
            && e["message"].as_str().is_some_and(|m| m.contains("403")))
        .then_some(e)
    });
    let reported = reported.unwrap_or_else(|| {
        panic!(
            "no 403 in nllb status: {}\nlog:\n{}",
            status(&w.agent),
            w.agent.log()
        )
    });
    eprintln!("nllb status shows: {reported}");
    let message = reported["message"].as_str().unwrap();
    assert!(
        message.contains("deploy/rbac.yaml") && message.contains("watch"),
        "names the fix: {message}"
    );
    assert!(
        w.agent.log().contains("controller discovery is forbidden"),
        "{}",
        w.agent.log()
    );
    // `nllb status` (text) shows it to an operator as well.
    let text = w.agent.nllb(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("403"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    // The set stays while discovery is refused.
    let lists = count_discovery_requests(&cp, "list");
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(
            known(&w.agent),
            all,
            "the set changed while forbidden; log:\n{}",
            w.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let relists = count_discovery_requests(&cp, "list") - lists;
    eprintln!("discovery relists while its watch is forbidden: {relists} in 5 s");
    // The retries back off (0.5 s doubling to 10 s): a working list before a
    // refused watch does not reset them into a relist loop.
    assert!(relists <= 5, "{relists} lists in 5 s while the watch is forbidden");

    // Verb restored: the agent follows the API again (controller 1 leaves
    // on a graceful stop, its lease reconciler removes it).
    set_verbs(&["get", "list", "watch"]);
    cp.stop_apiserver(1);
    let only0 = set(&controllers[..1]);
    cp.wait_published(&only0, Duration::from_secs(60));
    wait_known(&w.agent, &only0, Duration::from_secs(90));
}

/// How many EndpointSlice requests with `verb` discovery's ServiceAccount
/// made, over every API server's audit log.
fn count_discovery_requests(cp: &ControlPlane, verb: &str) -> usize {
    (0..cp.controllers().len())
        .map(|i| {
            discovery_events(cp, i)
                .iter()
                .filter(|e| {
                    e["verb"] == verb
                        && e["stage"]
                            == if verb == "watch" {
                                "ResponseStarted"
                            } else {
                                "ResponseComplete"
                            }
                })
                .count()
        })
        .sum()
}

/// The API server (index) on which the agent's discovery watch is open
/// now: the newest watch whose response started and has not completed (a
/// dropped one completes once its server sees the reset).
fn open_watch(cp: &ControlPlane) -> Option<usize> {
    (0..cp.controllers().len())
        .filter_map(|i| {
            let events = discovery_events(cp, i);
            let watches = |stage: &'static str| {
                events
                    .iter()
                    .filter(move |e| e["verb"] == "watch" && e["stage"] == stage)
                    .filter_map(|e| Some((e["auditID"].as_str()?, e["stageTimestamp"].as_str()?)))
            };
            let done: BTreeSet<&str> = watches("ResponseComplete").map(|(id, _)| id).collect();
            // RFC 3339 timestamps of one format: ordered as strings.
            let newest = watches("ResponseStarted").filter(|(id, _)| !done.contains(id)).map(|(_, at)| at).max()?;
            Some((newest.to_string(), i))
        })
        .max()
        .map(|(_, i)| i)
}

/// API server `i`'s audit events of the agent's discovery requests.
fn discovery_events(cp: &ControlPlane, i: usize) -> Vec<serde_json::Value> {
    cp.apiserver(i)
        .audit_events()
        .into_iter()
        .filter(|e| {
            e["user"]["username"] == "system:serviceaccount:kube-system:nllb"
                && e["objectRef"]["resource"] == "endpointslices"
        })
        .collect()
}

/// When things were first seen, relative to the power-off.
#[derive(Default)]
struct Timeline {
    events: Mutex<Vec<(&'static str, Duration)>>,
}

impl Timeline {
    fn mark(&self, what: &'static str, at: Duration) {
        let mut e = self.events.lock().unwrap();
        if !e.iter().any(|(w, _)| *w == what) {
            e.push((what, at));
        }
    }
    fn get(&self, what: &str) -> Option<Duration> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, t)| *t)
    }
    fn wait(&self, what: &str, timeout: Duration) -> Option<Duration> {
        wait_for(timeout, || self.get(what))
    }
    fn table(&self) -> String {
        let mut e = self.events.lock().unwrap().clone();
        e.sort_by_key(|(_, t)| *t);
        e.iter()
            .map(|(w, t)| format!("  {:>8.2} s  {w}\n", t.as_secs_f64()))
            .collect()
    }
}

/// The seed's story on a real control plane: three API servers; controller
/// 0 loses power (its link goes silent: no RST, no ICMP). kubectl through
/// the virtual address keeps working; nllb ejects it within the health
/// bounds; the surviving API servers' lease reconciler drops it from the
/// EndpointSlice and nllb removes it; it comes back and is re-added.
#[test]
fn a_powered_off_controller_is_ejected_removed_and_readded() {
    let Some((mut cp, w, controllers)) = discovered(apiservers(3)) else {
        return;
    };
    let all = set(&controllers);
    wait_published(&w.agent, &all, Duration::from_secs(30));
    let call = |timeout: &str| {
        w.kubectl
            .run(&[timeout, "get", "namespace", "default", "-o", "name"])
    };

    let before: Vec<_> = (0..20).map(|_| call(KUBECTL_TIMEOUT)).collect();
    let failed: Vec<&String> = before.iter().filter(|r| !r.ok).map(|r| &r.stderr).collect();
    assert!(
        failed.is_empty(),
        "kubectl before the power-off: {}/20 ok: {failed:?}",
        20 - failed.len()
    );

    // Record, from another thread, when nllb and the API change their view.
    let timeline = Arc::new(Timeline::default());
    let stop = Arc::new(AtomicBool::new(false));
    let dead = controllers[0];
    let reader = cp.reader(1);
    let status_path = w.agent.run_dir.join("status.json");
    let start = Instant::now();
    let watcher = {
        let (timeline, stop) = (timeline.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last_slice = Instant::now() - Duration::from_secs(1);
            let mut returned = false;
            while !stop.load(Ordering::SeqCst) {
                let now = start.elapsed();
                let st = status_file(&status_path);
                let (known, published) = (
                    backends(&st, "known_backends"),
                    backends(&st, "published_backends"),
                );
                returned |= timeline.get("power on").is_some();
                if !returned {
                    if !published.is_empty() && !published.contains(&dead) {
                        timeline.mark(EJECTED, now);
                    }
                    if !known.is_empty() && !known.contains(&dead) {
                        timeline.mark("nllb removes it (discovered set)", now);
                    }
                } else {
                    if known.contains(&dead) {
                        timeline.mark("nllb re-adds it (discovered set)", now);
                    }
                    if published.contains(&dead) {
                        timeline.mark("nllb publishes it again", now);
                    }
                }
                if last_slice.elapsed() >= Duration::from_millis(200) {
                    last_slice = Instant::now();
                    if let Some(slice) = reader.published() {
                        if !returned && !slice.contains(&dead) {
                            timeline
                                .mark("EndpointSlice drops it (lease expired)", start.elapsed());
                        }
                        if returned && slice.contains(&dead) {
                            timeline.mark("EndpointSlice lists it again", start.elapsed());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let guard = scopeguard(|| stop.store(true, Ordering::SeqCst));
    cp.power_off(0);
    timeline.mark("power off", start.elapsed());
    // Calls right away, until one succeeds and nllb has ejected the
    // controller: until then a call whose connect picked the silent
    // controller hangs (and fails at its short timeout).
    let mut window_failures = Vec::new();
    let mut window_calls = 0;
    let mut first_ok = None;
    while first_ok.is_none() || timeline.get(EJECTED).is_none() {
        let r = call(KUBECTL_RETRY_TIMEOUT);
        window_calls += 1;
        if r.ok {
            first_ok.get_or_insert(start.elapsed());
        } else {
            window_failures.push((start.elapsed(), r.stderr.trim().to_string()));
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "kubectl never worked after the power-off, or nllb never ejected {dead}: {window_failures:?}"
        );
    }
    let first_ok = first_ok.unwrap();
    timeline.mark("first kubectl call succeeds", first_ok);
    // Once nllb has ejected it, every call works.
    let after: Vec<_> = (0..20).map(|_| call(KUBECTL_TIMEOUT)).collect();
    let failed: Vec<&String> = after.iter().filter(|r| !r.ok).map(|r| &r.stderr).collect();
    let slowest = after.iter().map(|r| r.took).max().unwrap();
    let ejected = timeline.wait(
        EJECTED,
        Duration::from_secs(30),
    );
    let dropped = timeline.wait(
        "EndpointSlice drops it (lease expired)",
        Duration::from_secs(120),
    );
    let removed = timeline.wait("nllb removes it (discovered set)", Duration::from_secs(180));
    cp.power_on(0);
    timeline.mark("power on", start.elapsed());
    let relisted = timeline.wait("EndpointSlice lists it again", Duration::from_secs(180));
    let readded = timeline.wait("nllb re-adds it (discovered set)", Duration::from_secs(180));
    let republished = timeline.wait("nllb publishes it again", Duration::from_secs(60));
    drop(guard);
    watcher.join().unwrap();
    let table = timeline.table();
    eprintln!(
        "timeline (controller 0 = {dead}):\n{table}  calls until the first success and the ejection: {window_calls}, failed: {}\n  slowest of the 20 calls after: {slowest:?}",
        window_failures.len()
    );
    for (t, e) in &window_failures {
        eprintln!("    failed call ended at {:.2} s: {e}", t.as_secs_f64());
    }
    let discovery_log: Vec<String> = w
        .agent
        .log()
        .lines()
        .filter(|l| l.contains("discovery") || l.contains("controller set"))
        .map(str::to_string)
        .collect();
    eprintln!("agent's discovery log:\n{}", discovery_log.join("\n"));

    assert!(
        failed.is_empty(),
        "kubectl after the power-off: {}/20 ok: {failed:?}",
        20 - failed.len()
    );
    assert!(
        first_ok <= FIRST_KUBECTL_AFTER_POWER_OFF,
        "first kubectl success {first_ok:?} after the power-off\n{table}"
    );
    let ejected =
        ejected.unwrap_or_else(|| panic!("nllb never ejected {dead}\n{table}\n{}", w.agent.log()));
    assert!(
        ejected <= EJECTED_WITHIN,
        "ejected after {ejected:?}\n{table}"
    );
    let dropped = dropped.unwrap_or_else(|| {
        panic!(
            "the EndpointSlice still lists {dead}\n{table}\n{}",
            cp.logs(20)
        )
    });
    let removed =
        removed.unwrap_or_else(|| panic!("nllb never removed {dead}\n{table}\n{}", w.agent.log()));
    // The test reads the EndpointSlice every 200 ms (a request of its own),
    // nllb hears of the change by a watch event: nllb may see it first by up
    // to a poll and a request.
    assert!(
        removed + Duration::from_secs(1) >= dropped,
        "removed before the API said so?\n{table}"
    );
    // Discovery left the silent controller when the health checks rejected
    // it, so it hears of the removal from a live controller at once (on the
    // silent one, only its read timeout would end the watch, minutes later).
    assert!(
        removed <= dropped + DISCOVERY_FOLLOWS_WITHIN,
        "nllb removed it {:?} after the API did\n{table}\n{}",
        removed - dropped,
        w.agent.log()
    );
    relisted.unwrap_or_else(|| {
        panic!(
            "the returning API server never listed itself again\n{table}\n{}",
            cp.logs(30)
        )
    });
    readded.unwrap_or_else(|| panic!("nllb never re-added {dead}\n{table}\n{}", w.agent.log()));
    republished.unwrap_or_else(|| {
        panic!(
            "nllb never published {dead} again\n{table}\n{}",
            w.agent.log()
        )
    });
    wait_known(&w.agent, &all, Duration::from_secs(10));
}

/// Runs `f` when dropped (also when the test panics): stops a helper thread.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The watch against real API servers (watch cache off, so etcd's
/// history is what a resuming watch meets): after an etcd compaction the
/// resumed watch gets `410 Gone` and the agent relists; a dropped
/// connection resumes without a relist; an API server restart (graceful
/// stop, start) is followed through the EndpointSlice. The set is never
/// empty and stays right throughout. (Compaction comes first: the agent
/// counts a dropped connection as a failure, and two in a row move it to
/// another controller, where it lists afresh instead of resuming.)
#[test]
fn watch_survives_a_dropped_connection_a_compaction_and_a_restart() {
    let Some((mut cp, w, controllers)) = discovered(ControlPlaneOpts { apiservers: 2, watch_cache: false }) else {
        return;
    };
    let all = set(&controllers);
    let pid = w.agent.pid().unwrap();
    // The watch and any idle pooled connection: dropping them all drops
    // the watch.
    let watch_of = || {
        wait_for(Duration::from_secs(60), || {
            let c = sockets::long_lived_api_connections(pid, Duration::from_millis(300));
            (!c.is_empty()).then_some(c)
        })
        .unwrap_or_else(|| panic!("the agent has no watch open; log:\n{}", w.agent.log()))
    };

    // A compaction past the agent's resourceVersion: the resumed watch is
    // told 410 Gone, the agent relists.
    let admin = cp.admin();
    for i in 0..5 {
        admin.ok(&[
            "create",
            "configmap",
            &format!("nllb-history-{i}"),
            "-n",
            "default",
        ]);
    }
    let rev = cp.etcd.compact();
    eprintln!("etcd compacted at revision {rev}");
    let log_len = w.agent.log().len();
    let (lists, conns) = (count_discovery_requests(&cp, "list"), watch_of());
    sockets::kill_connections(&conns);
    let gone = wait_for(Duration::from_secs(30), || {
        w.agent.log()[log_len..].contains("410 Gone").then_some(())
    });
    assert!(
        gone.is_some(),
        "no 410 after the compaction; log:\n{}",
        &w.agent.log()[log_len..]
    );
    let relisted = wait_for(Duration::from_secs(30), || {
        (count_discovery_requests(&cp, "list") > lists).then_some(())
    });
    assert!(
        relisted.is_some(),
        "no relist after 410; log:\n{}",
        w.agent.log()
    );
    assert_eq!(known(&w.agent), all);

    // A dropped connection (after the relist, so the resourceVersion is
    // current): the watch resumes from it, no relist.
    let conns = watch_of();
    let (lists, watches) = (
        count_discovery_requests(&cp, "list"),
        count_discovery_requests(&cp, "watch"),
    );
    sockets::kill_connections(&conns);
    let resumed = wait_for(Duration::from_secs(30), || {
        (count_discovery_requests(&cp, "watch") > watches).then_some(())
    });
    assert!(
        resumed.is_some(),
        "no new watch after the drop; log:\n{}",
        w.agent.log()
    );
    assert_eq!(
        count_discovery_requests(&cp, "list"),
        lists,
        "a dropped watch needs no relist"
    );
    assert_eq!(known(&w.agent), all);

    // A restart of the API server the watch is on (its audit log tells
    // which: a pooled connection may lead to the other one).
    let i = wait_for(Duration::from_secs(60), || open_watch(&cp)).unwrap_or_else(|| {
        panic!("no API server has the agent's watch open; log:\n{}", w.agent.log())
    });
    let other = set(&[controllers[1 - i]]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let recorder = {
        let (seen, stop, path) = (
            seen.clone(),
            stop.clone(),
            w.agent.run_dir.join("status.json"),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let st = status_file(&path);
                if st.is_object() {
                    seen.lock().unwrap().push(backends(&st, "known_backends"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let guard = scopeguard(|| stop.store(true, Ordering::SeqCst));
    cp.stop_apiserver(i);
    cp.wait_published(&other, Duration::from_secs(60));
    wait_known(&w.agent, &other, Duration::from_secs(90));
    cp.start_apiserver(i);
    cp.wait_published(&all, Duration::from_secs(90));
    wait_known(&w.agent, &all, Duration::from_secs(90));
    drop(guard);
    recorder.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|s| !s.is_empty()),
        "an empty set was published"
    );
    assert!(seen.iter().all(|s| s.is_subset(&all)), "{seen:?}");
    let run = w
        .kubectl
        .run(&[KUBECTL_TIMEOUT, "get", "namespace", "default", "-o", "name"]);
    assert!(
        run.ok,
        "kubectl through the VIP after the restart: {}",
        run.stderr
    );
}
