//! Closing nllb's own connections to a backend (sock_diag `SOCK_DESTROY`):
//! the kernel lists the sockets to that backend (filtered by destination)
//! with each one's value in `NLLB_SOCKETS` (socket-local storage), and only
//! those that carry one, i.e. connects nllb steered, are destroyed. A
//! process that dialed the controller's address directly is never touched.
//!
//! Blocking (netlink round trips): call it from a blocking task.

use std::{collections::BTreeMap, net::SocketAddr};

use nllb_common::SockState;

use super::kernel::SocketTable;
use crate::sock_diag::{self, SockDiagError, SocketInfo, States};

/// One of nllb's sockets: what sock_diag reported and what nllb remembers
/// of it (when it connected, the service it was steered for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steered {
    pub socket: SocketInfo,
    pub state: SockState,
}

pub struct Reaper {
    sockets: SocketTable,
}

impl Reaper {
    pub fn new(sockets: SocketTable) -> Reaper {
        Reaper { sockets }
    }

    /// nllb's sockets to `backend` in `states` with what nllb remembers of
    /// each, oldest connect first.
    fn ours(&self, backend: SocketAddr, states: States) -> Result<Vec<(SocketInfo, SockState)>, SockDiagError> {
        Ok(with_state(sock_diag::sockets_with_storage(backend, states, self.sockets.fd())?))
    }

    /// nllb's sockets to `backend` in `states`, oldest connect first.
    pub fn sockets_to(&self, backend: SocketAddr, states: States) -> Result<Vec<(SocketInfo, u64)>, SockDiagError> {
        Ok(self.ours(backend, states)?.into_iter().map(|(s, st)| (s, st.created_ns)).collect())
    }

    /// nllb's sockets to each of `backends` in `states` with the service
    /// each was steered for, oldest connect first (rebalancing counts them):
    /// one walk of the kernel's socket table for all of them.
    pub fn steered_to_each(
        &self,
        backends: &[SocketAddr],
        states: States,
    ) -> Result<BTreeMap<SocketAddr, Vec<Steered>>, SockDiagError> {
        let each = sock_diag::sockets_with_storage_to_each(backends, states, self.sockets.fd())?;
        Ok(each
            .into_iter()
            .map(|(b, found)| {
                (b, with_state(found).into_iter().map(|(socket, state)| Steered { socket, state }).collect())
            })
            .collect())
    }

    /// Destroys nllb's sockets to `backend` in `states`; returns what nllb
    /// remembered of each one destroyed (`nllb trace` shows them).
    pub fn abort(&self, backend: SocketAddr, states: States) -> Result<Vec<SockState>, SockDiagError> {
        let (infos, states): (Vec<SocketInfo>, Vec<SockState>) = self.ours(backend, states)?.into_iter().unzip();
        let destroyed = sock_diag::destroy_each(&infos)?;
        Ok(states.into_iter().zip(destroyed).filter_map(|(st, done)| done.then_some(st)).collect())
    }
}

/// The sockets that carry a `SockState`, with it, oldest connect first.
fn with_state(found: sock_diag::WithStorage) -> Vec<(SocketInfo, SockState)> {
    let mut ours: Vec<(SocketInfo, SockState)> = found
        .into_iter()
        // connect4/6 leave the cookie 0; sock_diag has it.
        .filter_map(|(s, value)| {
            let st = SockState { cookie: s.cookie, ..sock_state(&value)? };
            Some((s, st))
        })
        .collect();
    ours.sort_by_key(|(_, st)| st.created_ns);
    ours
}

/// A `SockState` from the bytes the kernel reported; another size (a map of
/// another build) is not ours to read.
fn sock_state(value: &[u8]) -> Option<SockState> {
    (value.len() == size_of::<SockState>())
        // SAFETY: exactly the size of a plain `repr(C)` struct of integers,
        // every bit pattern valid; unaligned read.
        .then(|| unsafe { std::ptr::read_unaligned(value.as_ptr().cast::<SockState>()) })
}
