//! BENCHMARKS.md and the SVG chart, both generated from `Results` so that the
//! document never disagrees with the numbers next to it.

use std::fmt::Write as _;

use crate::results::{Measurement, Results, WorkloadResult};

mod failover;
mod goals;
mod kernel;
mod svg;

pub use svg::svg;

pub(crate) fn ratio(v: f64, base: f64) -> String {
    if base > 0.0 && v.is_finite() {
        format!("{:.2}×", v / base)
    } else {
        "–".into()
    }
}

pub(crate) fn label<'a>(r: &'a Results, id: &'a str) -> &'a str {
    r.paths
        .iter()
        .find(|p| p.id == id)
        .map_or(id, |p| p.label.as_str())
}

/// Paths in the order they were set up (direct first).
fn ordered<'a>(r: &'a Results, w: &'a WorkloadResult) -> Vec<(&'a str, &'a Measurement)> {
    r.paths
        .iter()
        .filter_map(|p| w.runs.get(&p.id).map(|m| (p.id.as_str(), m)))
        .collect()
}

pub fn markdown(r: &Results, chart_rel: Option<&str>) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# Benchmarks\n");
    if r.quick {
        let _ = writeln!(
            s,
            "> **QUICK RUN** (`--quick`): {} round(s) of {:.1} s per workload, a tenth of the connects per in-kernel \
             figure{}. These figures are for development; the full run (`cargo xtask bench`) replaces this file.\n",
            r.settings.rounds,
            r.settings.run_ms as f64 / 1000.0,
            if r.failover.is_empty() {
                ", no failover"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        s,
        "nllb against a direct connection, Envoy and HAProxy, measured side by side in one run \
         by `cargo xtask bench` (crate `bench/`, binary `nllb-bench`; `--quick` for a run under a minute). \
         Raw numbers: `bench/results/latest.json`.\n"
    );
    let _ = writeln!(
        s,
        "This run took {:.0} s (wall time). Load average (1 min) {:.2} at the start, {:.2} at the end.\n",
        r.wall_s, m.load_start, m.load_end
    );
    let _ = writeln!(
        s,
        "## Run it\n\n\
         ```sh\n\
         cargo xtask bench            # full run (about 10 minutes on 2 cores): rewrites this file, the chart and bench/results/latest.json\n\
         cargo xtask bench --quick    # about 2 minutes: bench/results/quick.json, prints the tables, leaves this file alone\n\
         cargo run --release -p nllb-bench -- --help   # the same binary directly (as root): --only, --no-failover, --no-kernel, ...\n\
         ```\n\n\
         It needs root (network namespaces, cgroups, BPF), `haproxy`, `nft`, `bpftool` and Envoy from the project's venv \
         (`cargo xtask setup`). Without a path's binary the path is listed as not measured, with the reason.\n"
    );
    let _ = writeln!(s, "## Machine and method\n");
    let _ = writeln!(
        s,
        "- Kernel `{}`, {} cores ({}), {:.0} GiB memory. Load average (1 min) {:.1} at the start, {:.1} at the end: \
         other work shared the machine, so absolute figures are noisy; ratios within the run are what to compare.",
        m.kernel, m.nproc, m.cpu_model, m.mem_gib, m.load_start, m.load_end
    );
    let [w50, w99, wmax] = m.wakeup_late_ms;
    // Results files from before the probe existed carry zeros: say nothing then.
    if wmax > 0.0 {
        let _ = writeln!(
            s,
            "- Machine noise measured just before the run: a 1 ms sleep on the client core woke up late by {w50:.2} ms (median), \
         {w99:.1} ms (p99), {wmax:.1} ms (worst) — on an idle machine all three are well under 1 ms.{}",
            if w99 > 2.0 || m.load_start.max(m.load_end) > m.nproc as f64 {
                " **This run's machine was busy: every latency tail and every rate below is inflated by other work; \
             compare median latencies and CPU per operation, and ratios, not absolute rates. Every comparison is side by side \
             and interleaved within the run (paths alternate round by round, cgroups batch by batch), so the load hits \
             both sides of a ratio alike.**"
            } else {
                ""
            }
        );
    }
    let st = &r.settings;
    let pin = match (st.client_cpu, st.proxy_cpu, st.backend_cpu) {
        (Some(c), Some(p), Some(b)) => format!(
            "client on CPU {c}, proxy/agent on CPU {p} (the \"worker node\"), backends on CPU {b} (the \"controllers\")"
        ),
        _ => "no pinning".into(),
    };
    let _ = writeln!(
        s,
        "- Backends: 3 simulated controllers ({}) in their own network namespaces behind veth pairs, \
         each an HTTP echo server on :6443 and a bulk source on :6444. {pin}.",
        st.backends.join(", ")
    );
    let _ = writeln!(
        s,
        "- Load generator: Rust/tokio, one client process per measurement that moves itself into the \
         measured cgroup before its first connect. Each figure is the median of that figure over {} round(s) of {:.1} s \
         (closed loop); rounds alternate between paths so background noise hits all of them alike. On a busy machine \
         the rate (a mean) suffers most from stalls; the median latency and CPU per operation are the steadier figures.",
        st.rounds,
        st.run_ms as f64 / 1000.0
    );
    let _ = writeln!(
        s,
        "- CPU per operation = client CPU (getrusage) + proxy/agent CPU (each thread's /proc/<pid>/task/<tid>/schedstat, in ns, \
         including children) during the run, divided by operations. Kernel work done in softirq context on behalf of other \
         processes is not attributed to anyone, for any path alike.\n"
    );
    let _ = writeln!(s, "| path | what it is |\n|---|---|");
    for p in &r.paths {
        let state = if p.available {
            ""
        } else {
            "**not measured:** "
        };
        let _ = writeln!(
            s,
            "| {} | {state}{} |",
            p.label,
            p.note
                .as_deref()
                .unwrap_or("")
                .replace('|', "/")
                .replace('\n', " ")
        );
    }
    if let Some(c) = chart_rel {
        let _ = writeln!(
            s,
            "\n![throughput, median latency and CPU per operation relative to direct]({c})\n"
        );
    }
    goals::section(&mut s, r);

    for w in &r.workloads {
        let Some(base) = w.runs.get("direct") else {
            continue;
        };
        let _ = writeln!(s, "\n## {}\n", capitalize(&w.title));
        if w.id == "bulk" {
            let _ = writeln!(
                s,
                "| path | Gbit/s | vs direct | CPU µs per 64 KiB | vs direct |\n|---|---:|---:|---:|---:|"
            );
            for (id, x) in ordered(r, w) {
                let _ = writeln!(
                    s,
                    "| {} | {:.2} | {} | {:.1} | {} |",
                    label(r, id),
                    x.client.gbit_s,
                    ratio(x.client.gbit_s, base.client.gbit_s),
                    x.cpu_us_per_op,
                    ratio(x.cpu_us_per_op, base.cpu_us_per_op)
                );
            }
            continue;
        }
        let unit = &w.unit;
        let op = if w.id.starts_with("crr") {
            "conn"
        } else {
            "req"
        };
        let _ = writeln!(
            s,
            "| path | {unit} | vs direct | p50 µs | p99 µs | vs direct | p99.9 µs | CPU µs/{op} | vs direct | errors |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut flagged = false;
        for (id, x) in ordered(r, w) {
            let c = &x.client;
            let mark = if unsteady(x) {
                flagged = true;
                " †"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "| {} | {:.0}{mark} | {} | {:.0} | {:.0} | {} | {:.0} | {:.1} | {} | {} |",
                label(r, id),
                c.rate,
                ratio(c.rate, base.client.rate),
                c.p50_us,
                c.p99_us,
                ratio(c.p99_us, base.client.p99_us),
                c.p999_us,
                x.cpu_us_per_op,
                ratio(x.cpu_us_per_op, base.cpu_us_per_op),
                c.errors
            );
        }
        if flagged {
            let _ = writeln!(
                s,
                "\n† the rounds' rates differed by more than 2× (min to max): this rate says more about the machine than about the path."
            );
        }
    }

    kernel::section(&mut s, r);

    let _ = writeln!(s, "\n## Footprint\n");
    let _ = writeln!(
        s,
        "Process tree of each path (agent, agent + Envoy, Envoy, HAProxy). Idle: nothing connecting; \
         load: during the highest-concurrency connect–request–response–close run. {}\n\n\
         | path | RSS idle MiB | CPU idle % of a core | RSS under load MiB | CPU under load % of a core |\n|---|---:|---:|---:|---:|",
        files_note(&r.settings)
    );
    for f in &r.footprint {
        let (lr, lc) = f.load.as_ref().map_or(("–".into(), "–".into()), |u| {
            (
                format!("{:.1}", u.rss_kib as f64 / 1024.0),
                format!("{:.1}", u.cpu_pct),
            )
        });
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.2} | {lr} | {lc} |",
            label(r, &f.path),
            f.idle.rss_kib as f64 / 1024.0,
            f.idle.cpu_pct
        );
    }

    failover::section(&mut s, r);

    let _ = writeln!(s, "\n## Where nllb is not ahead\n");
    let notes = honest_notes(r);
    if notes.is_empty() {
        let _ = writeln!(
            s,
            "In this run nllb's eBPF path was at least as fast as every proxy on every workload."
        );
    }
    for n in notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

/// Rounds whose rates differ by more than 2×: other work dominated the figure.
fn unsteady(m: &Measurement) -> bool {
    let min = m.round_rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = m.round_rates.iter().copied().fold(0.0, f64::max);
    m.round_rates.len() > 1 && max > 2.0 * min
}

fn capitalize(t: &str) -> String {
    let mut c = t.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// Plain statements wherever a proxy beat nllb or nllb fell well short of direct.
fn honest_notes(r: &Results) -> Vec<String> {
    let mut notes = Vec::new();
    if !r.paths.iter().any(|p| p.id == "nllb" && p.available) {
        notes.push("nllb's eBPF path was not measured in this run, so nothing here supports a claim about it.".into());
        return notes;
    }
    // Margins keep run-to-run noise out of the list: a difference smaller
    // than 10% (20% for p99) is not reported as nllb being behind.
    for w in &r.workloads {
        let (Some(n), Some(d)) = (w.runs.get("nllb"), w.runs.get("direct")) else {
            continue;
        };
        let bulk = w.id == "bulk";
        let rate = |m: &Measurement| if bulk { m.client.gbit_s } else { m.client.rate };
        let p50s = |m: &Measurement| {
            if bulk {
                String::new()
            } else {
                format!(
                    " (median latency {:.0} µs vs nllb's {:.0} µs)",
                    m.client.p50_us, n.client.p50_us
                )
            }
        };
        if rate(n) < 0.9 * rate(d) {
            notes.push(format!(
                "{}: nllb reached {:.0}% of direct's rate{}.",
                w.title,
                100.0 * rate(n) / rate(d),
                p50s(d).replace("median latency", "direct's median latency")
            ));
        }
        for (id, x) in &w.runs {
            // nllb in place over k0s's Envoy is nllb's own datapath, not a competitor.
            if id == "nllb" || id == "direct" || id == crate::k0s::IN_PLACE_ID {
                continue;
            }
            if rate(x) > 1.1 * rate(n) {
                notes.push(format!(
                    "{}: {} had {:.2}× nllb's rate{}.",
                    w.title,
                    label(r, id),
                    rate(x) / rate(n),
                    p50s(x)
                ));
            }
            if !bulk && x.client.p50_us < 0.9 * n.client.p50_us {
                notes.push(format!(
                    "{}: {} had a lower median latency than nllb ({:.0} vs {:.0} µs).",
                    w.title,
                    label(r, id),
                    x.client.p50_us,
                    n.client.p50_us
                ));
            }
            if !bulk && x.client.p99_us < 0.8 * n.client.p99_us {
                notes.push(format!(
                    "{}: {} had a lower p99 than nllb ({:.0} vs {:.0} µs).",
                    w.title,
                    label(r, id),
                    x.client.p99_us,
                    n.client.p99_us
                ));
            }
        }
    }
    for g in goals::goals(r).iter().filter(|g| g.met == Some(false)) {
        notes.push(format!(
            "Goal not met: {} (goal {}): {}.",
            g.what, g.target, g.measured
        ));
    }
    for f in &r.failover {
        if f.path == "nllb" && f.failed_after_fault > 0 {
            notes.push(format!(
                "Failover ({}): {} connects failed through nllb before the dead controller was ejected (last at {:.2} s); \
                 a connect-time balancer cannot retry a connect elsewhere, a proxy can.",
                f.fault,
                f.failed_after_fault,
                f.last_failure_ms.unwrap_or(0.0) / 1000.0
            ));
        }
    }
    if let Some(w) = r
        .workloads
        .iter()
        .find(|w| w.id.starts_with("rr_c") && w.id != "rr_c1")
        && let (Some(n), Some(d)) = (w.runs.get("nllb"), w.runs.get("direct"))
    {
        notes.push(format!(
            "Noise floor: over persistent connections nllb does no work after the connect, so its traffic is the same as \
             direct's; the gap between the two on \"{}\" ({:.2}× in rate) is what chance alone did in this run. \
             Differences smaller than that mean nothing.",
            w.title,
            n.client.rate / d.client.rate.max(1e-9)
        ));
    }
    notes.push(
        "Everything runs on one 2-core machine shared with other work: backends, client and proxies compete \
         for the same cores, and veth stands in for a real NIC, so absolute numbers are low and noisy; compare ratios within a run."
            .into(),
    );
    notes
}

/// Where the agents wrote their status file every second, which an idle
/// agent's CPU depends on.
fn files_note(settings: &crate::results::Settings) -> String {
    match (settings.files_in.as_str(), settings.files_on_tmpfs) {
        ("", _) => String::new(),
        (dir, true) => format!(
            "The agents' run directories (the status file, rewritten every second) were in {dir}, a tmpfs, as /run is on a node."
        ),
        (dir, false) => format!(
            "The agents' run directories (the status file, rewritten every second) were in {dir}, not a tmpfs: idle CPU includes disk-filesystem writes a node's /run does not make."
        ),
    }
}
