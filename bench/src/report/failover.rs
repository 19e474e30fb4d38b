//! The failover section: one table per fault.

use std::fmt::Write as _;

use crate::results::{FailoverResult, Results};

pub fn section(s: &mut String, r: &Results) {
    let _ = writeln!(s, "\n## Failover\n");
    if r.failover.is_empty() {
        let _ = writeln!(
            s,
            "Not measured in this run: {}.",
            r.failover_note
                .as_deref()
                .unwrap_or("no failover configuration was available")
        );
        return;
    }
    let _ = writeln!(
        s,
        "An open-loop client through the path (each attempt a connect–request–response–close); after 2 s one of the \
         three controllers fails. Every path is started fresh for every fault. \"Longest wait\" is the longest any \
         attempt in flight at the fault or started after it waited (for its answer, its error or its timeout); \
         \"last failure\" is when the last failed attempt started, counted from the fault: the time until connects \
         stop failing.\n"
    );
    for (fault, title) in [
        (
            "rst",
            "The controller's server is killed (connects are refused)",
        ),
        (
            "blackhole",
            "The controller stops answering (blackholed, no RST): clients with 30 s timeouts",
        ),
    ] {
        let rows: Vec<&FailoverResult> = r.failover.iter().filter(|f| f.fault == fault).collect();
        let Some(f0) = rows.first() else { continue };
        let _ = writeln!(
            s,
            "### {title}\n\n{} connects/s, each with a {} s timeout{}.\n\n\
             | path | attempts | failed | longest wait | last failure after fault | recovered in window |\n\
             |---|---:|---:|---:|---:|---|",
            f0.rate,
            f0.timeout_ms as f64 / 1000.0,
            if fault == "blackhole" {
                " (eight clients at 10/s, as in issue 11; 30 s is client-go's dial timeout); nftables drops everything \
                 inside the controller's namespace"
            } else {
                ""
            }
        );
        for f in rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} s | {} | {} ({:.0} s window) |",
                f.label,
                f.attempts,
                f.failed_after_fault,
                f.longest_wait_ms / 1000.0,
                f.last_failure_ms
                    .map_or("none failed".into(), |v| format!("{:.2} s", v / 1000.0)),
                if f.recovered { "yes" } else { "**no**" },
                f.window_ms as f64 / 1000.0
            );
        }
        let _ = writeln!(s);
    }
    let mut seen = Vec::new();
    for f in &r.failover {
        if !seen.contains(&&f.label) {
            seen.push(&f.label);
            let _ = writeln!(
                s,
                "- **{}**: {}",
                f.label,
                f.note.as_deref().unwrap_or("").replace('\n', " ")
            );
        }
    }
    if let Some(n) = &r.failover_note {
        let _ = writeln!(s, "\nNot measured: {n}.");
    }
}
