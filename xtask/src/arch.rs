//! The CPU architectures nllb is built and tested for, and what each needs:
//! its Rust target, Debian's cross compiler (for crates with C code: ring),
//! its kernel package and the qemu that boots it.

use anyhow::{Result, bail};
use std::process::Command;

#[derive(Debug, PartialEq, Eq)]
pub struct Arch {
    /// The name `--arch` takes and the matrix shows.
    pub name: &'static str,
    /// Other names accepted for it (`uname -m`, Debian's, Docker's).
    pub aliases: &'static [&'static str],
    pub triple: &'static str,
    /// Debian's architecture name (package lists, `APT::Architecture`).
    pub debian: &'static str,
    /// GNU triplet: the cross tools' prefix and the multiarch lib dir.
    pub gnu: &'static str,
    /// Debian's cross compiler for this target (none for the host) and the
    /// C library it links against (only recommended by the compiler, so
    /// `--no-install-recommends` would leave it out).
    pub cross_gcc: Option<(&'static str, &'static str)>,
    /// The kernel meta package's flavour: `linux-image-<flavour>`.
    pub kernel_flavour: &'static str,
    pub qemu: Qemu,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Qemu {
    pub binary: &'static str,
    pub package: &'static str,
    /// Machine and CPU (TCG: the host's KVM is unusable for stock kernels).
    pub machine: &'static [&'static str],
    /// The serial console the kernel writes to.
    pub console: &'static str,
    /// More kernel command line for this machine.
    pub append: &'static str,
    /// How much slower than an x86-64 guest the tests run here, measured:
    /// the guest stretches its readiness timeouts by 10x this.
    pub slowdown: u32,
}

pub const X86_64: Arch = Arch {
    name: "x86-64",
    aliases: &["x86_64", "amd64"],
    triple: "x86_64-unknown-linux-gnu",
    debian: "amd64",
    gnu: "x86_64-linux-gnu",
    cross_gcc: None,
    kernel_flavour: "amd64",
    qemu: Qemu {
        binary: "qemu-system-x86_64",
        package: "qemu-system-x86",
        machine: &["-accel", "tcg"],
        console: "ttyS0",
        append: "",
        slowdown: 1,
    },
};

pub const ARM64: Arch = Arch {
    name: "arm64",
    aliases: &["aarch64"],
    triple: "aarch64-unknown-linux-gnu",
    debian: "arm64",
    gnu: "aarch64-linux-gnu",
    cross_gcc: Some(("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")),
    kernel_flavour: "arm64",
    qemu: Qemu {
        binary: "qemu-system-aarch64",
        package: "qemu-system-arm",
        // cortex-a57: `max` adds pointer authentication, which TCG emulates slowly.
        machine: &["-accel", "tcg", "-M", "virt", "-cpu", "cortex-a57"],
        console: "ttyAMA0",
        // KASLR makes the kernel force page table isolation, whose TLB
        // flush on every kernel entry is what TCG emulates most slowly.
        append: "nokaslr",
        slowdown: 2,
    },
};

pub const ARMV7: Arch = Arch {
    name: "armv7",
    aliases: &["armhf", "arm", "armv7l", "arm/v7"],
    triple: "armv7-unknown-linux-gnueabihf",
    debian: "armhf",
    gnu: "arm-linux-gnueabihf",
    cross_gcc: Some(("gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross")),
    // armmp-lpae: what Cortex-A7/A15 boards with LPAE run; qemu's virt
    // machine (cortex-a15) is one.
    kernel_flavour: "armmp-lpae",
    qemu: Qemu {
        binary: "qemu-system-arm",
        package: "qemu-system-arm",
        // highmem=off: a 32-bit kernel cannot reach PCI windows above 4 GiB.
        machine: &["-accel", "tcg", "-M", "virt,highmem=off", "-cpu", "cortex-a15"],
        console: "ttyAMA0",
        append: "",
        slowdown: 2,
    },
};

