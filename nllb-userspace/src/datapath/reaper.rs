//! Closing nllb's own connections to a backend (sock_diag `SOCK_DESTROY`):
//! the kernel lists the sockets to that backend (filtered by destination),
//! and only those in the socket table, i.e. connects nllb steered, are
//! destroyed. A process that dialed the controller's address directly is
//! never touched.
//!
//! Blocking (netlink round trips): call it from a blocking task.

use std::net::SocketAddr;

use super::kernel::SocketTable;
use crate::sock_diag::{self, SockDiagError, SocketInfo, States};

/// One of nllb's sockets: what sock_diag reported, when it connected
/// (CLOCK_MONOTONIC ns) and the id of the service it was steered for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steered {
    pub socket: SocketInfo,
    pub created_ns: u64,
    pub svc_id: u32,
}

pub struct Reaper {
    sockets: SocketTable,
}

impl Reaper {
    pub fn new(sockets: SocketTable) -> Reaper {
        Reaper { sockets }
    }

    /// nllb's sockets to `backend` in `states`, oldest connect first.
    pub fn sockets_to(&self, backend: SocketAddr, states: States) -> Result<Vec<(SocketInfo, u64)>, SockDiagError> {
        Ok(self.steered_to(backend, states)?.into_iter().map(|s| (s.socket, s.created_ns)).collect())
    }

    /// The same with the service each socket was steered for.
    pub fn steered_to(&self, backend: SocketAddr, states: States) -> Result<Vec<Steered>, SockDiagError> {
        let mut ours: Vec<Steered> = sock_diag::sockets_to(backend, states)?
            .into_iter()
            .filter_map(|s| {
                self.sockets.get(s.cookie).map(|st| Steered { created_ns: st.created_ns, svc_id: st.svc_id, socket: s })
            })
            .collect();
        ours.sort_by_key(|s| s.created_ns);
        Ok(ours)
    }

    /// Destroys nllb's sockets to `backend` in `states`; returns how many.
    pub fn abort(&self, backend: SocketAddr, states: States) -> Result<usize, SockDiagError> {
        let ours: Vec<SocketInfo> = self.sockets_to(backend, states)?.into_iter().map(|(s, _)| s).collect();
        if ours.is_empty() {
            return Ok(0);
        }
        sock_diag::destroy(&ours)
    }
}
