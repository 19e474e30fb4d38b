//! The entry points the kernel calls: each hands its context to one body
//! and lets the operation proceed (a refusal is expressed by rewriting the
//! destination, never by failing the hook).

use aya_ebpf::{
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use nllb_common::{FAMILY_V4, FAMILY_V6};

use crate::{connect, passive, peer};

const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn nllb_connect4(ctx: SockAddrContext) -> i32 {
    connect::sock4_connect(&ctx);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn nllb_connect6(ctx: SockAddrContext) -> i32 {
    connect::sock6_connect(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn nllb_getpeername4(ctx: SockAddrContext) -> i32 {
    peer::xlate_rev(&ctx, FAMILY_V4);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn nllb_getpeername6(ctx: SockAddrContext) -> i32 {
    peer::xlate_rev(&ctx, FAMILY_V6);
    PROCEED
}

#[sock_ops]
pub fn nllb_sock_ops(ctx: SockOpsContext) -> u32 {
    passive::on_sock_ops(&ctx);
    1
}