pub const RISCV64: Arch = Arch {
    name: "riscv64",
    aliases: &["riscv64gc"],
    triple: "riscv64gc-unknown-linux-gnu",
    debian: "riscv64",
    gnu: "riscv64-linux-gnu",
    cross_gcc: Some(("gcc-riscv64-linux-gnu", "libc6-dev-riscv64-cross")),
    kernel_flavour: "riscv64",
    qemu: Qemu {
        binary: "qemu-system-riscv64",
        package: "qemu-system-misc",
        machine: &["-accel", "tcg", "-M", "virt"],
        console: "ttyS0",
        append: "",
        slowdown: 3,
    },
};

pub const ALL: [&Arch; 4] = [&X86_64, &ARM64, &ARMV7, &RISCV64];

/// Cross targets: every architecture but the host's.
pub fn cross() -> impl Iterator<Item = &'static Arch> {
    ALL.into_iter().filter(|a| a.cross_gcc.is_some())
}

/// By `--arch` name or alias, or by Rust target triple.
pub fn find(name: &str) -> Result<&'static Arch> {
    let n = name.trim();
    if let Some(a) = ALL.into_iter().find(|a| a.name == n || a.triple == n || a.aliases.contains(&n)) {
        return Ok(a);
    }
    let known: Vec<String> = ALL.iter().map(|a| format!("{} ({})", a.name, a.triple)).collect();
    bail!("unknown architecture `{n}`; known: {}", known.join(", "))
}

impl Arch {
    /// The host's own architecture needs no cross compiler.
    pub fn is_host(&self) -> bool {
        self.cross_gcc.is_none()
    }

    /// `<gnu>-<tool>`, e.g. `arm-linux-gnueabihf-gcc`.
    pub fn tool(&self, tool: &str) -> String {
        format!("{}-{tool}", self.gnu)
    }

    /// Points cargo (linker) and the `cc` crate (compiler, archiver) at
    /// Debian's cross tools, so nobody sets anything by hand.
    pub fn apply_cross_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        if self.is_host() {
            return cmd;
        }
        let upper = self.triple.to_uppercase().replace('-', "_");
        let lower = self.triple.replace('-', "_");
        cmd.env(format!("CARGO_TARGET_{upper}_LINKER"), self.tool("gcc"))
            .env(format!("CC_{lower}"), self.tool("gcc"))
            .env(format!("AR_{lower}"), self.tool("ar"))
    }

    /// The Debian packages setup installs for this architecture.
    pub fn debian_packages(&self) -> Vec<&'static str> {
        let mut p: Vec<&'static str> = self.cross_gcc.into_iter().flat_map(|(gcc, libc)| [gcc, libc]).collect();
        // riscv64's firmware (OpenSBI) comes with qemu (qemu-system-data).
        p.push(self.qemu.package);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_triples_find_the_same_arch() {
        assert_eq!(find("armv7").unwrap(), &ARMV7);
        assert_eq!(find("armhf").unwrap(), &ARMV7);
        assert_eq!(find("armv7-unknown-linux-gnueabihf").unwrap(), &ARMV7);
        assert_eq!(find("aarch64").unwrap(), &ARM64);
        assert_eq!(find("amd64").unwrap(), &X86_64);
        assert!(find("mips").is_err());
    }

    #[test]
    fn cross_env_names_follow_cargo_and_cc() {
        let mut c = Command::new("true");
        ARMV7.apply_cross_env(&mut c);
        let envs: Vec<(String, String)> = c
            .get_envs()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.unwrap().to_string_lossy().into_owned()))
            .collect();
        assert!(envs.contains(&(
            "CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER".into(),
            "arm-linux-gnueabihf-gcc".into()
        )));
        assert!(envs.contains(&("CC_armv7_unknown_linux_gnueabihf".into(), "arm-linux-gnueabihf-gcc".into())));
    }
}
