//! The guest's initramfs: one archive with everything every kernel shares
//! (busybox, ip/nft/bpftool and their libraries, `nllb`, the test binaries,
//! /init) and a small per-kernel one (its modules, its label). The kernel
//! unpacks concatenated gzip'd cpio archives in order, so the shared part is
//! packed once per run.

use super::kernels::Kernel;
use super::userland::Userland;
use crate::cmd;
use anyhow::{Context as _, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Host tools the tests call, copied in with their shared libraries.
const GUEST_TOOLS: &[&str] = &["ip", "nft", "bpftool"];

/// Modules loaded in the guest (dependencies resolved from each module's
/// own `depends=`). veth is what test hosts need; nf_tables lets a test
/// blackhole a host; the *_diag modules serve sock_diag SOCK_DESTROY (a
/// host autoloads them through modprobe, which the guest lacks); netem
/// lets a test add delay. Names a kernel has built in are simply not found.
const GUEST_MODULES: &[&str] =
    &["veth", "nf_tables", "nft_reject_inet", "inet_diag", "tcp_diag", "udp_diag", "sch_netem"];

/// A test binary for the guest and the name its results carry.
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// What the guest needs to know about itself: its architecture and how much
/// slower than an x86-64 guest it runs (timeouts scale by it).
pub struct GuestEnv<'a> {
    pub arch: &'a str,
    pub slowdown: u32,
}

