//! nllb's in-kernel datapath.
//!
//! connect4/connect6 rewrite a connect to a virtual loopback address onto one
//! of its service's backends; getpeername4/6 hide the rewrite from the
//! application; sock_ops watches the outcome of connects to backends and
//! marks a backend that refuses or drops SYNs, so the next connects avoid it
//! before any probe notices.
//!
//! Every entry point is thin and fails open: when a connect is not ours, or
//! anything unexpected happens, the program lets it proceed untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod datapath;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so
    // this is never called at run time.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
