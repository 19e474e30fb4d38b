//! sock_ops: how steered connects end, and how long their SYNs may wait.
//!
//! Only sockets connect4/6 steered (those with `NLLB_SOCKETS` storage) are
//! watched: the agent's own probes and direct connects to a controller's
//! address never set a mark. For every other socket the program costs an op
//! switch, and at TIMEOUT_INIT a storage lookup that finds none.
//!
//! - TIMEOUT_INIT: the first SYN's retransmission timeout, derived from the
//!   backend's measured handshake time; also turns on the STATE and RTO
//!   callbacks for this socket.
//! - RTO in SYN_SENT: the SYN went unanswered: mark "syn timeout".
//! - SYN_SENT -> CLOSE with nothing left in flight: refused. The kernel
//!   empties the retransmit queue before it closes a socket on an RST, on
//!   giving up, or on an abort (`tcp_write_queue_purge` before `tcp_done`),
//!   but an application that closes its socket while the SYN is out closes
//!   it with the SYN still queued: an abandoned dial says nothing about the
//!   backend, so `packets_out != 0` sets no mark.
//! - ACTIVE_ESTABLISHED: the backend answered: a mark set before now no
//!   longer counts; the callbacks go off again for this socket.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TIMEOUT_INIT, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::{bpf_get_socket_cookie, generated::bpf_setsockopt},
    programs::SockOpsContext,
};
use nllb_common::{BackendKey, CONFIG_FLAG_PASSIVE, FAMILY_V4, FAMILY_V6, MarkCause};

use crate::{
    connect::MAPPED_PREFIX,
    maps::{NLLB_CONFIG, bump_backend, bump_datapath},
    marks, sockets,
};

const SOL_TCP: i32 = 6;
const TCP_SYNCNT: i32 = 7;

/// The callback flags this program turns on; other programs' flags on the
/// same socket are left as they are.
const OUR_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;

#[inline(always)]
pub fn on_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TIMEOUT_INIT => timeout_init(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if ctx.cb_flags() & OUR_FLAGS != 0 {
                established(ctx);
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(0) == BPF_TCP_SYN_SENT && ctx.arg(1) == BPF_TCP_CLOSE {
                closed_in_syn_sent(ctx);
            }
        }
        BPF_SOCK_OPS_RTO_CB => {
            // SAFETY: ctx.ops is valid for the program's run.
            if unsafe { (*ctx.ops).state } == BPF_TCP_SYN_SENT {
                syn_rto(ctx);
            }
        }
        _ => {}
    }
}

#[inline(always)]
fn passive_on() -> bool {
    NLLB_CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_FLAG_PASSIVE != 0)
}

#[inline(always)]
fn timeout_init(ctx: &SockOpsContext) {
    let Some(state) = sockets::of_sock_ops(ctx) else {
        return;
    };
    if !passive_on() {
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | OUR_FLAGS) as i32);
    // The kernel asks again on every retransmission check of this connect:
    // the answer comes from the socket's own state, so it never changes.
    if state.syn_rto_jiffies != 0 {
        ctx.set_reply(state.syn_rto_jiffies);
    }
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !OUR_FLAGS) as i32);
    let hold_ns = NLLB_CONFIG.get(0).map_or(0, |c| c.eject_hold_ns());
    // With no mark set within the hold, a clock read; else one hash lookup.
    marks::recover(&remote_key(ctx), hold_ns, || sockets::of_sock_ops(ctx).map_or((0, 0), |s| (cookie(ctx), s.svc_id)));
}

#[inline(always)]
fn closed_in_syn_sent(ctx: &SockOpsContext) {
    // SAFETY: ctx.ops is valid for the program's run.
    if unsafe { (*ctx.ops).packets_out } != 0 {
        return;
    }
    let Some(state) = sockets::of_sock_ops(ctx) else {
        return;
    };
    bump_backend(state.stat_id, |c| c.refused += 1);
    marks::mark(&remote_key(ctx), MarkCause::Refused, cookie(ctx), state.svc_id);
}

#[inline(always)]
fn syn_rto(ctx: &SockOpsContext) {
    let Some(state) = sockets::of_sock_ops(ctx) else {
        return;
    };
    bump_backend(state.stat_id, |c| c.syn_timeouts += 1);
    marks::mark(&remote_key(ctx), MarkCause::SynTimeout, cookie(ctx), state.svc_id);
    cap_syn_retries(ctx);
}

/// `TCP_SYNCNT` for a steered connect whose SYN went unanswered. Set here
/// and not at connect, where every connect paid for it (a setsockopt,
/// ~100 ns with SRSO mitigations) though few SYNs ever time out: the kernel
/// runs this callback in `tcp_write_timeout` after it decided the first
/// timeout did not expire the connect (0 retransmits so far, and at least
/// one is allowed), so every later check sees the cap, as if set at connect.
#[inline(always)]
fn cap_syn_retries(ctx: &SockOpsContext) {
    let n = NLLB_CONFIG.get(0).map_or(0, |c| c.syn_retries);
    if n == 0 {
        return;
    }
    let mut n = n as i32;
    // SAFETY: optval points at an i32 on the stack for the call.
    let err = unsafe { bpf_setsockopt(ctx.as_ptr(), SOL_TCP, TCP_SYNCNT, (&mut n as *mut i32).cast::<c_void>(), 4) };
    // A kernel that refuses the option keeps its own tcp_syn_retries.
    if err != 0 {
        bump_datapath(|c| c.syncnt_refused += 1);
    }
}

/// connect4/6 leave `SockState::cookie` 0 (see `sockets::remember`), so the
/// rare callbacks that report a socket read its cookie themselves.
#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the context pointer is valid for the helper.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The remote end of a sock_ops socket as a backend key; IPv4-mapped IPv6
/// peers are folded to IPv4 so both socket families find the same mark.
#[inline(always)]
fn remote_key(ctx: &SockOpsContext) -> BackendKey {
    // remote_port holds the network-order port in its upper 16 bits on
    // little-endian kernels (a quirk of the sock_ops context); port 0 is never
    // a backend, so the lower half being 0 tells which layout this is.
    let raw = ctx.remote_port();
    let port = if raw & 0xffff == 0 { (raw >> 16) as u16 } else { raw as u16 };
    if ctx.family() == u32::from(FAMILY_V6) {
        let ip6 = ctx.remote_ip6();
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == MAPPED_PREFIX {
            return BackendKey { addr: [ip6[3], 0, 0, 0], port, family: FAMILY_V4 };
        }
        BackendKey { addr: ip6, port, family: FAMILY_V6 }
    } else {
        BackendKey { addr: [ctx.remote_ip4(), 0, 0, 0], port, family: FAMILY_V4 }
    }
}
