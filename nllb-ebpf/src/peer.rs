//! getpeername4/getpeername6: the application sees the virtual address it
//! dialed, not the backend. One body for both families; the entry must still
//! describe this socket's peer (same cookie, same backend), or nothing is
//! rewritten.

use aya_ebpf::programs::SockAddrContext;
use nllb_common::FAMILY_V4;

use crate::{connect::write_ip6, sockets};

#[inline(always)]
pub fn xlate_rev(ctx: &SockAddrContext, family: u16) {
    let Some(state) = sockets::of_sock_addr(ctx) else {
        return;
    };
    if state.family != family {
        return;
    }
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_port as u16 != state.backend_port {
        return;
    }
    if family == FAMILY_V4 {
        if sa.user_ip4 != state.backend[0] {
            return;
        }
        sa.user_ip4 = state.vip[0];
    } else {
        if sa.user_ip6 != state.backend {
            return;
        }
        write_ip6(sa, state.vip);
    }
    sa.user_port = u32::from(state.vip_port);
}
