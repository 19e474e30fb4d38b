//! Empty programs at nllb's busiest hooks. Never attached by the agent: the
//! benchmark attaches them to a cgroup of its own to measure what any
//! program at these hooks costs (the floor nllb's own cost is compared to).

use aya_ebpf::{
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};

#[cgroup_sock_addr(connect4)]
pub fn nllb_floor_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[sock_ops]
pub fn nllb_floor_sock_ops(_ctx: SockOpsContext) -> u32 {
    1
}
