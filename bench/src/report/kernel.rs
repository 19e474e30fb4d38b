//! The in-kernel sections: cost per connect against the floor, latency of
//! connects that are not to a virtual address, the scale curve, tracing.

use std::fmt::Write as _;

use super::goals::{above_floor, case, vs_plain};
use crate::results::{CostCase, KernelCost, Results, ScalePoint};

/// The hooks a connect runs (bpftool's attach types), in the order it runs them.
const HOOKS: [&str; 3] = [
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_sock_ops",
];

/// "runs per connect × ns per run" of the program at `attach`.
fn cell(c: &CostCase, attach: &str) -> String {
    match c.program(attach) {
        Some(p) if c.connects > 0 => format!(
            "{:.1} × {:.0}",
            p.run_cnt as f64 / c.connects as f64,
            p.ns_per_run()
        ),
        _ => "–".into(),
    }
}

pub fn section(s: &mut String, r: &Results) {
    let _ = writeln!(s, "\n## In-kernel cost per connect\n");
    match &r.kernel {
        Some(k) => {
            cost(s, k);
            latency(s, k);
            tracing(s, k);
            for n in &k.notes {
                let _ = writeln!(s, "- Not measured: {n}");
            }
        }
        None => {
            let _ = writeln!(s, "Not measured in this run.\n");
        }
    }
    scale(s, &r.scale);
    for n in &r.kernel_notes {
        let _ = writeln!(s, "- {n}");
    }
}

fn cost(s: &mut String, k: &KernelCost) {
    let n = k.cases.first().map_or(0, |c| c.connects);
    let _ = writeln!(
        s,
        "From the kernel's own accounting (`kernel.bpf_stats_enabled=1`: run_time_ns / run_cnt of every program \
         attached to the client's cgroup), over {n} connects per row. One client process makes plain blocking connects, \
         each followed by getpeername (as Go's `net.Dial` does) and a close (SO_LINGER 0), and moves between the \
         cgroups every 250 connects, so the rows of a pair were measured interleaved, on the same machine state. \
         **The floor** is nllb's own empty programs (`nllb_floor_connect4`, `nllb_floor_sock_ops`, from the object the \
         agent embeds) attached to a cgroup of the benchmark's own: what any program at these hooks costs, the call \
         and the accounting's two clock reads per run. A cell is runs per connect × ns per run.\n\n\
         | connect | connect4 | getpeername4 | sock_ops | ns per connect | minus the floor |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    for c in &k.cases {
        let floor_id = c.id.replacen("nllb", "floor", 1);
        let minus = if c.id.starts_with("nllb") {
            above_floor(k, &c.id, &floor_id).map_or("–".into(), |v| format!("**{v:.0}**"))
        } else {
            String::new()
        };
        let cells: Vec<String> = HOOKS.iter().map(|a| cell(c, a)).collect();
        let errs = if c.errors > 0 {
            format!(
                " ({} failed: {})",
                c.errors,
                c.first_error.as_deref().unwrap_or("")
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| {}{errs} | {} | {:.0} | {minus} |",
            c.label,
            cells.join(" | "),
            c.ns_per_connect()
        );
    }
    if let Some(h) = &k.held {
        let full = case(k, "nllb-vip-full");
        let _ = writeln!(
            s,
            "\n**Many sockets held.** nllb's programs (the datapath library the agent runs) on a cgroup of the \
             benchmark's own, one service leading to loopback listeners that accept and drop (so a held connection \
             costs the listener no descriptor) and a second leading to a listener of its own, which the measured \
             connects use (a connect towards an address most of whose source ports are taken tries several ports, \
             each a cold hash walk, and that alone made even the empty floor programs 3-6x slower). Three states, \
             each measured floor and nllb interleaved, in a full run in three rounds (the order reversed every other \
             round: the states follow one another), summed per state: no sockets held; {} sockets held that nllb did not steer \
             (holders connected to the listeners directly: no per-socket state); {} of {} held through the virtual \
             address{}, each with its state in its own socket storage (`NLLB_SOCKETS`, no capacity; earlier builds \
             kept it in a 65,536-entry hash whose full state cost 3.7 µs per connect and broke getpeername). The \
             last two leave the machine in the same state (as many sockets to the same listeners), so their \
             difference is what nllb's per-socket state costs a connect. During the steered rows the kernel could \
             not remember {} of the {} measured steered connects (`sockets_full`, counting each round's 100 \
             warm-up connects too); getpeername answered the virtual address for {} of them.",
            h.unsteered,
            h.held,
            h.wanted,
            h.first_error
                .as_deref()
                .map(|e| format!(" (it stopped at: {e})"))
                .unwrap_or_default(),
            h.not_remembered,
            full.map_or(0, |c| c.connects),
            full.map_or(0, |c| c.latency.peer_is_dialed),
        );
    }
    let _ = writeln!(
        s,
        "\nA connect that is not to a virtual address costs nllb a hash lookup that misses (connect4) and an op switch \
         per sock_ops call plus, at TIMEOUT_INIT, a socket-storage lookup that finds none (a NULL check); nothing runs \
         at close. A steered connect adds the rewrite, creating the socket's storage, and the STATE/RTO callbacks \
         until it is established."
    );
}

fn latency(s: &mut String, k: &KernelCost) {
    if k.latency.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n### Connects that are not to a virtual address\n\n\
         Connect + getpeername + close to a listener on loopback, timed by the client, from a cgroup without programs, \
         a second such cgroup (the A/A pair: what noise alone does), the floor's cgroup and nllb's, interleaved every \
         250 connects in one process, with run-time accounting {}.\n\n\
         | from | connects | p50 µs | p90 µs | mean µs | p50 vs no program |\n|---|---:|---:|---:|---:|---:|",
        if k.latency_stats_on {
            "**on** (someone else had turned it on: the figures include its clock reads)"
        } else {
            "off"
        }
    );
    for c in &k.latency {
        let l = &c.latency;
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            c.label,
            c.connects,
            l.p50_ns / 1000.0,
            l.p90_ns / 1000.0,
            l.mean_ns / 1000.0,
            vs_plain(k, &c.id).map_or("–".into(), |v| format!("{v:.3}×"))
        );
    }
}

