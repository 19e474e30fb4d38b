//! `cargo xtask <task>`: everything a person or CI runs, from a fresh machine on.

mod cmd;
mod demo;
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
    /// bpf-linker, Envoy); idempotent, says what it did.
    Setup,
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
    /// Boot Debian kernels under qemu and run the datapath tests in each.
    VmTest {
        /// Comma-separated kernels: 5.10, 6.1, 6.12, 7 (default: all).
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
        /// Kernels booted at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup().map(|_| ()),
        Task::Test { cargo_args } => {
            let code = test::test(&cargo_args)?;
            std::process::exit(code);
        }
        Task::Demo { connects } => demo::demo(connects),
        Task::VmTest { kernels, jobs } => {
            let code = vmtest::vm_test(&kernels, jobs)?;
            std::process::exit(code);
        }
    }
}
