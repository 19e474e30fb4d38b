use core::ptr::{addr_of_mut, null_mut, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_SYN_SENT, bpf_sock_addr,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use nllb_common::{
    BACKEND_SLOTS, BackendKey, BackendSlot, CONFIG_FLAG_ALL_NETNS, CONFIG_FLAG_PASSIVE,
    DatapathConfig, FAM_IDX_V4, FAM_IDX_V6, FAMILY_V4, FAMILY_V6, MAX_BACKENDS,
    MAX_PICK_ATTEMPTS, MAX_SERVICES, MAX_SOCKETS, MAX_STATS, MAX_VIPS, OrigDst, PassiveMark,
    ServiceState, Vip4Key, Vip6Key, VipValue, backend_index, service_key,
};

const PROCEED: i32 = 1;
const SOCK_STREAM: u32 = 1;
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

// BTF-defined maps: `bpftool map dump` prints their keys and values with
// field names instead of hex.
#[btf_map]
static NLLB_VIPS4: HashMap<Vip4Key, VipValue, { MAX_VIPS as usize }> = HashMap::new();
#[btf_map]
static NLLB_VIPS6: HashMap<Vip6Key, VipValue, { MAX_VIPS as usize }> = HashMap::new();
#[btf_map]
static NLLB_SERVICES: HashMap<u32, ServiceState, { (MAX_SERVICES * 2) as usize }> = HashMap::new();
#[btf_map]
static NLLB_BACKENDS: Array<BackendSlot, { BACKEND_SLOTS as usize }> = Array::new();
#[btf_map]
static NLLB_CONNECT_STATS: PerCpuArray<u64, { MAX_STATS as usize }> = PerCpuArray::new();
#[btf_map]
static NLLB_NOBACKEND: PerCpuArray<u64, { MAX_SERVICES as usize }> = PerCpuArray::new();
#[btf_map]
static NLLB_SOCKETS: LruHashMap<u64, OrigDst, { MAX_SOCKETS as usize }> = LruHashMap::new();
#[btf_map]
static NLLB_PASSIVE: HashMap<BackendKey, PassiveMark, { (MAX_SERVICES * MAX_BACKENDS * 2) as usize }> =
    HashMap::new();
#[btf_map]
static NLLB_CONFIG: Array<DatapathConfig, 1> = Array::new();

#[cgroup_sock_addr(connect4)]
pub fn nllb_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let key = Vip4Key { addr: sa.user_ip4, port: sa.user_port as u16, _pad: 0 };
    // SAFETY: the value is copied out before any map update.
    let Some(vip) = (unsafe { NLLB_VIPS4.get(&key) }).copied() else {
        return PROCEED;
    };
    let Some(cfg) = NLLB_CONFIG.get(0).copied() else { return PROCEED };
    if !in_scope(&ctx, &cfg) {
        return PROCEED;
    }
    let orig = OrigDst { addr: [key.addr, 0, 0, 0], port: key.port, family: FAMILY_V4, svc_id: vip.svc_id };
    match pick(vip.svc_id, FAM_IDX_V4, &cfg) {
        Some(b) => {
            sa.user_ip4 = b.addr[0];
            sa.user_port = u32::from(b.port);
            remember(&ctx, &orig);
        }
        None => {
            count_no_backend(vip.svc_id);
            refuse4(sa);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn nllb_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let ip6 = sa.user_ip6;
    let port = sa.user_port as u16;
    let mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == MAPPED_PREFIX;
    let vip = if mapped {
        // SAFETY: copied out at once.
        unsafe { NLLB_VIPS4.get(&Vip4Key { addr: ip6[3], port, _pad: 0 }) }.copied()
    } else {
        // SAFETY: copied out at once.
        unsafe { NLLB_VIPS6.get(&Vip6Key { addr: ip6, port, _pad: 0 }) }.copied()
    };
    let Some(vip) = vip else { return PROCEED };
    let Some(cfg) = NLLB_CONFIG.get(0).copied() else { return PROCEED };
    if !in_scope(&ctx, &cfg) {
        return PROCEED;
    }
    let orig = OrigDst { addr: ip6, port, family: FAMILY_V6, svc_id: vip.svc_id };
    // A native IPv6 virtual address prefers IPv6 backends; a dual-stack
    // socket can still reach IPv4 backends through their mapped form.
    let picked = if mapped { None } else { pick(vip.svc_id, FAM_IDX_V6, &cfg) };
    let picked = match picked {
        Some(b) => Some(b),
        None => pick(vip.svc_id, FAM_IDX_V4, &cfg).map(|b| BackendSlot {
            addr: [0, 0, MAPPED_PREFIX, b.addr[0]],
            ..b
        }),
    };
    match picked {
        Some(b) => {
            write_ip6(sa, b.addr);
            sa.user_port = u32::from(b.port);
            remember(&ctx, &orig);
        }
        None => {
            count_no_backend(vip.svc_id);
            refuse6(sa, mapped);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn nllb_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { NLLB_SOCKETS.get(&cookie) }.copied()
        && orig.family == FAMILY_V4
    {
        sa.user_ip4 = orig.addr[0];
        sa.user_port = u32::from(orig.port);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn nllb_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { NLLB_SOCKETS.get(&cookie) }.copied()
        && orig.family == FAMILY_V6
    {
        write_ip6(sa, orig.addr);
        sa.user_port = u32::from(orig.port);
    }
    PROCEED
}

#[sock_ops]
pub fn nllb_sock_ops(ctx: SockOpsContext) -> u32 {
    let Some(cfg) = NLLB_CONFIG.get(0) else { return 1 };
    if cfg.flags & CONFIG_FLAG_PASSIVE == 0 {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: only checks for presence.
            if unsafe { NLLB_PASSIVE.get(&remote_key(&ctx)) }.is_some() {
                let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32);
            }
        }
        // Once connected the outcome is known: stop the per-socket callbacks.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if ctx.cb_flags() != 0 {
                let _ = ctx.set_cb_flags(0);
            }
        }
        // Refused (RST in SYN_SENT) or given up.
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(0) == BPF_TCP_SYN_SENT && ctx.arg(1) == BPF_TCP_CLOSE {
                mark_failed(&ctx, "refused");
            }
        }
        // The first SYN retransmit (~1 s): a blackholed backend, long before
        // the connect itself gives up.
        BPF_SOCK_OPS_RTO_CB => {
            // SAFETY: ctx.ops is valid for the program's lifetime.
            if unsafe { (*ctx.ops).state } == BPF_TCP_SYN_SENT {
                mark_failed(&ctx, "syn timeout");
            }
        }
        _ => {}
    }
    1
}