fn tracing(s: &mut String, k: &KernelCost) {
    let [off, on] = [
        k.tracing.iter().find(|c| c.id == "trace-off"),
        k.tracing.iter().find(|c| c.id == "trace-on"),
    ];
    let (Some(off), Some(on)) = (off, on) else {
        return;
    };
    let _ = writeln!(
        s,
        "\n### Tracing off vs on (issue 16)\n\n\
         nllb's connects to the virtual address, three runs with no trace reader and three with tracing on \
         (`NLLB_TRACE_CTL` set an hour ahead through `KernelMaps::set_trace_until`, as `nllb trace` does), alternating. \
         With tracing on, a reader on the other core drained `NLLB_TRACE_EVENTS` the way `nllb trace` does \
         ({} events read for {} traced connects, {} lost because the ring was full).\n\n\
         | | connects | `nllb_connect4` ns per run | all programs, ns per connect |\n|---|---:|---:|---:|",
        k.trace_events, on.connects, k.trace_events_lost
    );
    for c in [off, on] {
        let c4 = c
            .program("cgroup_inet4_connect")
            .map_or("–".into(), |p| format!("{:.0}", p.ns_per_run()));
        let _ = writeln!(
            s,
            "| {} | {} | {c4} | {:.0} |",
            c.label,
            c.connects,
            c.ns_per_connect()
        );
    }
}

fn scale(s: &mut String, points: &[ScalePoint]) {
    if points.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n### Scale\n\n\
         nllb's datapath code (the library the agent runs) publishes every size at once, each on a cgroup of the \
         benchmark's own; the backends are addresses of one simulated controller, the services' virtual addresses \
         are in 127.77.0.0/16. One client process measures all sizes side by side, moving between their cgroups \
         every 250 connects, so a slow stretch of the machine falls on every size alike. The services axis is \
         measured twice, on datapaths of its own each: the client connects to every service in turn, or to one \
         service of the n published. Figures are all programs' ns per connect (bpf_stats) and `nllb_connect4`'s \
         ns per run.\n\n\
         What to compare: the lookups are a hash (virtual address) and two array indexes (service table, backend \
         slot), so the table's size alone changes nothing (the \"one of them\" row). A client that spreads its \
         connects over n services, or nllb's random pick over n backends, comes back to a given service or \
         backend only after others, so the memory nllb keeps for it (the service's table, the backend's slot, \
         mark and counters) is met cold more often: that, not the size of a table, is what the other two rows \
         add as n grows. With one service and one backend it stays in cache for all 250 connects of a batch.\n"
    );
    for (axis, head) in [
        ("backends", "one service with n backends"),
        (
            "services",
            "n services, 3 backends each, connects to every one in turn",
        ),
        (
            crate::scale::ONE_OF_N,
            "n services, 3 backends each, connects to one of them",
        ),
    ] {
        let row: Vec<&ScalePoint> = points.iter().filter(|p| p.axis == axis).collect();
        if row.is_empty() {
            continue;
        }
        let ns: Vec<String> = row.iter().map(|p| p.n.to_string()).collect();
        let _ = writeln!(
            s,
            "| {head} | {} |\n|---|{}",
            ns.join(" | "),
            "---:|".repeat(row.len())
        );
        let all: Vec<String> = row
            .iter()
            .map(|p| format!("{:.0}", p.case.ns_per_connect()))
            .collect();
        let c4: Vec<String> = row
            .iter()
            .map(|p| {
                p.case
                    .program("cgroup_inet4_connect")
                    .map_or("–".into(), |x| format!("{:.0}", x.ns_per_run()))
            })
            .collect();
        let _ = writeln!(s, "| ns per connect | {} |", all.join(" | "));
        let _ = writeln!(s, "| connect4 ns per run | {} |\n", c4.join(" | "));
    }
}
