//! The `nllb` command line: the agent and the tools around it.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad flag or config (nothing
//! was changed on the machine).

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use nllb::{
    agent::{self, AgentOptions},
    datapath::ebpf::remove_pins,
    logging::{self, LogFormat},
    status,
};

#[derive(Parser)]
#[command(name = "nllb", version, about = "In-kernel node-local load balancer for Kubernetes workers")]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Locations {
    /// bpffs directory holding this agent's maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/nllb")]
    pin_path: PathBuf,
    /// Directory for the agent's status file.
    #[arg(long, default_value = "/run/nllb")]
    run_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: install the datapath and keep it current.
    Agent {
        #[arg(long)]
        config: PathBuf,
        /// Derive the `apiserver` and `konnectivity` services from a k0s
        /// cluster config (k0s's node-local load balancing ports).
        #[arg(long, value_name = "FILE")]
        k0s_config: Option<PathBuf>,
        /// cgroup v2 directory to attach to (default: the cgroup2 mount's root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        loc: Locations,
        /// Where the last good controller set is cached.
        #[arg(long, default_value = "/var/lib/nllb")]
        state_dir: PathBuf,
        /// Remove programs and pins on exit (default: the datapath keeps
        /// serving the last published backends until `nllb uninstall`).
        #[arg(long)]
        detach_on_exit: bool,
        /// Prometheus `/metrics`, `/healthz` and `/readyz` (default
        /// 127.0.0.1:9542, or the config's metricsAddr).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// auto: eBPF when the kernel and privileges allow it, else Envoy
        /// (the reason is logged); ebpf: fail instead of falling back.
        #[arg(long, value_enum)]
        mode: Option<nllb::config::Mode>,
        /// The Envoy binary for envoy mode (default: envoy.binary, then
        /// $NLLB_ENVOY_BINARY, then `envoy` on PATH).
        #[arg(long, value_name = "FILE")]
        envoy_binary: Option<PathBuf>,
    },
    /// What this node supports and which datapath `--mode auto` would pick.
    /// Exit 0: eBPF works; 3: only Envoy; 4: neither.
    Detect(nllb::detect::DetectArgs),
    /// Print the Envoy configuration envoy mode would generate.
    EnvoyConfig(EnvoyConfigArgs),
    /// Show services, backends and counters from the pinned maps.
    Status {
        #[command(flatten)]
        loc: Locations,
        #[arg(long)]
        json: bool,
    },
    /// Stream the datapath's decisions live, one line each: steered,
    /// skipped, refused, marks, recoveries, connects the agent aborted.
    Trace {
        #[command(flatten)]
        loc: Locations,
        #[command(flatten)]
        args: nllb::trace::TraceArgs,
    },
    /// Remove programs, links and pins left under the pin path.
    Uninstall {
        #[command(flatten)]
        loc: Locations,
    },
    /// Write a copy of a component kubeconfig whose server is a service's
    /// virtual address; prints the original server.
    Kubeconfig(nllb::kubeconfig::KubeconfigArgs),
}

/// `nllb envoy-config --config FILE [--work-dir DIR]`.
#[derive(Clone, Debug, Args)]
struct EnvoyConfigArgs {
    #[arg(long)]
    config: PathBuf,
    /// The directory the agent would write into (`<run-dir>/envoy`).
    #[arg(long, default_value = "/run/nllb/envoy")]
    work_dir: PathBuf,
}

/// Prints the bootstrap and every dynamic file the agent would write into
/// the work directory for the config's static backends; 2 for a bad config.
fn envoy_config(args: &EnvoyConfigArgs) -> i32 {
    match nllb::config::Config::load(&args.config) {
        Ok(cfg) => {
            let plan = nllb::model::Plan::all_backends(&cfg.services, &cfg.backends);
            let opts = nllb::envoy::render_options(&cfg.envoy, &cfg.passive);
            print!(
                "{}",
                nllb::envoy::render::render_all(&nllb::envoy::render::Layout::new(&args.work_dir), &plan, &opts)
            );
            0
        }
        Err(e) => {
            eprintln!("nllb envoy-config: {e}");
            2
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let code = match cli.command {
        Command::Agent {
            config,
            k0s_config,
            cgroup,
            loc,
            state_dir,
            detach_on_exit,
            metrics_addr,
            mode,
            envoy_binary,
        } => {
            let opts = AgentOptions {
                config_path: config,
                k0s_config,
                cgroup,
                pin_path: loc.pin_path,
                run_dir: loc.run_dir,
                state_dir,
                detach_on_exit,
                metrics_addr,
                mode,
                envoy_binary,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(agent::run(opts)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("nllb agent: {}", nllb::errors::chain(&e));
                    e.exit_code()
                }
            }
        }
        Command::Status { loc, json } => {
            let report = status::report(&loc.pin_path, &loc.run_dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("status JSON"));
            } else {
                print!("{}", status::render(&report));
            }
            let served = report.datapath_installed || nllb::stand_aside::node_served(&report);
            if report.agent_running && served { 0 } else { 1 }
        }
        Command::Trace { loc, args } => match nllb::trace::run(&loc.pin_path, &loc.run_dir, &args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("nllb trace: {}", nllb::errors::chain(&e));
                e.exit_code()
            }
        },
        Command::Detect(args) => nllb::detect::run_detect(args),
        Command::EnvoyConfig(args) => envoy_config(&args),
        Command::Kubeconfig(args) => match nllb::kubeconfig::run(&args) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("nllb kubeconfig: {}", nllb::errors::chain(&e));
                // Bad input (config, kubeconfig) is the operator's to fix.
                if matches!(e, nllb::kubeconfig::KubeconfigError::Write { .. }) { 1 } else { 2 }
            }
        },
        Command::Uninstall { loc } => match remove_pins(&loc.pin_path) {
            Ok(n) => {
                println!("removed {n} pins under {}", loc.pin_path.display());
                let _ = std::fs::remove_file(loc.run_dir.join(status::STATUS_FILE));
                0
            }
            Err(e) => {
                eprintln!("nllb uninstall: {}", nllb::errors::chain(&e));
                1
            }
        },
    };
    ExitCode::from(code as u8)
}
