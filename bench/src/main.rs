//! `nllb-bench`: nllb against a direct connection, Envoy and HAProxy, in one
//! run on one machine. `cargo xtask bench [--quick]` runs it.

mod backend;
mod bpfstats;
mod child;
mod connects;
mod failover;
mod floor;
mod k0s;
mod kernel_cost;
mod loadgen;
mod netns;
mod nllb_paths;
mod paths;
mod procstat;
mod proxies;
mod report;
mod results;
mod run;
mod scale;
mod workloads;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmark nllb against a direct connection, Envoy and HAProxy (run as root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Short single-round run without failover (under a minute); writes
    /// bench/results/quick.json and leaves BENCHMARKS.md alone.
    #[arg(long)]
    quick: bool,
    /// The nllb binary (default: env NLLB_BIN, else built with cargo in release mode).
    #[arg(long, env = "NLLB_BIN")]
    nllb_bin: Option<PathBuf>,
    /// The Envoy binary (default: the project's venv ~/.cache/nllb/envoy-venv, then PATH).
    #[arg(long)]
    envoy_bin: Option<PathBuf>,
    /// Do not pin client, proxies and backends to cores.
    #[arg(long)]
    no_pin: bool,
    /// Skip the failover scenarios of the full run.
    #[arg(long)]
    no_failover: bool,
    /// Run the failover scenarios in a --quick run too.
    #[arg(long, conflicts_with = "no_failover")]
    failover: bool,
    /// Skip the in-kernel cost and scale sections.
    #[arg(long)]
    no_kernel: bool,
    /// Only these paths (comma separated: direct, nllb, envoy, haproxy, k0s); direct is the baseline, keep it.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Nice value for the benchmark and everything it starts (inherited), so
    /// that builds running beside it disturb the figures less; 0 to leave it.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,
    /// Concurrency of the "high" closed-loop runs.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Results file (default: bench/results/latest.json, or quick.json with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write BENCHMARKS.md and docs/bench-chart.svg (default: yes for a full run, no for --quick).
    #[arg(long)]
    write_docs: Option<bool>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: one load-generator run, spec and result as JSON.
    #[command(hide = true)]
    Client {
        #[arg(long)]
        spec: String,
    },
    /// Internal: connect+close loops from several cgroups, interleaved.
    #[command(hide = true)]
    Connects {
        #[arg(long)]
        spec: String,
    },
    /// Internal: hold many connections until stdin closes.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        spec: String,
    },
    /// Only the scale section (1 to 64 backends, 1 to 256 services): the
    /// curve printed, nothing written. For working on the datapath's cost.
    Scale {
        /// 1,500 connects per point instead of 20,000.
        #[arg(long)]
        quick: bool,
    },
    /// Only the in-kernel cost with 65,536 sockets held (none, unsteered,
    /// steered; floor and nllb interleaved): printed, nothing written.
    Held {
        /// One round of 2,000 connects per row instead of three of 20,000.
        #[arg(long)]
        quick: bool,
    },
    /// Regenerate BENCHMARKS.md and the chart from a results file.
    Report {
        #[arg(default_value = "bench/results/latest.json")]
        results: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    match cli.cmd {
        Some(Cmd::Client { spec }) => {
            let spec: loadgen::ClientSpec =
                serde_json::from_str(&spec).context("parsing --spec")?;
            let r = loadgen::run_client(&spec)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Some(Cmd::Connects { spec }) => {
            let spec: connects::LoopSpec = serde_json::from_str(&spec).context("parsing --spec")?;
            println!("{}", serde_json::to_string(&connects::run_loop(&spec)?)?);
            Ok(())
        }
        Some(Cmd::Hold { spec }) => {
            connects::run_hold(&serde_json::from_str(&spec).context("parsing --spec")?)
        }
        Some(Cmd::Scale { quick }) => run::scale_only(quick),
        Some(Cmd::Held { quick }) => run::held_only(quick),
        Some(Cmd::Report { results }) => {
            let path = if results.is_absolute() {
                results
            } else {
                root.join(results)
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let r: results::Results = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            write_docs(&root, &r)
        }
        None => {
            raise_nofile();
            if cli.nice != 0 {
                // Before any thread exists: threads and children inherit it.
                // SAFETY: setpriority has no memory-safety preconditions.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, cli.nice) } != 0 {
                    eprintln!(
                        "warning: could not set nice {}: {}",
                        cli.nice,
                        std::io::Error::last_os_error()
                    );
                }
            }
            let opts = run::Options {
                quick: cli.quick,
                nllb_bin: cli.nllb_bin,
                envoy_bin: cli.envoy_bin,
                pin: !cli.no_pin,
                failover: cli.failover || (!cli.quick && !cli.no_failover),
                kernel: !cli.no_kernel,
                only: cli.only,
                high_concurrency: cli.concurrency,
            };
            let results = run::run(&opts)?;
            let out = cli.out.unwrap_or_else(|| {
                root.join(if cli.quick {
                    "bench/results/quick.json"
                } else {
                    "bench/results/latest.json"
                })
            });
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&out, serde_json::to_string_pretty(&results)? + "\n")?;
            eprintln!("== wrote {}", out.display());
            let md = report::markdown(&results, Some("docs/bench-chart.svg"));
            if cli.write_docs.unwrap_or(!cli.quick) {
                write_docs(&root, &results)?;
            } else {
                let chart = out.with_extension("svg");
                std::fs::write(&chart, report::svg(&results))?;
                println!("{md}");
                eprintln!("== wrote {}", chart.display());
            }
            Ok(())
        }
    }
}

fn write_docs(root: &Path, r: &results::Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(root.join("docs"))?;
    std::fs::write(root.join("docs/bench-chart.svg"), report::svg(r))?;
    std::fs::write(
        root.join("BENCHMARKS.md"),
        report::markdown(r, Some("docs/bench-chart.svg")),
    )?;
    eprintln!(
        "== wrote {} and {}",
        root.join("BENCHMARKS.md").display(),
        root.join("docs/bench-chart.svg").display()
    );
    Ok(())
}

/// The table-at-capacity figure holds 65,536 connections (and the backends
/// in this process accept them): raise the open-file limit for us and the
/// children, which inherit it.
fn raise_nofile() {
    let want = 1 << 18;
    // SAFETY: setrlimit with a valid struct; root may raise the hard limit.
    let ok = unsafe {
        let lim = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
    };
    if !ok {
        eprintln!(
            "warning: could not raise the open-file limit to {want}: {}",
            std::io::Error::last_os_error()
        );
    }
}
