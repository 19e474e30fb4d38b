//! connect4/connect6: a connect to a virtual address is sent to one of its
//! service's backends before the SYN leaves, and the socket is remembered.
//!
//! One body (`xlate_fwd`) serves every case; connect6 with an IPv4-mapped
//! virtual address goes through the IPv4 tables exactly like connect4, and
//! only the address written back differs.

use core::ptr::{addr_of_mut, null_mut, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use nllb_common::{
    BackendKey, BackendSlot, CONFIG_FLAG_ALL_NETNS, CONFIG_FLAG_PASSIVE, DatapathConfig, FAMILY_V4, FAMILY_V6,
    MAX_BACKENDS, Vip4Key, Vip6Key,
    events::{STEER_ALL_MARKED, STEER_FIRST_PICK, STEER_SKIPPED_MARKED},
};

use crate::{
    events::{self, Decision},
    maps::{NLLB_CONFIG, NLLB_VIPS4, NLLB_VIPS6, bump_backend, bump_service},
    marks, sockets,
};

const SOCK_STREAM: u32 = 1;
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
pub const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// Slot indices are masked with this so the verifier sees them in bounds.
const SLOT_MASK: u32 = MAX_BACKENDS - 1;
const _: () = assert!(MAX_BACKENDS.is_power_of_two());

/// `i` masked into the slot range in a way the compiler cannot drop: it
/// proves `random % count < 16` and would remove a plain mask, but the
/// verifier does not track bounds through a modulo by a variable.
#[inline(always)]
fn slot_index(i: u32) -> usize {
    // SAFETY: reads a live local.
    (unsafe { core::ptr::read_volatile(&i) } & SLOT_MASK) as usize
}

/// What the application dialed, as its socket sees it.
pub struct Dialed {
    pub addr: [u32; 4],
    pub port: u16,
    /// Family of the socket.
    pub family: u16,
}

enum Verdict {
    /// Not a virtual address, or not a socket nllb serves.
    Pass,
    /// Send the connect to this address (in the socket's family) and port.
    Steer([u32; 4], u16),
    /// The service has no backend: fail the connect at once.
    Refuse,
}

pub fn sock4_connect(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let dialed = Dialed { addr: [sa.user_ip4, 0, 0, 0], port: sa.user_port as u16, family: FAMILY_V4 };
    // SAFETY: only the inner map pointer is read from the outer element.
    let Some(table) =
        (unsafe { NLLB_VIPS4.get_value(&Vip4Key { addr: dialed.addr[0], port: dialed.port, _pad: 0 }, &0) })
    else {
        return;
    };
    match xlate_fwd(ctx, table, Family::V4, &dialed) {
        Verdict::Steer(addr, port) => {
            sa.user_ip4 = addr[0];
            sa.user_port = u32::from(port);
        }
        Verdict::Refuse => {
            sa.user_ip4 = LOOPBACK4;
            sa.user_port = 0;
        }
        Verdict::Pass => {}
    }
}

pub fn sock6_connect(ctx: &SockAddrContext) {
    // SAFETY: as in sock4_connect.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let ip6 = sa.user_ip6;
    let dialed = Dialed { addr: ip6, port: sa.user_port as u16, family: FAMILY_V6 };
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == MAPPED_PREFIX;
    let verdict = if mapped {
        // SAFETY: as in sock4_connect.
        match unsafe { NLLB_VIPS4.get_value(&Vip4Key { addr: ip6[3], port: dialed.port, _pad: 0 }, &0) } {
            Some(table) => xlate_fwd(ctx, table, Family::V4Mapped, &dialed),
            None => return,
        }
    } else {
        // SAFETY: as in sock4_connect.
        match unsafe { NLLB_VIPS6.get_value(&Vip6Key { addr: ip6, port: dialed.port, _pad: 0 }, &0) } {
            // A native IPv6 virtual address prefers IPv6 backends; a
            // dual-stack socket can still reach IPv4 ones, mapped.
            Some(table) if table.count6 > 0 => xlate_fwd(ctx, table, Family::V6, &dialed),
            Some(table) => xlate_fwd(ctx, table, Family::V4Mapped, &dialed),
            None => return,
        }
    };
    match verdict {
        Verdict::Steer(addr, port) => {
            write_ip6(sa, addr);
            sa.user_port = u32::from(port);
        }
        Verdict::Refuse => {
            let lo =
                if mapped { [0, 0, MAPPED_PREFIX, LOOPBACK4] } else { [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])] };
            write_ip6(sa, lo);
            sa.user_port = 0;
        }
        Verdict::Pass => {}
    }
}

/// Which slots of the table serve the socket, and how their addresses are
/// written for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    /// IPv4 backends for an IPv6 socket (`::ffff:a.b.c.d`).
    V4Mapped,
    V6,
}

