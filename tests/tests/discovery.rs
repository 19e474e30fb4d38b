//! Controller discovery (`nllb::discovery::spawn_with`) against the fake
//! API server, with kube-rs as the real client over TLS.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use nllb::{
    discovery::{DiscoveredSet, KubernetesDiscovery, Source, Tuning, cache},
    model::Service,
};
use nllb_tests::fake_apiserver::{FakeApiServer, endpoint_slice, endpoints, ips, store::Kind};
use tokio::sync::watch;

const NS: &str = "default";
const SVC: &str = "kubernetes";

struct Setup {
    api: FakeApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    state: PathBuf,
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_env_filter("nllb=debug,kube=info").with_test_writer().try_init();
}

fn setup() -> Setup {
    init_tracing();
    let api = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), &api.url());
    let state = dir.path().join("state");
    Setup { api, kubeconfig, state, _dir: dir }
}

fn services() -> Vec<Service> {
    vec![Service { name: "apiserver".into(), listen: vec!["127.0.0.1:7443".parse().unwrap()], backend_port: 6443 }]
}

fn tuning() -> Tuning {
    Tuning {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        watch_timeout_secs: 30,
        connect_timeout: Duration::from_secs(1),
        errors_before_switch: 2,
    }
}

fn start(s: &Setup, seed: &[&str]) -> (watch::Receiver<DiscoveredSet>, Arc<Mutex<Vec<DiscoveredSet>>>) {
    let cfg = KubernetesDiscovery { kubeconfig: s.kubeconfig.clone(), namespace: NS.into(), service: SVC.into() };
    let rx = nllb::discovery::spawn_with(cfg, services(), s.state.clone(), ips(seed), tuning(), None);
    (rx.clone(), record(rx))
}

/// Every value the channel takes, to check that none was empty.
fn record(mut rx: watch::Receiver<DiscoveredSet>) -> Arc<Mutex<Vec<DiscoveredSet>>> {
    let seen = Arc::new(Mutex::new(vec![rx.borrow_and_update().clone()]));
    let out = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            seen.lock().unwrap().push(rx.borrow_and_update().clone());
        }
    });
    out
}

/// A published set as discovery publishes it: sorted, each address once
/// (callers list hosts in creation order, which says nothing of their
/// addresses' order).
fn as_published(want: &[&str]) -> Vec<IpAddr> {
    let set: std::collections::BTreeSet<IpAddr> = ips(want).into_iter().collect();
    set.into_iter().collect()
}

async fn wait_for(rx: &mut watch::Receiver<DiscoveredSet>, want: &[&str]) -> DiscoveredSet {
    let want = as_published(want);
    let got = tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|s| s.source == Source::Api && s.controllers == want),
    )
    .await;
    let got = got.map(|r| r.map(|s| s.clone()));
    match got {
        Ok(Ok(s)) => s,
        _ => panic!("controllers never became {want:?}; last: {:?}", *rx.borrow()),
    }
}

/// Asserts the set stays `want` for a while (errors must not change it).
async fn stays(rx: &watch::Receiver<DiscoveredSet>, want: &[&str], generation: u64) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = rx.borrow().clone();
    assert_eq!(now.controllers, as_published(want), "set changed: {now:?}");
    assert_eq!(now.generation, generation, "a set was published: {now:?}");
}

/// Nothing published after the initial value (an empty seed) was empty.
fn never_empty(seen: &Mutex<Vec<DiscoveredSet>>) {
    let seen = seen.lock().unwrap().clone();
    assert!(seen[1..].iter().all(|s| !s.controllers.is_empty()), "an empty set was published: {seen:?}");
}

