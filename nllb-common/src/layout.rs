//! Compile-time layout checks for every map key and value type.
//!
//! The eBPF programs are built for `bpfel` (64-bit) while the agent may run
//! on a 32-bit CPU (armv7). A map entry is a byte copy between the two, so
//! each type must have the same size, alignment and field offsets on every
//! target, and no implicit padding (the kernel hashes and compares keys
//! byte for byte; padding bytes would be garbage). This crate is compiled
//! for the BPF target and for each userspace target, so these assertions run
//! on every one of them: a layout that differs fails the build there.
//!
//! One line per type: `Type { every field in declaration order } = size, align;`.
//! The checks per line:
//! - `size_of` and `align_of` equal the literals (the same numbers on 32-
//!   and 64-bit targets; a `usize`, pointer or `bool` field would break this);
//! - each listed field starts where the previous one ends (no padding
//!   between fields) and the last one ends at `size_of` (no tail padding, and
//!   no field left out of the list).
//!
//! Add a line when a type joins the map contract; remove it with the type.
//! Also mind aya-log: the eBPF side writes `usize`/`isize`/pointer
//! arguments as 8 bytes and a 32-bit agent decodes them as 4, so log
//! arguments from eBPF should be fixed-size integers.

use crate::*;

/// The size of the type behind a raw pointer (used on a field projection,
/// which gives the field's size without naming its type).
#[doc(hidden)]
pub const fn pointee_size<F>(_: *const F) -> usize {
    core::mem::size_of::<F>()
}

/// Asserts the layout of map key/value types at compile time (see the
/// module documentation).
///
/// ```
/// #[repr(C)]
/// pub struct Key { pub addr: u32, pub port: u16, pub _pad: u16 }
/// nllb_common::assert_map_layout! { Key { addr, port, _pad } = 8, 4; }
/// ```
///
/// Implicit padding between fields fails the build:
///
/// ```compile_fail
/// #[repr(C)]
/// pub struct Key { pub port: u16, pub addr: u32 }
/// nllb_common::assert_map_layout! { Key { port, addr } = 8, 4; }
/// ```
///
/// So does tail padding (or a field left out of the line):
///
/// ```compile_fail
/// #[repr(C)]
/// pub struct Mark { pub at_ns: u64, pub failures: u32 }
/// nllb_common::assert_map_layout! { Mark { at_ns, failures } = 16, 8; }
/// ```
#[macro_export]
macro_rules! assert_map_layout {
    ($($ty:ty { $($field:ident),+ $(,)? } = $size:literal, $align:literal;)+) => {
        $(
            const _: () = {
                assert!(
                    core::mem::size_of::<$ty>() == $size,
                    concat!(stringify!($ty), ": size is not ", stringify!($size), " on this target")
                );
                assert!(
                    core::mem::align_of::<$ty>() == $align,
                    concat!(stringify!($ty), ": alignment is not ", stringify!($align), " on this target")
                );
                let value = core::mem::MaybeUninit::<$ty>::uninit();
                let base = value.as_ptr();
                let mut end = 0usize;
                $(
                    assert!(
                        core::mem::offset_of!($ty, $field) == end,
                        concat!(
                            stringify!($ty), ".", stringify!($field),
                            ": implicit padding before this field (add an explicit `_pad` field), or fields listed out of order"
                        )
                    );
                    // SAFETY: only the address of a field of an uninit value
                    // is taken; nothing is read.
                    end += $crate::layout::pointee_size(unsafe { &raw const (*base).$field });
                )+
                assert!(
                    end == core::mem::size_of::<$ty>(),
                    concat!(
                        stringify!($ty),
                        ": implicit tail padding (add an explicit `_pad` field), or a field missing from its layout line"
                    )
                );
            };
        )+
    };
}

assert_map_layout! {
    Vip4Key { addr, port, _pad } = 8, 4;
    Vip6Key { addr, port, _pad } = 20, 4;
    BackendSlot { addr, port, family, stat_id, syn_rto_ms, _pad, cleared_ns } = 40, 8;
    ServiceTable { svc_id, flags, count4, count6, backends4, backends6 } = 5136, 8;
    BackendKey { addr, port, family } = 20, 4;
    PassiveMark { failed_ns, recovered_ns, cause, _pad } = 24, 8;
    MarkClock { newest_ns } = 8, 8;
    SockState {
        cookie, created_ns, vip, backend, vip_port, backend_port, family, _pad, svc_id, stat_id, syn_rto_jiffies, _pad2
    } = 72, 8;
    BackendCounters { connects, refused, syn_timeouts, established } = 32, 8;
    ServiceCounters { no_backend, all_marked } = 16, 8;
    DatapathCounters { sockets_full, events_lost, marks_full, syncnt_refused } = 32, 8;
    DatapathConfig { host_netns_cookie, flags, eject_hold_ms, layout_version, syn_retries, hz, _pad } = 32, 8;
    TraceControl { until_ns } = 8, 8;
    Event {
        ts_ns, pid_tgid, cgroup_id, cookie, kind, cause, svc_id, family, vip_port, vip, backend, backend_port,
        backend_family, skipped, skipped_port, skipped_family, comm
    } = 120, 8;
}

// Plain keys and values: the table and counter indexes (u32); NLLB_SOCKETS
// has none (socket storage). u64 is 8-aligned on every supported target
// (armv7's AAPCS too; only i686 would differ).
const _: () = assert!(core::mem::size_of::<u64>() == 8 && core::mem::align_of::<u64>() == 8);