#[inline(always)]
fn xlate_fwd(ctx: &SockAddrContext, table: &nllb_common::ServiceTable, fam: Family, dialed: &Dialed) -> Verdict {
    let Some(cfg) = NLLB_CONFIG.get(0) else {
        return Verdict::Pass;
    };
    if !in_scope(ctx, cfg) {
        return Verdict::Pass;
    }
    let (slots, count) = match fam {
        Family::V6 => (&table.backends6, table.count6),
        _ => (&table.backends4, table.count4),
    };
    if count == 0 || count > MAX_BACKENDS {
        bump_service(table.svc_id, |c| c.no_backend += 1);
        events::trace_decision(ctx, table.svc_id, dialed, Decision::Refuse);
        return Verdict::Refuse;
    }
    // SAFETY: plain helper call. One clock read serves the pick and the
    // socket's creation time.
    let now = unsafe { bpf_ktime_get_ns() };
    let pick = pick(slots, count, cfg, now);
    let slot = &slots[slot_index(pick.idx)];
    let backend = if fam == Family::V4Mapped { [0, 0, MAPPED_PREFIX, slot.addr[0]] } else { slot.addr };
    bump_backend(slot.stat_id, |c| c.connects += 1);
    if pick.cause == STEER_ALL_MARKED {
        bump_service(table.svc_id, |c| c.all_marked += 1);
    }
    sockets::remember(ctx, dialed, backend, slot, table.svc_id, cfg, now);
    if events::tracing() {
        let skipped = (pick.cause != STEER_FIRST_PICK).then_some(&pick.skipped);
        events::trace_decision(
            ctx,
            table.svc_id,
            dialed,
            Decision::Steer { slot, backend, cause: pick.cause, skipped },
        );
    }
    Verdict::Steer(backend, slot.port)
}

struct Pick {
    idx: u32,
    cause: u32,
    /// The random pick, when it was passed over (cause != FIRST_PICK).
    skipped: BackendKey,
}

/// A random slot; if the kernel marked that backend, the next slots in turn;
/// if every backend is marked, the one whose mark is oldest. A mark can
/// never black-hole a service, and after a full outage the backends are
/// tried oldest-failure first, so the first one back is reached within as
/// many connects as there are backends, not by chance.
#[inline(always)]
fn pick(slots: &[BackendSlot; MAX_BACKENDS as usize], count: u32, cfg: &DatapathConfig, now: u64) -> Pick {
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % count;
    let first = &slots[slot_index(start)];
    // Built from the slot even when unused: a zeroed key costs a memset call.
    let skipped = BackendKey { addr: first.addr, port: first.port, family: first.family };
    let hold_ns = cfg.eject_hold_ns();
    if cfg.flags & CONFIG_FLAG_PASSIVE == 0 || !marks::any_recent(now, hold_ns) {
        return Pick { idx: start, cause: STEER_FIRST_PICK, skipped };
    }
    let mut oldest = start;
    let mut oldest_ns = u64::MAX;
    let mut i = 0;
    while i < MAX_BACKENDS {
        if i >= count {
            break;
        }
        let mut idx = start + i;
        if idx >= count {
            idx -= count;
        }
        match marks::marked(&slots[slot_index(idx)], now, hold_ns) {
            None => {
                let cause = if i == 0 { STEER_FIRST_PICK } else { STEER_SKIPPED_MARKED };
                return Pick { idx, cause, skipped };
            }
            Some(failed_ns) if failed_ns < oldest_ns => {
                oldest_ns = failed_ns;
                oldest = idx;
            }
            Some(_) => {}
        }
        i += 1;
    }
    Pick { idx: oldest, cause: STEER_ALL_MARKED, skipped }
}

/// hostNetworkOnly: rewrite only sockets of the agent's network namespace
/// (the initial one when the cookie is 0) unless all namespaces are on.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext, cfg: &DatapathConfig) -> bool {
    if cfg.flags & CONFIG_FLAG_ALL_NETNS != 0 {
        return true;
    }
    // SAFETY: a NULL context asks for the initial namespace's cookie.
    let host =
        if cfg.host_netns_cookie != 0 { cfg.host_netns_cookie } else { unsafe { bpf_get_netns_cookie(null_mut()) } };
    // SAFETY: the context pointer is valid for the helper.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) == host }
}

/// The verifier accepts only 4-byte stores to `user_ip6` on older kernels;
/// volatile keeps LLVM from merging them.
#[inline(always)]
pub fn write_ip6(sa: &mut bpf_sock_addr, addr: [u32; 4]) {
    let p = addr_of_mut!(sa.user_ip6) as *mut u32;
    // SAFETY: p points at the four u32 words of user_ip6.
    unsafe {
        write_volatile(p, addr[0]);
        write_volatile(p.add(1), addr[1]);
        write_volatile(p.add(2), addr[2]);
        write_volatile(p.add(3), addr[3]);
    }
}