fn cached(s: &Setup) -> Option<Vec<IpAddr>> {
    cache::load(&s.state, NS, SVC).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovers_ready_ipv4_and_ipv6_controllers_from_endpointslices() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(
        NS,
        "kubernetes",
        SVC,
        &[("198.18.2.2", true), ("198.18.1.2", true), ("198.18.3.2", false)],
    ));
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes-v6", SVC, &[("2001:2:0:1::2", true)]));
    let (mut rx, seen) = start(&s, &["198.18.9.2"]);
    let set = wait_for(&mut rx, &["198.18.1.2", "198.18.2.2", "2001:2:0:1::2"]).await;
    assert!(set.generation >= 1);
    assert_eq!(cached(&s), Some(ips(&["198.18.1.2", "198.18.2.2", "2001:2:0:1::2"])));
    assert!(s.api.count("LIST endpointslices default") >= 1);
    assert!(
        s.api.requests().iter().any(|r| r.contains("labels=kubernetes.io/service-name=kubernetes")),
        "{:?}",
        s.api.requests()
    );
    never_empty(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_added_changed_and_removed_controllers() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true)]));
    let (mut rx, seen) = start(&s, &[]);
    wait_for(&mut rx, &["198.18.1.2"]).await;
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true), ("198.18.2.2", true)]));
    wait_for(&mut rx, &["198.18.1.2", "198.18.2.2"]).await;
    // A controller going not-ready counts as removed.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", false), ("198.18.2.2", true)]));
    wait_for(&mut rx, &["198.18.2.2"]).await;
    // A second slice adds to the set; deleting it removes its controllers.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes-x", SVC, &[("198.18.3.2", true)]));
    wait_for(&mut rx, &["198.18.2.2", "198.18.3.2"]).await;
    s.api.delete_slice(NS, "kubernetes-x");
    wait_for(&mut rx, &["198.18.2.2"]).await;
    assert_eq!(cached(&s), Some(ips(&["198.18.2.2"])));
    never_empty(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignores_other_services_and_namespaces() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true)]));
    s.api.apply_slice(&endpoint_slice(NS, "other", "other", &[("198.18.5.2", true)]));
    s.api.apply_slice(&endpoint_slice("kube-system", "kubernetes", SVC, &[("198.18.6.2", true)]));
    let (mut rx, _) = start(&s, &[]);
    let set = wait_for(&mut rx, &["198.18.1.2"]).await;
    s.api.apply_slice(&endpoint_slice(NS, "other", "other", &[("198.18.7.2", true)]));
    stays(&rx, &["198.18.1.2"], set.generation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relists_after_410_gone() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true)]));
    let (mut rx, seen) = start(&s, &[]);
    wait_for(&mut rx, &["198.18.1.2"]).await;
    s.api.wait_for_watches(1, Duration::from_secs(10));
    let lists = s.api.count("LIST endpointslices");
    // The change happens while the watch is expired: only a relist sees it.
    s.api.expire_watches();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.2.2", true)]));
    s.api.compact();
    wait_for(&mut rx, &["198.18.2.2"]).await;
    assert!(s.api.gone_sent() >= 1);
    assert!(s.api.count("LIST endpointslices") > lists, "no relist after 410: {:?}", s.api.requests());
    never_empty(&seen);
}

/// Dropping every receiver ends discovery: no more requests to the API.
/// A second discovery (another namespace) runs alongside as the control:
/// once it has come back from a dropped connection, a discovery that was
/// still running would have come back too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_stops_when_the_receiver_is_dropped() {
    const CONTROL: &str = "control";
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true)]));
    s.api.apply_slice(&endpoint_slice(CONTROL, "kubernetes", SVC, &[("198.18.2.2", true)]));
    let spawn = |namespace: &str| {
        let cfg =
            KubernetesDiscovery { kubeconfig: s.kubeconfig.clone(), namespace: namespace.into(), service: SVC.into() };
        nllb::discovery::spawn_with(cfg, services(), s.state.join(namespace), vec![], tuning(), None)
    };
    let mut rx = spawn(NS);
    let mut control = spawn(CONTROL);
    wait_for(&mut rx, &["198.18.1.2"]).await;
    wait_for(&mut control, &["198.18.2.2"]).await;
    s.api.wait_for_watches(2, Duration::from_secs(10));
    drop(rx);
    // The dropped discovery's watch closes without any further request.
    nllb_tests::wait_for(Duration::from_secs(5), || (s.api.open_watches() == 1).then_some(()))
        .unwrap_or_else(|| panic!("the dropped discovery's watch stays open: {:?}", s.api.requests()));
    let ours = |s: &Setup| s.api.requests().iter().filter(|r| r.contains(&format!(" {NS} "))).count();
    let before = ours(&s);
    let control_watches = s.api.count(&format!("WATCH endpointslices {CONTROL}"));
    s.api.drop_connections();
    nllb_tests::wait_for(Duration::from_secs(10), || {
        (s.api.count(&format!("WATCH endpointslices {CONTROL}")) > control_watches).then_some(())
    })
    .unwrap_or_else(|| panic!("the control discovery never came back: {:?}", s.api.requests()));
    s.api.wait_for_watches(1, Duration::from_secs(10));
    assert_eq!(ours(&s), before, "the dropped discovery still talks to the API: {:?}", s.api.requests());
    drop(control);
}