/// Builds the shared archive in `work` and returns its path.
pub fn shared_archive(
    work: &Path,
    userland: &Userland,
    guest: &GuestEnv<'_>,
    nllb: &Path,
    tests: &[TestBinary],
    host_bins: &[PathBuf],
    filter: &str,
) -> Result<PathBuf> {
    let root = work.join("shared-root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "tests", "proc", "sys", "dev", "run", "tmp", "root", "etc", "modules"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    // Older iproute2 keeps named network namespaces under /var/run/netns.
    std::fs::create_dir_all(root.join("var"))?;
    std::os::unix::fs::symlink("../run", root.join("var/run"))?;

    std::fs::copy(userland.busybox()?, root.join("bin/busybox"))?;
    set_executable(&root.join("bin/busybox"))?;

    let strip = userland.strip();
    let mut elf: Vec<PathBuf> = Vec::new();
    for tool in GUEST_TOOLS {
        let path = userland.tool(tool)?;
        let dest = root.join("usr/sbin").join(tool);
        copy_stripped(&strip, &path, &dest)?;
        elf.push(path);
    }
    copy_stripped(&strip, nllb, &root.join("nllb"))?;
    elf.push(nllb.to_path_buf());
    for t in tests {
        copy_stripped(&strip, &t.path, &root.join("tests").join(&t.name))?;
        elf.push(t.path.clone());
    }
    // /tests/list says which executables are test binaries to run.
    let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
    std::fs::write(root.join("tests/list"), names.join("\n") + "\n")?;
    std::fs::write(root.join("tests/filter"), filter)?;
    // The package's own binaries (e.g. nllb-testclient): beside the test
    // binaries, where the harness looks for them next to its own exe, and
    // at their host path, which env!("CARGO_BIN_EXE_...") compiled in.
    for b in host_bins {
        let name = b.file_name().context("binary path without a file name")?;
        copy_stripped(&strip, b, &root.join("tests").join(name))?;
        copy_stripped(&strip, b, &root.join(b.strip_prefix("/").unwrap_or(b)))?;
        elf.push(b.clone());
    }
    for (lib, rel) in userland.libraries(&elf)? {
        let dest = root.join(rel);
        if !dest.exists() {
            std::fs::create_dir_all(dest.parent().unwrap())?;
            std::fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
        }
    }
    std::fs::write(root.join("guest-env"), format!("ARCH={}\nSLOWDOWN={}\n", guest.arch, guest.slowdown))?;
    let init = root.join("init");
    std::fs::write(&init, INIT)?;
    set_executable(&init)?;
    let out = work.join("shared.cpio.gz");
    pack(&root, &out)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(out)
}

/// Per-kernel archive: modules (decompressed, in load order), the label and
/// the kernel's build configuration at `/boot/config-<release>`, where
/// `nllb detect` reads options such as the BPF JIT's. Returns the full
/// initrd (shared + this) in `dir`.
pub fn kernel_initrd(dir: &Path, shared: &Path, label: &str, kernel: &Kernel) -> Result<PathBuf> {
    let modules_dir = &kernel.modules;
    let root = dir.join("kernel-root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("modules"))?;
    std::fs::write(root.join("kernel-label"), format!("{label}\n"))?;
    if let Some(config) = &kernel.config {
        std::fs::create_dir_all(root.join("boot"))?;
        std::fs::copy(config, root.join("boot").join(format!("config-{}", kernel.release)))?;
    }
    let order = resolve_modules(modules_dir, &root.join("modules"))?;
    std::fs::write(root.join("modules/order"), order.join("\n") + "\n")?;
    let part = dir.join("kernel.cpio.gz");
    pack(&root, &part)?;
    let _ = std::fs::remove_dir_all(&root);
    let initrd = dir.join("initrd.gz");
    let mut bytes = std::fs::read(shared)?;
    bytes.extend(std::fs::read(&part)?);
    std::fs::write(&initrd, bytes)?;
    Ok(initrd)
}

/// Copies the wanted modules and their dependencies (decompressed: busybox
/// insmod may not read xz/zstd) into `dest`; returns names in load order.
fn resolve_modules(modules_dir: &Path, dest: &Path) -> Result<Vec<String>> {
    let mut index = BTreeMap::new();
    index_modules(&modules_dir.join("kernel"), &mut index)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in GUEST_MODULES {
        add_module(&normalize(m), &index, dest, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn add_module(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    dest: &Path,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let Some(src) = index.get(name) else { return Ok(()) }; // built in
    let bytes = decompress(src)?;
    for dep in modinfo_list(&bytes, "depends=", ',') {
        add_module(&normalize(&dep), index, dest, seen, order)?;
    }
    // "softdep=pre: crc32c": an algorithm the module asks the crypto API
    // for at load time. No modules.alias ships in the package, so the
    // provider is found by the usual module names.
    for soft in pre_softdeps(&bytes) {
        let soft = normalize(&soft);
        if let Some(provider) =
            [soft.clone(), format!("{soft}_generic"), format!("{soft}_intel")].into_iter().find(|n| index.contains_key(n))
        {
            add_module(&provider, index, dest, seen, order)?;
        }
    }
    std::fs::write(dest.join(format!("{name}.ko")), &bytes)?;
    order.push(name.to_owned());
    Ok(())
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, index)?;
        } else if let Some(n) = p.file_name().map(|n| n.to_string_lossy().into_owned()) {
            for ext in [".ko", ".ko.xz", ".ko.zst"] {
                if let Some(stem) = n.strip_suffix(ext) {
                    index.insert(normalize(stem), p.clone());
                }
            }
        }
    }
    Ok(())
}

/// Module names treat '-' and '_' alike.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return std::fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = cmd::raw_output(Command::new(tool).arg("-dc").arg(path))?;
    if !out.status.success() {
        bail!("`{tool} -dc {name}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// A `key=` entry of a module's .modinfo section, split at `sep`.
fn modinfo_list(ko: &[u8], key: &str, sep: char) -> Vec<String> {
    let key = [b"\0", key.as_bytes()].concat();
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &ko[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(sep)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Names after `pre:` in `softdep=pre: a b post: c`.
fn pre_softdeps(ko: &[u8]) -> Vec<String> {
    modinfo_list(ko, "softdep=", ' ')
        .into_iter()
        .skip_while(|w| w != "pre:")
        .skip(1)
        .take_while(|w| !w.ends_with(':'))
        .collect()
}

/// Debug info is most of a debug build's size and useless in the guest.
fn copy_stripped(strip: &str, src: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest.parent().unwrap())?;
    cmd::output(Command::new(strip).arg("--strip-debug").arg("-o").arg(dest).arg(src))
        .or_else(|_| std::fs::copy(src, dest).map(|_| String::new()).map_err(anyhow::Error::from))
        .with_context(|| format!("copying {} into the initramfs", src.display()))?;
    set_executable(dest)
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `find . | busybox cpio -o -H newc -R 0:0 | gzip` (no cpio binary needed).
fn pack(root: &Path, out: &Path) -> Result<()> {
    let script = "find . | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 > \"$1\"";
    cmd::output(Command::new("sh").args(["-c", script, "pack"]).arg(out).current_dir(root))?;
    Ok(())
}

/// The guest's PID 1. Prints machine-readable lines the host scrapes:
/// NLLB-BOOT, NLLB-RESULT <kernel> <test> ok|flaky|FAILED|ignored [seconds], NLLB-DETECT-*,
/// NLLB-DONE. Each test runs in its own process (`--exact`), so a result
/// is its exit status and never depends on parsing interleaved output.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/sbin:/usr/bin:/bin HOME=/root
# ARCH, SLOWDOWN (how much slower than an x86-64 guest this one runs).
. /guest-env
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# 5.10 charges BPF maps to RLIMIT_MEMLOCK.
ulimit -l unlimited
ip link set lo up
K=$(cat /kernel-label)
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "NLLB-INFO $K insmod $m failed"
done
# Kernel messages on the console would cut into result lines (module
# loading above still shows its errors).
echo "1 4 1 7" > /proc/sys/kernel/printk
echo "NLLB-BOOT $K $(uname -r) $ARCH"
echo "NLLB-INFO $K bpf_jit_enable=$(cat /proc/sys/net/core/bpf_jit_enable 2>/dev/null || echo absent)"
# NLLB_IN_VM / NLLB_TIMEOUT_SCALE: TCG runs ~10x slower than the host (more
# for other CPUs); a harness can stretch its readiness timeouts by this factor.
export CI=1 NLLB_BIN=/nllb RUST_BACKTRACE=1 NLLB_IN_VM=1 NLLB_TIMEOUT_SCALE=$((10 * SLOWDOWN))

result() { echo "NLLB-RESULT $K $1 $2"; }
run_one() { timeout $((300 * SLOWDOWN)) "$t" --exact "$name" --test-threads=1 < /dev/null > /tmp/log 2>&1; }

# Smoke tests: the agent binary runs here, and (once it exists) lists
# the kernel features it detects.
if /nllb --help > /tmp/out 2>&1; then result smoke::nllb-runs ok; else cat /tmp/out; result smoke::nllb-runs FAILED; fi
if grep -q ' /sys/fs/bpf bpf ' /proc/mounts && grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts; then
    result smoke::bpffs-and-cgroup2 ok
else
    result smoke::bpffs-and-cgroup2 FAILED
fi
# What the end-to-end tests build their test hosts from. Full paths:
# busybox sh prefers its own (smaller) applets over PATH.
check() { name=$1; shift; if "$@" > /tmp/out 2>&1; then result "$name" ok; else cat /tmp/out; result "$name" FAILED; fi; }
check smoke::netns-veth sh -c 'I=/usr/sbin/ip; $I netns add smoke && $I link add smoke0 type veth peer name eth0 netns smoke && $I -n smoke link set eth0 up && $I link del smoke0 && $I netns del smoke'
check smoke::nftables sh -c 'N=/usr/sbin/nft; $N add table inet nllbsmoke && $N add chain inet nllbsmoke out "{ type filter hook output priority 0; }" && $N add rule inet nllbsmoke out ip daddr 198.18.9.9 drop && $N delete table inet nllbsmoke'
if /nllb detect --help > /tmp/detect-help 2>&1; then
    # JSON when offered: the host turns it into a feature x kernel table.
    if grep -q -- --json /tmp/detect-help; then
        /nllb detect --json > /tmp/detect 2>/dev/null; rc=$?
    else
        /nllb detect > /tmp/detect 2>&1; rc=$?
    fi
    echo "NLLB-DETECT-BEGIN $K"; cat /tmp/detect; echo "NLLB-DETECT-END $K"
    if [ $rc = 0 ]; then result smoke::nllb-detect ok; else result smoke::nllb-detect FAILED; fi
    # A kernel that ships its BPF JIT switched off (Debian's armhf kernels):
    # would the JIT compile nllb's programs once switched on?
    if [ "$(cat /proc/sys/net/core/bpf_jit_enable 2>/dev/null)" = 0 ] && echo 1 > /proc/sys/net/core/bpf_jit_enable; then
        /nllb detect --json > /tmp/detect-jit 2>/dev/null
        echo "NLLB-JIT-ON $K $(sed -n 's/.*"programs_jited": *\([a-z]*\).*/\1/p' /tmp/detect-jit | head -n 1)"
        echo 0 > /proc/sys/net/core/bpf_jit_enable
    fi
fi

# The agent's memory here: a small config (one service, two controllers
# that never answer, so panic mode publishes both and probes keep running),
# sampled once the datapath is installed and ten probe rounds have run.
rss() {
    cg=/sys/fs/cgroup/nllb-rss; pins=/sys/fs/bpf/nllb-rss
    mkdir -p $cg /tmp/rss
    printf 'services:\n  - name: apiserver\n    listen: ["127.0.0.1:7443"]\n    backendPort: 6443\nbackends: ["198.18.0.1", "198.18.0.2"]\n' > /tmp/rss/config.yaml
    /nllb agent --config /tmp/rss/config.yaml --cgroup $cg --pin-path $pins --run-dir /tmp/rss \
        --state-dir /tmp/rss --metrics-addr 127.0.0.1:19542 --detach-on-exit > /tmp/rss/log 2>&1 &
    pid=$!
    i=0; ok=
    while [ $i -lt $((60 * SLOWDOWN)) ] && kill -0 $pid 2>/dev/null; do
        if /nllb status --pin-path $pins --run-dir /tmp/rss > /dev/null 2>&1; then ok=1; break; fi
        sleep 1; i=$((i + 1))
    done
    # Steady state: twenty probes done (a bounded wait: the figure is a
    # measurement, the check above is what passes or fails).
    i=0
    while [ -n "$ok" ] && [ $i -lt $((15 * SLOWDOWN)) ]; do
        n=$(wget -q -O - http://127.0.0.1:19542/metrics 2>/dev/null | sed -n 's/^nllb_probe_duration_seconds_count{.*} //p' | awk '{s+=$1} END {print s+0}')
        [ "${n:-0}" -ge 20 ] && break
        sleep 1; i=$((i + 1))
    done
    if [ -n "$ok" ]; then
        echo "NLLB-RSS $K $(sed -n 's/^VmRSS:[^0-9]*\([0-9]*\).*/\1/p' /proc/$pid/status) $(sed -n 's/^VmHWM:[^0-9]*\([0-9]*\).*/\1/p' /proc/$pid/status)"
        result smoke::agent-rss ok
    else
        sed "s/^/  | /" /tmp/rss/log; result smoke::agent-rss FAILED
    fi
    kill -TERM $pid 2>/dev/null; wait $pid
    rmdir $cg 2>/dev/null
}
case "$(cat /tests/filter)" in ""|*smoke*) rss ;; esac

for b in $(cat /tests/list); do
    t=/tests/$b
    "$t" --list --format terse --ignored 2>/dev/null | sed -n 's/: test$//p' > /tmp/ignored
    if ! "$t" --list --format terse > /tmp/list.raw 2>&1; then
        cat /tmp/list.raw; result "$b::(list)" FAILED; continue
    fi
    sed -n 's/: test$//p' /tmp/list.raw > /tmp/list
    while read -r name; do
        case "$b::$name" in *"$(cat /tests/filter)"*) ;; *) continue ;; esac
        if grep -qxF "$name" /tmp/ignored; then result "$b::$name" ignored; continue; fi
        # The guest carries no Envoy: Envoy-mode tests run on the host only
        # (cargo xtask test) and show as not run here, never as passed.
        case "$name" in *envoy*) result "$b::$name" ignored; continue ;; esac
        echo "NLLB-RUN $K $b::$name"
        s=$(date +%s)
        # One retry: a pass on the second run is reported as "flaky".
        if run_one; then
            r=ok
        else
            sed "s/^/  | /" /tmp/log
            echo "NLLB-RETRY $K $b::$name"
            if run_one; then r=flaky; else sed "s/^/  | /" /tmp/log; r=FAILED; fi
        fi
        result "$b::$name" "$r $(( $(date +%s) - s ))"
    done < /tmp/list
done
echo "NLLB-DONE $K"
poweroff -f
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_is_read_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=nfnetlink,libcrc32c\0retpoline=Y\0";
        assert_eq!(modinfo_list(ko, "depends=", ','), ["nfnetlink", "libcrc32c"]);
        assert!(modinfo_list(b"\0depends=\0name=veth\0", "depends=", ',').is_empty());
        assert_eq!(pre_softdeps(b"\0softdep=pre: crc32c post: x\0"), ["crc32c"]);
    }
}
