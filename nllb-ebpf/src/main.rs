//! nllb's in-kernel datapath.
//!
//! connect4/connect6 rewrite a connect to a virtual loopback address onto one
//! of its service's backends and remember what they did in the socket's own
//! storage (freed with the socket); getpeername4/6 hide the rewrite from the
//! application; sock_ops bounds the SYN time of steered connects and marks a
//! backend whose SYNs are refused or go unanswered, so the next connects
//! avoid it before any probe notices.
//!
//! Every entry point is thin and fails open: when a connect is not ours, or
//! anything unexpected happens, the program lets it proceed untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod floor;
#[cfg(target_arch = "bpf")]
mod hooks;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod marks;
#[cfg(target_arch = "bpf")]
mod passive;
#[cfg(target_arch = "bpf")]
mod peer;
#[cfg(target_arch = "bpf")]
mod sockets;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so
    // this is never called at run time.
    unsafe { core::hint::unreachable_unchecked() }
}

// The kernel only lets GPL-compatible programs call most helpers; the
// crate is licensed Apache-2.0 OR GPL-2.0, and this names the GPL side.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 7] = *b"GPL v2\0";