/// Missing RBAC (403): the seed stays until the API lets discovery in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_keeps_the_seed_until_allowed() {
    let s = setup();
    s.api.forbid(true);
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true)]));
    let (mut rx, seen) = start(&s, &["198.18.9.2"]);
    stays(&rx, &["198.18.9.2"], 0).await;
    assert_eq!(rx.borrow().source, Source::Seed);
    assert!(s.api.count("LIST endpointslices") >= 2, "discovery keeps retrying: {:?}", s.api.requests());
    s.api.forbid(false);
    wait_for(&mut rx, &["198.18.1.2"]).await;
    never_empty(&seen);
}

/// BOOKMARK events keep the client's resume point current even when only
/// other objects change: after the history is compacted, a dropped watch
/// resumes without a 410 and without a relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_keep_the_resume_point_fresh() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true)]));
    let (mut rx, _) = start(&s, &[]);
    wait_for(&mut rx, &["198.18.1.2"]).await;
    s.api.wait_for_watches(1, Duration::from_secs(10));
    for i in 0..5 {
        s.api.apply_slice(&endpoint_slice(NS, "other", "other", &[(&format!("198.18.8.{i}"), true)]));
    }
    // Two bookmarks carrying the latest resourceVersion have gone out: the
    // first has reached the client by the time the second is sent (one
    // bookmark interval later).
    let latest = s.api.resource_version();
    nllb_tests::wait_for(Duration::from_secs(10), || (s.api.bookmarks_sent(latest) >= 2).then_some(()))
        .unwrap_or_else(|| panic!("no bookmark at resourceVersion {latest}: {:?}", s.api.requests()));
    let lists = s.api.count("LIST endpointslices");
    s.api.compact();
    s.api.drop_connections();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.2.2", true)]));
    wait_for(&mut rx, &["198.18.2.2"]).await;
    assert_eq!(s.api.gone_sent(), 0, "resumed from a stale resourceVersion: {:?}", s.api.requests());
    assert_eq!(s.api.count("LIST endpointslices"), lists, "relisted: {:?}", s.api.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_recovers() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true)]));
    let (mut rx, seen) = start(&s, &[]);
    let set = wait_for(&mut rx, &["198.18.1.2"]).await;
    for round in 0..3 {
        s.api.wait_for_watches(1, Duration::from_secs(10));
        let watches = s.api.count("WATCH endpointslices");
        s.api.drop_connections();
        // Each dropped watch is re-established.
        nllb_tests::wait_for(Duration::from_secs(10), || {
            (s.api.count("WATCH endpointslices") > watches && s.api.open_watches() == 1).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: no new watch after the drop: {:?}", s.api.requests()));
    }
    assert_eq!(rx.borrow().controllers, ips(&["198.18.1.2"]));
    assert_eq!(rx.borrow().generation, set.generation, "dropped watches changed nothing");
    // The re-established watch delivers changes.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true), ("198.18.4.2", true)]));
    wait_for(&mut rx, &["198.18.1.2", "198.18.4.2"]).await;
    never_empty(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_endpoints_when_endpointslices_are_not_served() {
    let s = setup();
    s.api.serve_endpoint_slices(false);
    s.api.apply_endpoints(&endpoints(NS, SVC, &["198.18.1.2", "2001:2:0:2::2"], &["198.18.3.2"]));
    s.api.apply_endpoints(&endpoints(NS, "other", &["198.18.5.2"], &[]));
    let (mut rx, seen) = start(&s, &[]);
    wait_for(&mut rx, &["198.18.1.2", "2001:2:0:2::2"]).await;
    assert!(
        s.api
            .requests()
            .iter()
            .any(|r| r.starts_with("LIST endpoints default") && r.contains("fields=metadata.name=kubernetes")),
        "{:?}",
        s.api.requests()
    );
    s.api.apply_endpoints(&endpoints(NS, SVC, &["198.18.3.2"], &["198.18.1.2"]));
    wait_for(&mut rx, &["198.18.3.2"]).await;
    // The Endpoints flavour survives a 410 and a dropped connection too.
    s.api.wait_for_watches(1, Duration::from_secs(10));
    s.api.expire_watches();
    s.api.apply_endpoints(&endpoints(NS, SVC, &["198.18.4.2"], &[]));
    wait_for(&mut rx, &["198.18.4.2"]).await;
    assert!(s.api.gone_sent() >= 1);
    s.api.wait_for_watches(1, Duration::from_secs(10));
    s.api.drop_connections();
    s.api.apply_endpoints(&endpoints(NS, SVC, &["198.18.4.2", "198.18.5.2"], &[]));
    wait_for(&mut rx, &["198.18.4.2", "198.18.5.2"]).await;
    never_empty(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_or_empty_data_keeps_the_last_good_set() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true), ("198.18.2.2", true)]));
    let (mut rx, seen) = start(&s, &[]);
    let good = wait_for(&mut rx, &["198.18.1.2", "198.18.2.2"]).await;
    let want = ["198.18.1.2", "198.18.2.2"];

    // Only unusable addresses: loopback, unspecified, multicast, garbage.
    s.api.apply_slice(&endpoint_slice(
        NS,
        "kubernetes",
        SVC,
        &[("127.0.0.1", true), ("0.0.0.0", true), ("224.0.0.1", true), ("not-an-ip", true)],
    ));
    stays(&rx, &want, good.generation).await;
    // Nothing ready.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", false)]));
    stays(&rx, &want, good.generation).await;
    // No endpoints at all, then no slice at all.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[]));
    s.api.delete_slice(NS, "kubernetes");
    stays(&rx, &want, good.generation).await;
    // An object kube-rs cannot decode: the watch errors, the set stays.
    s.api.apply_raw(
        Kind::EndpointSlice,
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "broken", "namespace": NS, "labels": {"kubernetes.io/service-name": SVC}},
            "addressType": "IPv4", "endpoints": "this should be a list",
        }),
    );
    stays(&rx, &want, good.generation).await;
    assert_eq!(cached(&s), Some(ips(&want)));
    s.api.delete_slice(NS, "broken");

    // A mix: the valid address is used, the bad one dropped.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.3.2", true), ("127.0.0.1", true)]));
    wait_for(&mut rx, &["198.18.3.2"]).await;
    never_empty(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_down_keeps_the_set_and_restart_resumes() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true), ("198.18.2.2", true)]));
    let (mut rx, seen) = start(&s, &[]);
    let set = wait_for(&mut rx, &["198.18.1.2", "198.18.2.2"]).await;
    s.api.stop();
    stays(&rx, &["198.18.1.2", "198.18.2.2"], set.generation).await;
    // Changed while the API was unreachable: seen after it comes back.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.2.2", true)]));
    stays(&rx, &["198.18.1.2", "198.18.2.2"], set.generation).await;
    s.api.restart();
    wait_for(&mut rx, &["198.18.2.2"]).await;
    assert_eq!(cached(&s), Some(ips(&["198.18.2.2"])));
    never_empty(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_with_the_api_down_uses_the_cache_over_the_seed() {
    let s = setup();
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true), ("198.18.3.2", true)]));
    {
        let (mut rx, _) = start(&s, &["198.18.9.2"]);
        wait_for(&mut rx, &["198.18.1.2", "198.18.3.2"]).await;
    }
    s.api.stop();
    let (rx, seen) = start(&s, &["198.18.9.2"]);
    let first = rx.borrow().clone();
    assert_eq!(first.source, Source::Cache);
    assert_eq!(first.controllers, ips(&["198.18.1.2", "198.18.3.2"]));
    stays(&rx, &["198.18.1.2", "198.18.3.2"], 0).await;
    assert_eq!(rx.borrow().source, Source::Cache);
    // When the API comes back its answer replaces the cached one.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.3.2", true)]));
    s.api.restart();
    let mut rx = rx;
    wait_for(&mut rx, &["198.18.3.2"]).await;
    never_empty(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cache_the_seed_is_the_first_value_and_api_confirms() {
    let s = setup();
    let (mut rx, _) = start(&s, &["198.18.2.2", "198.18.1.2", "198.18.2.2"]);
    let first = rx.borrow().clone();
    assert_eq!(
        first,
        DiscoveredSet {
            controllers: ips(&["198.18.1.2", "198.18.2.2"]),
            source: Source::Seed,
            generation: 0,
            last_error: None
        }
    );
    // The API lists nothing yet: the seed stays.
    stays(&rx, &["198.18.1.2", "198.18.2.2"], 0).await;
    // Same controllers from the API: published once, now marked as from the API.
    s.api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[("198.18.1.2", true), ("198.18.2.2", true)]));
    let set = wait_for(&mut rx, &["198.18.1.2", "198.18.2.2"]).await;
    assert_eq!(set.generation, 1);
}

