//! Reading the kernel's event rings (`NLLB_EVENTS` for the agent,
//! `NLLB_TRACE_EVENTS` for `nllb trace`): the programs tell, the reader wakes
//! (epoll on the ring), so a mark reaches the agent in microseconds instead
//! of at its next poll.

use std::{io, net::SocketAddr, path::Path};

use aya::maps::{Map, MapData, RingBuf};
use nllb_common::{Event, EventKind, MarkCause};
use tokio::io::unix::AsyncFd;

use super::{DatapathError, encoding::event_addr};

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    pub fn new(map: Map, name: &'static str) -> Result<EventReader, DatapathError> {
        let ring = RingBuf::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        // Needs a tokio runtime with IO enabled (the agent's, or `nllb trace`'s).
        // SAFETY: the AsyncFd owns the ring, which owns its fd, so the fd
        // stays open for as long as it is registered.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| DatapathError::Other(format!("watching the event ring {name}: {e}")))?;
        Ok(EventReader { ring })
    }

    pub fn open_pinned(pin_path: &Path, name: &'static str) -> Result<EventReader, DatapathError> {
        let data = MapData::from_pin(pin_path.join(name)).map_err(|source| DatapathError::Map { name, source })?;
        let map = Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })?;
        Self::new(map, name)
    }

    /// The events the ring holds now, waiting until there is at least one.
    pub async fn next_batch(&mut self) -> io::Result<Vec<Event>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(e) = decode(&item) {
                    batch.push(e);
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

/// An `Event` from a ring record (records are 8-byte aligned, but the
/// buffer gives no alignment guarantee to Rust: read it unaligned).
pub fn decode(bytes: &[u8]) -> Option<Event> {
    (bytes.len() >= size_of::<Event>())
        // SAFETY: Event is plain old data (nllb-common) and the slice holds
        // at least size_of::<Event>() bytes.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// What the agent reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    /// A steered connect to `backend` failed.
    Marked { backend: SocketAddr, cause: MarkCause, at_ns: u64 },
    /// A steered connect to a marked `backend` was established.
    Recovered { backend: SocketAddr, at_ns: u64 },
}

impl KernelEvent {
    pub fn from_event(e: &Event) -> Option<KernelEvent> {
        let backend = event_addr(e.backend, e.backend_port, e.backend_family)?;
        match EventKind::from_u32(e.kind)? {
            EventKind::Mark => {
                Some(KernelEvent::Marked { backend, cause: MarkCause::from_u32(e.cause)?, at_ns: e.ts_ns })
            }
            EventKind::Recover => Some(KernelEvent::Recovered { backend, at_ns: e.ts_ns }),
            _ => None,
        }
    }
}

pub fn cause_name(cause: u32) -> &'static str {
    match MarkCause::from_u32(cause) {
        Some(MarkCause::Refused) => "refused",
        Some(MarkCause::SynTimeout) => "syn-timeout",
        None => "unknown",
    }
}