/// hostNetworkOnly: rewrite only sockets of the agent's network namespace
/// (the initial one when the cookie is 0) unless all namespaces are on.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext, cfg: &DatapathConfig) -> bool {
    if cfg.flags & CONFIG_FLAG_ALL_NETNS != 0 {
        return true;
    }
    // SAFETY: a NULL context asks for the initial namespace's cookie.
    let host = if cfg.host_netns_cookie != 0 {
        cfg.host_netns_cookie
    } else {
        unsafe { bpf_get_netns_cookie(null_mut()) }
    };
    // SAFETY: the context pointer is valid for the helper.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) == host }
}

/// A random backend of the live bank; if passive ejection marked it, the next
/// slots (at most MAX_PICK_ATTEMPTS in all). If every tried slot is marked the
/// first pick is used anyway: a stale mark must never black-hole a service.
#[inline(always)]
fn pick(svc_id: u32, fam_idx: u32, cfg: &DatapathConfig) -> Option<BackendSlot> {
    // SAFETY: copied out at once; the agent replaces the element, never edits it.
    let state = unsafe { NLLB_SERVICES.get(&service_key(svc_id, fam_idx)) }.copied()?;
    let count = state.count;
    if count == 0 || count > MAX_BACKENDS {
        return None;
    }
    let bank = state.bank & 1;
    // SAFETY: plain helper call.
    let start = unsafe { bpf_get_prandom_u32() } % count;
    let first = NLLB_BACKENDS.get(backend_index(svc_id, fam_idx, bank, start)).copied()?;
    let chosen = if cfg.flags & CONFIG_FLAG_PASSIVE == 0 || !ejected(&first, cfg) {
        first
    } else {
        let mut chosen = first;
        for i in 1..MAX_PICK_ATTEMPTS {
            if i >= count {
                break;
            }
            let slot = (start + i) % count;
            if let Some(b) = NLLB_BACKENDS.get(backend_index(svc_id, fam_idx, bank, slot))
                && !ejected(b, cfg)
            {
                chosen = *b;
                break;
            }
        }
        chosen
    };
    if let Some(counter) = NLLB_CONNECT_STATS.get_ptr_mut(chosen.stat_id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
    Some(chosen)
}

#[inline(always)]
fn ejected(b: &BackendSlot, cfg: &DatapathConfig) -> bool {
    let key = BackendKey { addr: b.addr, port: b.port, family: b.family };
    // SAFETY: read-only use of the value.
    match unsafe { NLLB_PASSIVE.get(&key) } {
        Some(mark) if mark.failed_ns != 0 => {
            // SAFETY: plain helper call.
            let now = unsafe { bpf_ktime_get_ns() };
            now.wrapping_sub(mark.failed_ns) < u64::from(cfg.eject_hold_ms) * 1_000_000
        }
        _ => false,
    }
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OrigDst) {
    // SAFETY: the context pointer is valid for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = NLLB_SOCKETS.insert(&cookie, orig, 0);
}

#[inline(always)]
fn count_no_backend(svc_id: u32) {
    if let Some(counter) = NLLB_NOBACKEND.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
}

// A service with no backend must fail at once with ECONNREFUSED. Returning
// "reject" gives EPERM, and bpf_set_retval (5.18+) would keep the program from
// loading on older kernels; port 0 on loopback can never be listened on, so a
// connect there is refused by the local stack on every kernel, in
// microseconds, without touching the network.
#[inline(always)]
fn refuse4(sa: &mut bpf_sock_addr) {
    sa.user_ip4 = LOOPBACK4;
    sa.user_port = 0;
}

#[inline(always)]
fn refuse6(sa: &mut bpf_sock_addr, mapped: bool) {
    let addr = if mapped {
        [0, 0, MAPPED_PREFIX, LOOPBACK4]
    } else {
        [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    };
    write_ip6(sa, addr);
    sa.user_port = 0;
}

/// The verifier accepts only 4-byte stores to `user_ip6` on older kernels;
/// volatile keeps LLVM from merging them.
#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, addr: [u32; 4]) {
    let p = addr_of_mut!(sa.user_ip6) as *mut u32;
    // SAFETY: p points at the four u32 words of user_ip6.
    unsafe {
        write_volatile(p, addr[0]);
        write_volatile(p.add(1), addr[1]);
        write_volatile(p.add(2), addr[2]);
        write_volatile(p.add(3), addr[3]);
    }
}

/// The remote end of a sock_ops socket as a backend key; IPv4-mapped IPv6
/// peers are folded to IPv4 so both socket families find the same entry.
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

#[inline(always)]
fn mark_failed(ctx: &SockOpsContext, why: &str) {
    let key = remote_key(ctx);
    if let Some(mark) = NLLB_PASSIVE.get_ptr_mut(&key) {
        // SAFETY: plain helper call; the entry pointer is valid under RCU.
        unsafe {
            (*mark).failed_ns = bpf_ktime_get_ns();
            (*mark).failures = (*mark).failures.wrapping_add(1);
        }
        warn!(ctx, "passive eject: backend port {} {}", u16::from_be(key.port), why);
    }
}