/// The kubeconfig names nllb's own virtual address (what `nllb kubeconfig`
/// writes). Discovery must not dial it: it dials the known controllers on
/// the service's backendPort, still verifying the certificate for
/// 127.0.0.1, and moves on from a controller that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_kubeconfig_dials_known_controllers_directly() {
    if !nllb_tests::privileged() {
        return;
    }
    use nllb_tests::fake_apiserver::FakeApiOpts;
    init_tracing();
    let net = nllb_tests::TestNet::new(2);
    let (h1, h2) = (&net.hosts()[0], &net.hosts()[1]);
    // The API answers on controller 2 only; controller 1 refuses.
    let api = FakeApiServer::start_with(FakeApiOpts {
        bind: std::net::SocketAddr::new(h2.v4, 0),
        netns: Some(h2.netns.name.clone()),
        ..Default::default()
    });
    let (v1, v2) = (h1.v4.to_string(), h2.v4.to_string());
    api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[(&v1, true), (&v2, true)]));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), "https://127.0.0.1:7443");
    let services = vec![Service {
        name: "apiserver".into(),
        listen: vec!["127.0.0.1:7443".parse().unwrap()],
        backend_port: api.addr().port(),
    }];
    let cfg = KubernetesDiscovery { kubeconfig, namespace: NS.into(), service: SVC.into() };
    let mut rx =
        nllb::discovery::spawn_with(cfg, services, dir.path().join("state"), vec![h1.v4, h2.v4], tuning(), None);
    wait_for(&mut rx, &[&v1, &v2]).await;
    assert!(api.count("LIST endpointslices") >= 1);

    // Controller 2 leaves the set: discovery stops dialing it and goes on
    // through controller 1 once that one serves the API.
    let api1 = FakeApiServer::start_with(FakeApiOpts {
        bind: std::net::SocketAddr::new(h1.v4, api.addr().port()),
        netns: Some(h1.netns.name.clone()),
        ..Default::default()
    });
    // Same CA for both is not needed: each fake has its own, so serve the
    // same kubeconfig CA by pointing the file at controller 1's CA.
    std::fs::write(dir.path().join("kubeconfig"), api1.kubeconfig_yaml("https://127.0.0.1:7443")).unwrap();
    api1.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[(&v1, true)]));
    api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &[(&v1, true)]));
    wait_for(&mut rx, &[&v1]).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while api1.count("WATCH endpointslices") == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("discovery moved to the remaining controller");
}

