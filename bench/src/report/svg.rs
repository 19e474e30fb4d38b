//! The chart beside BENCHMARKS.md: each path's figures relative to direct.

use std::fmt::Write as _;

use super::label;
use crate::results::{Measurement, Results, WorkloadResult};

fn color(id: &str) -> &'static str {
    match id {
        "direct" => "#8c8c8c",
        "nllb" => "#2ca02c",
        "nllb-envoy" | "envoy" => "#ff7f0e",
        "haproxy" => "#1f77b4",
        _ => "#9467bd",
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Three panels of grouped bars, each bar a path's figure as a percentage of
/// direct: throughput (higher is better), p99 latency and CPU per operation
/// (lower is better).
pub fn svg(r: &Results) -> String {
    type Metric = fn(&Measurement, bool) -> f64;
    let panels: [(&str, Metric, bool); 3] = [
        (
            "Throughput, % of direct (higher is better)",
            |m, bulk| if bulk { m.client.gbit_s } else { m.client.rate },
            true,
        ),
        (
            "Median (p50) latency, % of direct (lower is better; p99 is in the tables)",
            |m, _| m.client.p50_us,
            false,
        ),
        (
            "CPU per operation (client + proxy), % of direct (lower is better)",
            |m, _| m.cpu_us_per_op,
            true,
        ),
    ];
    let paths: Vec<&str> = r
        .paths
        .iter()
        .filter(|p| p.available)
        .map(|p| p.id.as_str())
        .collect();
    let (w, ph, top, left) = (980.0, 230.0, 70.0, 60.0);
    let h = top + panels.len() as f64 * (ph + 60.0) + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="16" font-weight="bold" text-anchor="middle">nllb vs direct, Envoy, HAProxy — kernel {}, {} cores{}</text>"#,
        w / 2.0,
        esc(&r.machine.kernel),
        r.machine.nproc,
        if r.quick { " (quick run)" } else { "" }
    );
    // Legend.
    let mut lx = left;
    for id in &paths {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="36" width="12" height="12" fill="{}"/><text x="{}" y="46">{}</text>"#,
            color(id),
            lx + 16.0,
            esc(label(r, id))
        );
        lx += 30.0 + 7.0 * label(r, id).chars().count() as f64;
    }
    for (pi, (title, metric, _)) in panels.iter().enumerate() {
        let y0 = top + pi as f64 * (ph + 60.0);
        let groups: Vec<(&WorkloadResult, Vec<(&str, f64)>)> = r
            .workloads
            .iter()
            .filter(|wl| !(pi == 1 && wl.id == "bulk"))
            .filter_map(|wl| {
                let bulk = wl.id == "bulk";
                let base = metric(wl.runs.get("direct")?, bulk);
                (base > 0.0).then(|| {
                    (
                        wl,
                        paths
                            .iter()
                            .filter_map(|id| {
                                wl.runs
                                    .get(*id)
                                    .map(|m| (*id, 100.0 * metric(m, bulk) / base))
                            })
                            .collect(),
                    )
                })
            })
            .collect();
        let max = groups
            .iter()
            .flat_map(|g| g.1.iter().map(|v| v.1))
            .fold(100.0f64, f64::max);
        let scale_max = (max / 50.0).ceil() * 50.0;
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
            y0 + 14.0,
            esc(title)
        );
        let (py, pheight) = (y0 + 24.0, ph - 24.0);
        let pw = w - left - 20.0;
        // Grid lines every 50 %.
        let mut g = 0.0;
        while g <= scale_max {
            let y = py + pheight - pheight * g / scale_max;
            let stroke = if g == 100.0 { "#444" } else { "#ddd" };
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{stroke}"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{g:.0}%</text>"##,
                left + pw,
                left - 4.0,
                y + 4.0
            );
            g += 50.0;
        }
        let gw = pw / groups.len().max(1) as f64;
        for (gi, (wl, bars)) in groups.iter().enumerate() {
            let gx = left + gi as f64 * gw;
            let bw = (gw - 20.0) / bars.len().max(1) as f64;
            for (bi, (id, v)) in bars.iter().enumerate() {
                let bh = pheight * v / scale_max;
                let x = gx + 10.0 + bi as f64 * bw;
                let y = py + pheight - bh;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{}: {v:.0}%</title></rect>"#,
                    bw - 2.0,
                    color(id),
                    esc(label(r, id))
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.0}</text>"#,
                    x + (bw - 2.0) / 2.0,
                    y - 3.0
                );
            }
            let short = short_title(&wl.id, r.settings.high_concurrency);
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                gx + gw / 2.0,
                py + pheight + 16.0,
                esc(&short)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn short_title(id: &str, c: usize) -> String {
    match id {
        "crr_c1" => "connect+req+close ×1".into(),
        "rr_c1" => "req/resp, 1 conn".into(),
        "bulk" => "bulk, 1 conn".into(),
        x if x == format!("crr_c{c}") => format!("connect+req+close ×{c}"),
        x if x == format!("rr_c{c}") => format!("req/resp, {c} conns"),
        x => x.into(),
    }
}
