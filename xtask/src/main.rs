//! `cargo xtask <task>`: everything a person or CI runs, from a fresh machine on.

mod arch;
mod bench;
mod bpffs;
mod build;
mod cmd;
mod demo;
mod kube;
mod paths;
mod setup;
mod test;
mod vmtest;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nllb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (Debian packages, nightly + rust-src,
    /// bpf-linker, Envoy, and for each cross target its Rust target, cross
    /// compiler and qemu); idempotent, says what it did.
    Setup {
        /// Also build the real control plane for the tests (kube-apiserver
        /// and etcd, from tests/kube/go.mod); `cargo xtask test` does this
        /// itself when it runs those tests.
        #[arg(long)]
        kube: bool,
    },
    /// Build the release `nllb` binary, for this machine or cross-compiled
    /// (`--target aarch64-unknown-linux-gnu,armv7-unknown-linux-gnueabihf`;
    /// `arm64`, `armv7`, `riscv64` work too).
    Build {
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
    },
    /// Set up, build `nllb`, run the workspace tests (privileged ones too).
    Test {
        /// Passed on to `cargo test` (write them after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Live demo: three simulated controllers in network namespaces, the agent
    /// on a demo cgroup, connections to 127.0.0.1:7443 spread across them.
    Demo {
        /// How many connections to make through the virtual address.
        #[arg(long, default_value_t = 12)]
        connects: usize,
    },
    /// Benchmark nllb against a direct connection, Envoy and HAProxy, side by
    /// side (`--quick` for a run under a minute); writes BENCHMARKS.md.
    Bench {
        /// Passed on to nllb-bench (e.g. --quick, --only direct,nllb).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot Debian kernels under qemu and run the datapath tests in each.
    VmTest {
        /// Comma-separated architectures: x86-64 (default), arm64, armv7,
        /// riscv64. Other than x86-64, the binaries are cross-built and the
        /// guest boots that architecture's Debian kernel under its qemu (TCG).
        #[arg(long, value_delimiter = ',')]
        arch: Vec<String>,
        /// Comma-separated kernels: 5.10, 6.1, 6.12, 7 (default: all four on
        /// x86-64; 6.1 and 7 on arm64 and armv7; 6.12 and 7 on riscv64).
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
        /// Kernels booted at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Run only tests whose `<binary>::<test>` name contains this.
        #[arg(long)]
        tests: Option<String>,
        /// nllb-tests binaries run in the guests (`all` for every one): the
        /// end-to-end tests whose outcome depends on the kernel (the eBPF
        /// half of `modes` includes passive ejection). The others (health's
        /// probe timing, manifests, discovery, ...) test userspace and run
        /// on the host; `--binaries all` runs them in the guests too.
        #[arg(long, value_delimiter = ',', default_value = "datapath,lifecycle,operations,modes,platform")]
        binaries: Vec<String>,
        /// Build the agent in release mode, as deployed (the tests stay
        /// debug builds): its RSS in the matrix is then the deployed one.
        #[arg(long)]
        release_agent: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup { kube } => {
            setup::setup_all()?;
            if kube {
                kube::binaries()?;
            }
            Ok(())
        }
        Task::Build { target } => build::build(&target),
        Task::Test { cargo_args } => {
            let code = test::test(&cargo_args)?;
            std::process::exit(code);
        }
        Task::Demo { connects } => demo::demo(connects),
        Task::Bench { args } => {
            let code = bench::bench(&args)?;
            std::process::exit(code);
        }
        Task::VmTest { arch, kernels, jobs, tests, binaries, release_agent } => {
            let code = vmtest::vm_test(&vmtest::Options {
                arches: &arch,
                kernels: &kernels,
                jobs,
                filter: tests.as_deref().unwrap_or(""),
                binaries: &binaries,
                release_agent,
            })?;
            std::process::exit(code);
        }
    }
}