/// The backends the running agent published for its first service, from
/// its status file.
fn published(agent: &nllb_tests::Agent) -> BTreeSet<String> {
    let text = std::fs::read_to_string(agent.run_dir.join("status.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    // The discovered set (what health filters from), so a probe that
    // times out on a loaded machine cannot make this flaky.
    v["services"][0]["known_backends"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Waits until the agent knows `want` and the kernel serves nothing else
/// (the agent decides at once; its datapath worker publishes a moment later,
/// and a client in between would still reach a removed controller).
fn wait_published(agent: &nllb_tests::Agent, want: &BTreeSet<String>) {
    let got = nllb_tests::wait_for(Duration::from_secs(20), || {
        let served = agent.kernel_backends("apiserver");
        (published(agent) == *want && !served.is_empty() && served.is_subset(want)).then_some(())
    });
    assert!(
        got.is_some(),
        "agent never published {want:?} (knows {:?}, the kernel serves {:?}); log:\n{}",
        published(agent),
        agent.kernel_backends("apiserver"),
        agent.log()
    );
}

/// End to end: the real `nllb` binary with `discovery.kubernetes` and no
/// static backends finds its controllers through the fake API server;
/// connects through the virtual address land on them; a controller removed
/// from the API stops getting connects; the API going away keeps the set;
/// a restart with the API down serves the cached set.
#[test]
fn agent_discovers_controllers_and_serves_them_through_the_vip() {
    use nllb_tests::{Agent, AgentOpts, ClientOpts, TestCgroup, TestNet, free_port, one_service_config, run_client};
    if !nllb_tests::privileged() {
        return;
    }
    const PORT: u16 = 6443;
    let net = TestNet::new(3);
    let _servers: Vec<_> = net.serve_all(PORT, "controller-");
    let addrs: Vec<String> = net.hosts().iter().map(|h| h.v4.to_string()).collect();
    let api = FakeApiServer::start();
    let eps: Vec<(&str, bool)> = addrs.iter().map(|a| (a.as_str(), true)).collect();
    api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &eps));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), &api.url());

    let cg = TestCgroup::new();
    let vip = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let extra = format!("discovery:\n  kubernetes:\n    kubeconfig: {}\n", kubeconfig.display());
    // No static backends: whatever the agent serves came from the API.
    let mut agent = Agent::start(&AgentOpts {
        config_yaml: one_service_config(&[&vip.to_string()], PORT, &[], &extra),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    let with_port = |list: &[&String]| list.iter().map(|a| format!("{a}:{PORT}")).collect::<BTreeSet<_>>();
    let all = with_port(&addrs.iter().collect::<Vec<_>>());
    wait_published(&agent, &all);
    agent.wait_kernel_backends("apiserver", &all, Duration::from_secs(20));
    let report = run_client(&ClientOpts::new(vip, 60, Some(cg.path())));
    assert_eq!(report.ok_count(), 60, "{:?}", report.failed());
    assert_eq!(report.by_body().len(), 3, "every discovered controller gets connects: {:?}", report.by_body());

    // Controller 2 leaves the API's list: no more connects land on it.
    api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &eps[..2]));
    wait_published(&agent, &with_port(&[&addrs[0], &addrs[1]]));
    let report = run_client(&ClientOpts::new(vip, 40, Some(cg.path())));
    assert_eq!(report.ok_count(), 40, "{:?}", report.failed());
    assert!(!report.by_body().contains_key("controller-2"), "removed controller still used: {:?}", report.by_body());
    assert_eq!(report.by_body().len(), 2);

    // The API goes away: discovery notices and the set stays.
    const KEPT: &str = "keeping the last controller set";
    let noticed = agent.log().matches(KEPT).count();
    api.stop();
    nllb_tests::wait_for(Duration::from_secs(20), || (agent.log().matches(KEPT).count() > noticed).then_some(()))
        .unwrap_or_else(|| panic!("discovery never noticed the API going away; log:\n{}", agent.log()));
    assert_eq!(published(&agent), with_port(&[&addrs[0], &addrs[1]]));
    let report = run_client(&ClientOpts::new(vip, 20, Some(cg.path())));
    assert_eq!(report.ok_count(), 20, "{:?}", report.failed());

    // Restart with the API still down: the cached set is served at once.
    let cache = agent.state_dir.join("controllers.json");
    assert!(cache.exists(), "no controller cache in {}", agent.state_dir.display());
    agent.restart(&[]);
    wait_published(&agent, &with_port(&[&addrs[0], &addrs[1]]));
    let report = run_client(&ClientOpts::new(vip, 20, Some(cg.path())));
    assert_eq!(report.ok_count(), 20, "{:?}", report.failed());
    assert!(!report.by_body().contains_key("controller-2"));

    // The API comes back with a new list: the agent follows it.
    api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &eps[1..]));
    api.restart();
    wait_published(&agent, &with_port(&[&addrs[1], &addrs[2]]));
}

