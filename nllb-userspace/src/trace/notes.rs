//! What the agent does on the kernel's behalf, for `nllb trace`.
//!
//! The trace ring carries what the programs decide; aborting the connects
//! still waiting on a marked backend (sock_diag `SOCK_DESTROY`), closing
//! those of a removed one and ending connections to rebalance are done by
//! the agent in userspace. It sends each socket it destroyed as one JSON
//! datagram to `<run-dir>/trace.sock`, a socket that exists only while a
//! reader is attached: with no reader the first send fails at once (no such
//! file, or refused) and the agent stops there. The sending socket is
//! non-blocking, so a reader that does not keep up loses notes and never
//! holds the agent up.

use std::{
    io,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
};

use nllb_common::SockState;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::encoding::{sock_backend, sock_vip},
    sys,
};

/// The reader's socket, in the agent's run directory.
pub const NOTES_SOCKET: &str = "trace.sock";

/// Why the agent destroyed a socket nllb had steered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AbortCause {
    /// The kernel marked its backend: connects still in SYN_SENT are
    /// aborted so that their retry goes elsewhere at once.
    BackendMarked,
    /// Its backend left the published set (`health.destroyOnRemove`).
    BackendRemoved,
    /// Rebalancing moved it: its backend carried more than its fair share
    /// and its client reconnects toward a less loaded one (issue 17).
    Rebalanced,
}

/// One socket the agent destroyed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortNote {
    /// CLOCK_MONOTONIC ns when the agent had destroyed it.
    pub ts_ns: u64,
    pub cause: AbortCause,
    pub cookie: u64,
    pub svc_id: u32,
    /// The virtual address the application dialed.
    pub vip: SocketAddr,
    pub backend: SocketAddr,
    /// CLOCK_MONOTONIC ns of the connect.
    pub created_ns: u64,
}

/// The agent's end.
pub struct NoteSender {
    socket: Option<UnixDatagram>,
    path: PathBuf,
}

impl NoteSender {
    pub fn new(run_dir: &Path) -> NoteSender {
        let socket = UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s)).ok();
        NoteSender { socket, path: run_dir.join(NOTES_SOCKET) }
    }

    /// Tells a reader, if one is attached, which sockets were destroyed.
    pub fn aborted(&self, cause: AbortCause, sockets: &[SockState]) {
        let Some(socket) = &self.socket else { return };
        let ts_ns = sys::monotonic_ns();
        for s in sockets {
            let note = AbortNote {
                ts_ns,
                cause,
                cookie: s.cookie,
                svc_id: s.svc_id,
                vip: sock_vip(s),
                backend: sock_backend(s),
                created_ns: s.created_ns,
            };
            let Ok(bytes) = serde_json::to_vec(&note) else { continue };
            // No reader (ENOENT, ECONNREFUSED) or a full one (EAGAIN): stop.
            if socket.send_to(&bytes, &self.path).is_err() {
                return;
            }
        }
    }
}

/// The reader's end: binds `<run-dir>/trace.sock` (root only) and removes
/// it when dropped. The caller holds the reader lock, so a socket file
/// already there was left by a reader that died.
pub struct NoteReceiver {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    buf: Vec<u8>,
}

impl NoteReceiver {
    pub fn bind(run_dir: &Path) -> io::Result<NoteReceiver> {
        std::fs::create_dir_all(run_dir)?;
        let path = run_dir.join(NOTES_SOCKET);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = tokio::net::UnixDatagram::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(NoteReceiver { socket, path, buf: vec![0; 64 * 1024] })
    }

    /// The next note; datagrams that are not notes are skipped.
    pub async fn next(&mut self) -> io::Result<AbortNote> {
        loop {
            let n = self.socket.recv(&mut self.buf).await?;
            if let Ok(note) = serde_json::from_slice(&self.buf[..n]) {
                return Ok(note);
            }
        }
    }
}

impl Drop for NoteReceiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(cookie: u64) -> SockState {
        use crate::datapath::encoding::{backend_slot, vip4_key};
        let slot = backend_slot("198.18.1.2:6443".parse().unwrap(), 0);
        let vip = vip4_key([127, 0, 0, 1].into(), 7443);
        SockState {
            cookie,
            created_ns: 5,
            vip: [vip.addr, 0, 0, 0],
            backend: slot.addr,
            vip_port: vip.port,
            backend_port: slot.port,
            family: nllb_common::FAMILY_V4,
            svc_id: 3,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_reader_receives_each_aborted_socket_and_no_reader_costs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sender = NoteSender::new(dir.path());
        // Nobody listening: nothing happens, nothing is created.
        sender.aborted(AbortCause::BackendMarked, &[state(1)]);
        assert!(!dir.path().join(NOTES_SOCKET).exists());

        let mut receiver = NoteReceiver::bind(dir.path()).unwrap();
        sender.aborted(AbortCause::BackendMarked, &[state(7), state(8)]);
        let a = receiver.next().await.unwrap();
        let b = receiver.next().await.unwrap();
        assert_eq!((a.cookie, b.cookie), (7, 8));
        assert_eq!(a.cause, AbortCause::BackendMarked);
        assert_eq!(a.vip, "127.0.0.1:7443".parse::<SocketAddr>().unwrap());
        assert_eq!(a.backend, "198.18.1.2:6443".parse::<SocketAddr>().unwrap());
        assert_eq!(a.svc_id, 3);
        drop(receiver);
        assert!(!dir.path().join(NOTES_SOCKET).exists(), "the reader removes its socket");
    }
}
