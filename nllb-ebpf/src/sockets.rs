//! The sockets nllb steered, keyed by socket cookie: inserted at connect,
//! deleted by cgroup/sock_release when the application closes the socket,
//! so an entry lives exactly as long as its socket (no eviction, however many
//! connects come after). A preallocated hash costs no allocation on the
//! connect path, which `BPF_MAP_TYPE_SK_STORAGE` would.
//!
//! Hash elements are recycled at once when deleted, so every reader checks
//! that the entry still carries its own cookie.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, generated::bpf_setsockopt},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use nllb_common::{BackendSlot, CONFIG_FLAG_PASSIVE, DatapathConfig, SockState};

use crate::{
    connect::Dialed,
    maps::{NLLB_SOCKETS, bump_datapath},
};

const SOL_TCP: i32 = 6;
const TCP_SYNCNT: i32 = 7;
const SOCK_STREAM: u32 = 1;

#[inline(always)]
pub fn remember(
    ctx: &SockAddrContext,
    dialed: &Dialed,
    backend: [u32; 4],
    slot: &BackendSlot,
    svc_id: u32,
    cfg: &DatapathConfig,
) {
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let passive = cfg.flags & CONFIG_FLAG_PASSIVE != 0;
    let state = SockState {
        cookie,
        // SAFETY: plain helper call.
        created_ns: unsafe { bpf_ktime_get_ns() },
        vip: dialed.addr,
        backend,
        vip_port: dialed.port,
        backend_port: slot.port,
        family: dialed.family,
        _pad: 0,
        svc_id,
        stat_id: slot.stat_id,
        syn_rto_jiffies: if passive { ms_to_jiffies(slot.syn_rto_ms, cfg.hz) } else { 0 },
        _pad2: 0,
    };
    if NLLB_SOCKETS.insert(&cookie, &state, 0).is_err() {
        bump_datapath(|c| c.sockets_full += 1);
    }
    if passive && cfg.syn_retries != 0 {
        let mut n = cfg.syn_retries as i32;
        // SAFETY: optval points at an i32 on the stack for the call. A
        // kernel that refuses the option keeps its own tcp_syn_retries.
        unsafe {
            bpf_setsockopt(ctx.as_ptr(), SOL_TCP, TCP_SYNCNT, (&mut n as *mut i32).cast::<c_void>(), 4);
        }
    }
}

/// Rounded up, so a short timeout never becomes 0 (the kernel's default).
#[inline(always)]
fn ms_to_jiffies(ms: u32, hz: u32) -> u32 {
    if ms == 0 || hz == 0 {
        return 0;
    }
    let j = (u64::from(ms) * u64::from(hz)).div_ceil(1000);
    if j > u64::from(u32::MAX) { u32::MAX } else { j as u32 }
}

#[inline(always)]
fn lookup(ctx_ptr: *mut c_void) -> Option<SockState> {
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx_ptr) };
    // SAFETY: copied out at once; see the module comment.
    let state = unsafe { NLLB_SOCKETS.get(&cookie) }.copied()?;
    (state.cookie == cookie).then_some(state)
}

/// The state of a steered socket, seen from sock_ops.
#[inline(always)]
pub fn of_sock_ops(ctx: &SockOpsContext) -> Option<SockState> {
    lookup(ctx.as_ptr())
}

/// The state of a steered socket, seen from getpeername.
#[inline(always)]
pub fn of_sock_addr(ctx: &SockAddrContext) -> Option<SockState> {
    lookup(ctx.as_ptr())
}

/// sock_release: the application closed the socket.
#[inline(always)]
pub fn forget(ctx: &SockContext) {
    // SAFETY: the kernel hands sock_release a valid socket.
    if unsafe { (*ctx.sock).type_ } != SOCK_STREAM {
        return;
    }
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A lookup costs no lock; most released sockets were never steered.
    // SAFETY: presence check only.
    if unsafe { NLLB_SOCKETS.get(&cookie) }.is_some() {
        let _ = NLLB_SOCKETS.remove(&cookie);
    }
}