/// End to end, the bootstrap: the agent's kubeconfig names nllb's own
/// virtual address and the only static backend is one controller. The
/// agent reaches the API on that controller directly (certificate checked
/// for 127.0.0.1), learns all three, and serves them.
#[test]
fn agent_bootstraps_from_a_kubeconfig_that_points_at_its_own_vip() {
    use nllb_tests::fake_apiserver::FakeApiOpts;
    use nllb_tests::{Agent, AgentOpts, ClientOpts, TestCgroup, TestNet, free_port, run_client};
    if !nllb_tests::privileged() {
        return;
    }
    const WEB: u16 = 8080;
    let net = TestNet::new(3);
    let hosts = net.hosts();
    let _servers: Vec<_> = hosts.iter().enumerate().map(|(i, h)| h.serve(WEB, &format!("controller-{i}"))).collect();
    // The API server runs on controller 0 only.
    let api = FakeApiServer::start_with(FakeApiOpts {
        bind: std::net::SocketAddr::new(hosts[0].v4, 0),
        netns: Some(hosts[0].netns.name.clone()),
        ..Default::default()
    });
    let addrs: Vec<String> = hosts.iter().map(|h| h.v4.to_string()).collect();
    let eps: Vec<(&str, bool)> = addrs.iter().map(|a| (a.as_str(), true)).collect();
    api.apply_slice(&endpoint_slice(NS, "kubernetes", SVC, &eps));

    let api_vip = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let web_vip = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), &format!("https://{api_vip}"));
    let config = format!(
        "services:\n  - name: apiserver\n    listen: [\"{api_vip}\"]\n    backendPort: {}\n  - name: web\n    listen: [\"{web_vip}\"]\n    backendPort: {WEB}\nbackends: [\"{}\"]\ndiscovery:\n  kubernetes:\n    kubeconfig: {}\n",
        api.addr().port(),
        addrs[0],
        kubeconfig.display()
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&AgentOpts { config_yaml: config, cgroup: cg.path().to_path_buf(), ..Default::default() });
    wait_published(&agent, &addrs.iter().map(|a| format!("{a}:{}", api.addr().port())).collect());
    assert!(api.count("LIST endpointslices") >= 1, "{:?}", api.requests());
    agent.wait_kernel_backends("web", &addrs.iter().map(|a| format!("{a}:{WEB}")).collect(), Duration::from_secs(20));
    let report = run_client(&ClientOpts::new(web_vip, 45, Some(cg.path())));
    assert_eq!(report.ok_count(), 45, "{:?}", report.failed());
    assert_eq!(report.by_body().len(), 3, "{:?}", report.by_body());
}
