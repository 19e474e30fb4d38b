//! Finding and destroying TCP sockets to a backend through sock_diag
//! (`SOCK_DIAG_BY_FAMILY` dumps and `SOCK_DESTROY`, what `ss -K` does).
//!
//! A connect-time rewrite cannot move a socket that is already connected, so
//! when a backend leaves (or is ejected) its long-lived streams, such as
//! kubelet's watches, would hang until TCP gives up, and connects still in
//! SYN_SENT to a dead controller would wait for their SYN retries. Destroying
//! them makes the owner see `ECONNABORTED` at once and reconnect through the
//! virtual address, which now leads to a healthy controller.
//!
//! What the crates do and what this module adds:
//! - `netlink-sys` owns the `NETLINK_SOCK_DIAG` socket; `netlink-packet-core`
//!   frames messages (header, `NLMSG_ERROR`/`NLMSG_DONE`) and
//!   `netlink-packet-sock-diag` encodes `inet_diag_req_v2` (`InetRequest`),
//!   wraps it for `SOCK_DESTROY` (`SockDiagDestroy`) and decodes the fixed
//!   head of each reply (`InetResponseHeader`).
//! - The crate's `InetRequest` carries no request attributes, so
//!   [`FilteredDump`] serializes it followed by an `INET_DIAG_REQ_BYTECODE`
//!   attribute built by [`destination_filter`]: one `INET_DIAG_BC_D_COND` op,
//!   the way `ss` encodes a single `dst ADDR:PORT` condition. The kernel then
//!   builds and copies replies only for sockets to the backend; unrelated
//!   sockets cost a bytecode run inside the kernel's hash walk, not a message.
//! - [`sockets_with_storage`] also adds `INET_DIAG_REQ_SK_BPF_STORAGES`
//!   naming a `BPF_MAP_TYPE_SK_STORAGE` map: the kernel then attaches each
//!   socket's value in that map (`INET_DIAG_SK_BPF_STORAGES`), which is how
//!   the agent tells the sockets nllb steered from others without a table
//!   of its own. The kernel requires CAP_BPF (or CAP_SYS_ADMIN) for it.
//! - Replies are decoded by [`Reply`]: the fixed `inet_diag_msg` head, and of
//!   the attributes only a requested socket-storage value. Skipping the
//!   others the kernel adds anyway (`INET_DIAG_SHUTDOWN`, ...) avoids an
//!   allocation per socket and a failure on attributes newer than the crate.
//!
//! Works in the caller's network namespace. Listing needs no privilege;
//! destroying needs CAP_NET_ADMIN there and a kernel with
//! `CONFIG_INET_DIAG_DESTROY` ([`SockDiagError::DestroyUnsupported`]
//! otherwise).
//!
//! Known limit: the kernel finds a socket to destroy by its address tuple and
//! the interface it is bound to. [`SocketInfo`] keeps that interface only as
//! the scope id of a link-local IPv6 address, so a socket bound to a device
//! with `SO_BINDTODEVICE` towards a global address is reported but not found
//! by [`destroy`] (it counts as gone).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable, NlaBuffer, NlasIterator, Parseable,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

/// TCP states as a bitmask for queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct States(u32);

impl States {
    /// A connect waiting for the SYN-ACK.
    pub const SYN_SENT: States = States(1 << TCP_SYN_SENT);
    /// A connected stream.
    pub const ESTABLISHED: States = States(1 << TCP_ESTABLISHED);

    pub const fn union(self, other: States) -> States {
        States(self.0 | other.0)
    }
}

/// `TCP_ESTABLISHED` and `TCP_SYN_SENT` from include/net/tcp_states.h.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;

/// One socket the kernel reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    pub cookie: u64,
    /// TCP_* number.
    pub state: u8,
    /// As the socket sees it (v6 sockets keep `::ffff:` forms).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u32,
    pub uid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {0}")]
    Open(#[source] io::Error),
    #[error("cannot send a sock_diag request: {0}")]
    Send(#[source] io::Error),
    #[error("cannot receive the kernel's sock_diag reply: {0}")]
    Receive(#[source] io::Error),
    #[error("cannot decode the kernel's sock_diag reply: {0}")]
    Decode(#[source] DecodeError),
    #[error("the kernel refused {request}: {source}{}", privilege_hint(source))]
    Kernel { request: &'static str, errno: i32, source: io::Error },
    #[error(
        "the kernel cannot destroy sockets (SOCK_DESTROY answered EOPNOTSUPP): it was built without \
         CONFIG_INET_DIAG_DESTROY, so connections to a removed backend stay open until TCP gives up"
    )]
    DestroyUnsupported,
}

fn privilege_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => " (needs CAP_NET_ADMIN in this network namespace)",
        _ => "",
    }
}

impl SockDiagError {
    fn kernel(request: &'static str, errno: i32) -> SockDiagError {
        let errno = errno.abs();
        SockDiagError::Kernel { request, errno, source: io::Error::from_raw_os_error(errno) }
    }
}

/// TCP sockets of this network namespace whose remote end is `backend`
/// (an IPv4 backend also matches IPv6 sockets connected to `::ffff:<it>`),
/// in any of `states`. The kernel filters by destination (INET_DIAG bytecode
/// `INET_DIAG_BC_D_COND` with the backend's address, full prefix, and port),
/// so only the backend's sockets are copied out. The kernel still walks its
/// whole table of connected sockets once per family, however few match:
/// that walk is what a query costs (~1.5 ms on a machine with 24 GiB, whose
/// table has 262,144 buckets), so a caller that wants several backends asks
/// for them together ([`sockets_with_storage_to_each`]).
pub fn sockets_to(backend: SocketAddr, states: States) -> Result<Vec<SocketInfo>, SockDiagError> {
    Ok(query(&[backend], states, None)?.sockets.into_iter().map(|(s, _)| s).collect())
}

/// Sockets, each with the bytes of its value in a socket-storage map.
pub type WithStorage = Vec<(SocketInfo, Vec<u8>)>;

/// [`sockets_to`], keeping only the sockets that hold a value in the
/// socket-storage map `storage`, each with that value's bytes.
pub fn sockets_with_storage(
    backend: SocketAddr,
    states: States,
    storage: BorrowedFd<'_>,
) -> Result<WithStorage, SockDiagError> {
    let mut each = sockets_with_storage_to_each(&[backend], states, storage)?;
    Ok(each.remove(&backend).unwrap_or_default())
}

/// [`sockets_with_storage`] for several backends in one walk of the
/// kernel's table per family, keyed by backend as asked (every one a key).
pub fn sockets_with_storage_to_each(
    backends: &[SocketAddr],
    states: States,
    storage: BorrowedFd<'_>,
) -> Result<BTreeMap<SocketAddr, WithStorage>, SockDiagError> {
    let mut found: BTreeMap<SocketAddr, WithStorage> = BTreeMap::new();
    for (socket, value) in query(backends, states, Some(storage))?.sockets {
        if let Some(value) = value {
            found.entry(canonical(socket.remote)).or_default().push((socket, value));
        }
    }
    Ok(backends.iter().map(|b| (*b, found.get(&canonical(*b)).cloned().unwrap_or_default())).collect())
}

/// Destroy (`SOCK_DESTROY`, what `ss -K` does) each socket; sockets gone in
/// the meantime (ENOENT, or ESTALE when another socket took the same address
/// pair) are not errors. Returns how many were destroyed.
pub fn destroy(sockets: &[SocketInfo]) -> Result<usize, SockDiagError> {
    Ok(destroy_each(sockets)?.into_iter().filter(|d| *d).count())
}

/// [`destroy`], saying for each socket (in order) whether it was destroyed.
pub fn destroy_each(sockets: &[SocketInfo]) -> Result<Vec<bool>, SockDiagError> {
    if sockets.is_empty() {
        return Ok(Vec::new());
    }
    let mut nl = DiagSocket::open()?;
    sockets.iter().map(|socket| nl.destroy(socket)).collect()
}

/// What [`sockets_to`] found, and how many replies the kernel sent for it
/// (before the check in userspace), which shows the kernel-side filter works.
struct Query {
    sockets: Vec<(SocketInfo, Option<Vec<u8>>)>,
    reported: usize,
}

/// Sockets to any of `backends`.
fn query(backends: &[SocketAddr], states: States, storage: Option<BorrowedFd<'_>>) -> Result<Query, SockDiagError> {
    let wanted: BTreeSet<SocketAddr> = backends.iter().map(|b| canonical(*b)).collect();
    let mut out = Query { sockets: Vec::new(), reported: 0 };
    if wanted.is_empty() {
        return Ok(out);
    }
    let storages = storage.map(storage_request);
    // A v4 backend is also reached by AF_INET6 sockets through its ::ffff:
    // form; the kernel's AF_INET condition matches those too.
    let families: &[u8] = if wanted.iter().any(SocketAddr::is_ipv4) { &[AF_INET, AF_INET6] } else { &[AF_INET6] };
    let mut nl = DiagSocket::open()?;
    let wanted_list: Vec<SocketAddr> = wanted.iter().copied().collect();
    for chunk in wanted_list.chunks(MAX_FILTER_BACKENDS) {
        let filter = destination_filter(chunk);
        for &family in families {
            nl.dump(family, states, Some(&filter), storages.as_deref(), |info, value| {
                out.reported += 1;
                // Cheap, and keeps the answer right even if a kernel ignored the filter.
                if chunk.contains(&canonical(info.remote)) {
                    out.sockets.push((info, value));
                }
            })?;
        }
    }
    Ok(out)
}

/// An IPv4 address in v4-mapped IPv6 form is the IPv4 address.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => SocketAddr::new(IpAddr::V6(v6), addr.port()),
        },
        IpAddr::V4(_) => addr,
    }
}

// linux/inet_diag.h
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
/// `inet_diag_msg`, the fixed head of a reply; attributes follow.
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
// linux/sock_diag.h
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_D_COND: u8 = 8;
/// Backends per dump: a `JMP`'s `no` is a u16 (at most 32 bytes per backend).
const MAX_FILTER_BACKENDS: usize = 1024;
/// `struct inet_diag_bc_op { u8 code; u8 yes; u16 no; }`.
const BC_OP_LEN: usize = 4;
/// `struct inet_diag_hostcond { u8 family; u8 prefix_len; int port; __be32 addr[]; }`
/// (two bytes of padding before `port`).
const HOSTCOND_LEN: usize = 8;

/// Bytecode matching sockets whose remote end is exactly one of `backends`.
///
/// The kernel runs ops from the start while bytes remain: a true condition
/// advances by `yes`, a false one by `no`, a `JMP` always by `no`, and the
/// socket matches when the run ends exactly at the end. One backend is one
/// op: `yes` = its own length ends there (match) and `no` = length + 4 jumps
/// past the end (no match), which is what `ss` emits for `dst ADDR:PORT`.
/// Several are joined the way `ss` joins `or`: each condition is followed by
/// a `JMP` to the end, its `yes` lands on that `JMP` (match) and its `no`
/// skips it to the next condition; only the last condition's `no` goes past
/// the end. `inet_diag_bc_audit` accepts this: it follows `yes` from the
/// start through every op, `no` targets are op starts on that path or the
/// end, and every jump is a multiple of 4. An AF_INET condition also
/// matches an AF_INET6 socket whose remote is `::ffff:` + the address
/// (inet_diag_bc_run).
fn destination_filter(backends: &[SocketAddr]) -> Vec<u8> {
    let conds: Vec<Vec<u8>> = backends.iter().map(|b| hostcond(*b)).collect();
    let total = conds.iter().map(|c| BC_OP_LEN + c.len()).sum::<usize>() + BC_OP_LEN * conds.len().saturating_sub(1);
    let mut bc = Vec::with_capacity(total);
    for (i, cond) in conds.iter().enumerate() {
        let len = BC_OP_LEN + cond.len();
        let last = i + 1 == conds.len();
        bc.push(INET_DIAG_BC_D_COND);
        bc.push(len as u8);
        bc.extend_from_slice(&(len as u16 + 4).to_ne_bytes());
        bc.extend_from_slice(cond);
        if !last {
            let to_end = total - bc.len();
            bc.extend_from_slice(&[INET_DIAG_BC_JMP, BC_OP_LEN as u8]);
            bc.extend_from_slice(&(to_end as u16).to_ne_bytes());
        }
    }
    debug_assert_eq!(bc.len(), total);
    bc
}

/// The `inet_diag_hostcond` of a `D_COND` op matching exactly `backend`.
fn hostcond(backend: SocketAddr) -> Vec<u8> {
    let (family, addr) = match backend.ip() {
        IpAddr::V4(ip) => (AF_INET, ip.octets().to_vec()),
        IpAddr::V6(ip) => (AF_INET6, ip.octets().to_vec()),
    };
    let mut c = Vec::with_capacity(HOSTCOND_LEN + addr.len());
    c.push(family);
    c.push((addr.len() * 8) as u8); // full prefix
    c.extend_from_slice(&[0, 0]);
    // Host order; -1 would mean any port.
    c.extend_from_slice(&i32::from(backend.port()).to_ne_bytes());
    c.extend_from_slice(&addr);
    c
}

/// The body of `INET_DIAG_REQ_SK_BPF_STORAGES`: one nested
/// `SK_DIAG_BPF_STORAGE_REQ_MAP_FD` attribute (u32). The fd only has to be
/// open while the kernel parses the request.
fn storage_request(map: BorrowedFd<'_>) -> Vec<u8> {
    let fd = DefaultNla::new(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, (map.as_raw_fd() as u32).to_ne_bytes().to_vec());
    let mut body = vec![0; fd.buffer_len()];
    fd.emit(&mut body);
    body
}

/// The first attribute of `kind` in `data` (flags masked off by the crate).
fn attribute(data: &[u8], kind: u16) -> Option<NlaBuffer<&[u8]>> {
    NlasIterator::new(data).map_while(Result::ok).find(|a| a.kind() == kind)
}

/// The first socket-storage value among a reply's attributes (only one map
/// is ever requested).
fn storage_value(attrs: &[u8]) -> Option<Vec<u8>> {
    let storages = attribute(attrs, INET_DIAG_SK_BPF_STORAGES)?;
    NlasIterator::new(storages.value())
        .map_while(Result::ok)
        .filter(|s| s.kind() == SK_DIAG_BPF_STORAGE)
        .find_map(|storage| attribute(storage.value(), SK_DIAG_BPF_STORAGE_MAP_VALUE).map(|v| v.value().to_vec()))
}

/// A `SOCK_DIAG_BY_FAMILY` dump request: the crate's `InetRequest` followed
/// by request attributes (`INET_DIAG_REQ_BYTECODE`,
/// `INET_DIAG_REQ_SK_BPF_STORAGES`), which the crate cannot express.
struct FilteredDump {
    request: InetRequest,
    attrs: Vec<DefaultNla>,
}

impl NetlinkSerializable for FilteredDump {
    fn message_type(&self) -> u16 {
        SOCK_DIAG_BY_FAMILY
    }

    fn buffer_len(&self) -> usize {
        self.request.buffer_len() + self.attrs.as_slice().buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        let (head, attrs) = buffer.split_at_mut(self.request.buffer_len());
        self.request.emit(head);
        self.attrs.as_slice().emit(attrs);
    }
}

/// A dump reply: the fixed `inet_diag_msg` head and, when one was
/// requested, the socket's value in a socket-storage map.
struct Reply {
    head: InetResponseHeader,
    storage: Option<Vec<u8>>,
}

impl NetlinkDeserializable for Reply {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        if header.message_type != SOCK_DIAG_BY_FAMILY {
            return Err(DecodeError::from(format!("unexpected sock_diag message type {}", header.message_type)));
        }
        let head = InetResponseHeader::parse(payload)?;
        let storage = payload.get(INET_DIAG_MSG_LEN..).and_then(storage_value);
        Ok(Reply { head, storage })
    }
}

impl From<&InetResponseHeader> for SocketInfo {
    fn from(h: &InetResponseHeader) -> SocketInfo {
        let id = &h.socket_id;
        SocketInfo {
            cookie: cookie_from_kernel(id.cookie),
            state: h.state,
            local: socket_addr(id.source_address, id.source_port, id.interface_id),
            remote: socket_addr(id.destination_address, id.destination_port, id.interface_id),
            inode: h.inode,
            uid: h.uid,
        }
    }
}

/// The kernel's `idiag_if` is the socket's bound device; for an address that
/// needs a scope (link-local) that is what `getsockname` calls its scope id.
fn socket_addr(ip: IpAddr, port: u16, interface: u32) -> SocketAddr {
    match ip {
        IpAddr::V6(v6) => {
            let scope = if needs_scope(&v6) { interface } else { 0 };
            SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scope))
        }
        v4 => SocketAddr::new(v4, port),
    }
}

fn needs_scope(ip: &Ipv6Addr) -> bool {
    ip.is_unicast_link_local() || (ip.is_multicast() && ip.segments()[0] & 0x000f <= 2)
}

/// `idiag_cookie` is two host-order u32 halves, low first.
fn cookie_from_kernel(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    u64::from(low) | (u64::from(high) << 32)
}

fn cookie_to_kernel(cookie: u64) -> [u8; 8] {
    let mut raw = [0; 8];
    raw[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    raw[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    raw
}

/// The kernel's dump messages are at most 32 KiB (netlink caps its dump
/// allocation there), so a datagram always fits.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// One netlink socket for a call, with buffers reused across its requests.
struct DiagSocket {
    socket: Socket,
    tx: Vec<u8>,
    rx: Vec<u8>,
    seq: u32,
}

impl DiagSocket {
    fn open() -> Result<DiagSocket, SockDiagError> {
        let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Open)?;
        // The kernel's address; the socket is bound automatically on send.
        socket.connect(&netlink_sys::SocketAddr::new(0, 0)).map_err(SockDiagError::Open)?;
        Ok(DiagSocket { socket, tx: Vec::new(), rx: Vec::with_capacity(RECEIVE_BUFFER), seq: 0 })
    }

    /// Sends one request and returns its sequence number.
    fn send<M: NetlinkSerializable>(&mut self, flags: u16, message: M) -> Result<u32, SockDiagError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        self.tx.clear();
        self.tx.resize(packet.buffer_len(), 0);
        packet.serialize(&mut self.tx);
        loop {
            match self.socket.send(&self.tx, 0) {
                Ok(_) => return Ok(self.seq),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SockDiagError::Send(e)),
            }
        }
    }

    /// Receives one datagram into `rx` and passes each of its messages that
    /// answers `seq` to `each`, until `each` says the answer is complete.
    fn receive(
        &mut self,
        seq: u32,
        mut each: impl FnMut(NetlinkMessage<Reply>) -> Result<bool, SockDiagError>,
    ) -> Result<(), SockDiagError> {
        loop {
            self.rx.clear();
            match self.socket.recv(&mut self.rx, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SockDiagError::Receive(e)),
            }
            let mut data = &self.rx[..];
            while !data.is_empty() {
                let message = NetlinkMessage::<Reply>::deserialize(data).map_err(SockDiagError::Decode)?;
                let len = (message.header.length as usize).next_multiple_of(4).min(data.len());
                data = &data[len..];
                // A reply to an earlier request of this socket (a late ack).
                if message.header.sequence_number != seq {
                    continue;
                }
                if each(message)? {
                    return Ok(());
                }
            }
        }
    }

    /// Dumps the TCP sockets of `family` in `states`, filtered by `bytecode`,
    /// through the multi-part reply up to `NLMSG_DONE`.
    fn dump(
        &mut self,
        family: u8,
        states: States,
        bytecode: Option<&[u8]>,
        storages: Option<&[u8]>,
        mut each: impl FnMut(SocketInfo, Option<Vec<u8>>),
    ) -> Result<(), SockDiagError> {
        let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
        let request = InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::from_bits_truncate(states.0),
            socket_id,
        };
        let attrs = [(INET_DIAG_REQ_BYTECODE, bytecode), (INET_DIAG_REQ_SK_BPF_STORAGES, storages)]
            .into_iter()
            .filter_map(|(kind, value)| Some(DefaultNla::new(kind, value?.to_vec())))
            .collect();
        let seq = self.send(NLM_F_REQUEST | NLM_F_DUMP, FilteredDump { request, attrs })?;
        self.receive(seq, |message| match message.payload {
            NetlinkPayload::InnerMessage(Reply { head, storage }) => {
                each(SocketInfo::from(&head), storage);
                Ok(false)
            }
            NetlinkPayload::Done(done) if done.code != 0 => Err(SockDiagError::kernel("the socket dump", done.code)),
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) => match e.code {
                Some(code) => Err(SockDiagError::kernel("the socket dump", code.get())),
                None => Ok(false),
            },
            _ => Ok(false),
        })
    }

    /// Destroys one socket: true when it was destroyed, false when it was gone.
    fn destroy(&mut self, socket: &SocketInfo) -> Result<bool, SockDiagError> {
        let family = if socket.local.is_ipv4() { AF_INET } else { AF_INET6 };
        let interface = match socket.local {
            SocketAddr::V6(v6) => v6.scope_id(),
            SocketAddr::V4(_) => 0,
        };
        let request = InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: socket.local.port(),
                destination_port: socket.remote.port(),
                source_address: socket.local.ip(),
                destination_address: socket.remote.ip(),
                interface_id: interface,
                // The kernel answers ESTALE when the tuple now belongs to
                // another socket, which must not be destroyed in its place.
                cookie: cookie_to_kernel(socket.cookie),
            },
        };
        let message = SockDiagDestroy::new(SockDiagMessage::InetRequest(request));
        let seq = self.send(NLM_F_REQUEST | NLM_F_ACK, message)?;
        let mut outcome = Ok(false);
        self.receive(seq, |message| {
            let NetlinkPayload::Error(e) = message.payload else { return Ok(false) };
            outcome = match e.code.map(|c| -c.get()) {
                None => Ok(true),
                Some(libc::ENOENT | libc::ESTALE) => Ok(false),
                Some(libc::EOPNOTSUPP) => Err(SockDiagError::DestroyUnsupported),
                Some(errno) => Err(SockDiagError::kernel("SOCK_DESTROY", errno)),
            };
            Ok(true)
        })?;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        io::{ErrorKind, Read},
        net::{Ipv4Addr, TcpListener, TcpStream},
        os::fd::AsRawFd,
        time::{Duration, Instant},
    };

    use super::*;

    #[test]
    fn states_are_the_kernels_bits() {
        assert_eq!(States::ESTABLISHED.0, StateFlags::ESTABLISHED.bits());
        assert_eq!(States::SYN_SENT.0, StateFlags::SYN_SENT.bits());
        assert_eq!(States::ESTABLISHED.union(States::SYN_SENT).0, 0b110);
    }

    #[test]
    fn filter_bytecode_is_one_destination_condition() {
        let v4 = destination_filter(&["198.18.1.2:6443".parse().unwrap()]);
        let mut want = vec![INET_DIAG_BC_D_COND, 16];
        want.extend_from_slice(&20u16.to_ne_bytes());
        want.extend_from_slice(&[AF_INET, 32, 0, 0]);
        want.extend_from_slice(&6443i32.to_ne_bytes());
        want.extend_from_slice(&[198, 18, 1, 2]);
        assert_eq!(v4, want);

        let v6 = destination_filter(&["[2001:db8::1]:443".parse().unwrap()]);
        assert_eq!(v6.len(), 28);
        assert_eq!((v6[0], v6[1], u16::from_ne_bytes([v6[2], v6[3]])), (INET_DIAG_BC_D_COND, 28, 32));
        assert_eq!((v6[4], v6[5]), (AF_INET6, 128));
        assert_eq!(v6[12..], "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
    }

    #[test]
    fn several_destinations_are_joined_like_ss_joins_or() {
        let a: SocketAddr = "198.18.1.2:6443".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let bc = destination_filter(&[a, b]);
        let op = |at: usize| (bc[at], bc[at + 1], u16::from_ne_bytes([bc[at + 2], bc[at + 3]]));
        assert_eq!(bc.len(), 16 + 4 + 28);
        // a: true lands on the JMP, false skips it to b.
        assert_eq!(op(0), (INET_DIAG_BC_D_COND, 16, 20));
        assert_eq!(bc[4..16], destination_filter(&[a])[4..]);
        // The JMP always takes `no`: to the end, a match.
        assert_eq!(op(16), (INET_DIAG_BC_JMP, 4, 32));
        // b, the last: true ends at the end, false goes past it.
        assert_eq!(op(20), (INET_DIAG_BC_D_COND, 28, 32));
        assert_eq!(bc[24..], destination_filter(&[b])[4..]);
    }

    #[test]
    fn dump_request_carries_the_bytecode_attribute() {
        let filter = destination_filter(&["127.0.0.1:80".parse().unwrap()]);
        let dump = FilteredDump {
            request: InetRequest {
                family: AF_INET,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::ESTABLISHED,
                socket_id: SocketId::new_v4(),
            },
            attrs: vec![DefaultNla::new(INET_DIAG_REQ_BYTECODE, filter.clone())],
        };
        // inet_diag_req_v2 (56 bytes), then nlattr { len, type } and the bytecode.
        assert_eq!(dump.buffer_len(), 56 + 4 + filter.len());
        let mut buf = vec![0xaa; dump.buffer_len()];
        dump.serialize(&mut buf);
        assert_eq!(u16::from_ne_bytes([buf[56], buf[57]]) as usize, 4 + filter.len());
        assert_eq!(u16::from_ne_bytes([buf[58], buf[59]]), INET_DIAG_REQ_BYTECODE);
        assert_eq!(buf[60..], filter);
    }

    #[test]
    fn the_storage_value_is_found_among_the_reply_attributes() {
        let emit = |nla: DefaultNla| {
            let mut b = vec![0; nla.buffer_len()];
            nla.emit(&mut b);
            b
        };
        // What bpf_sk_storage_diag_put writes: STORAGES { STORAGE { MAP_ID, MAP_VALUE } }.
        let map_id = emit(DefaultNla::new(2, 7u32.to_ne_bytes().to_vec()));
        let value = emit(DefaultNla::new(SK_DIAG_BPF_STORAGE_MAP_VALUE, (1..=8).collect()));
        let storage = emit(DefaultNla::new(SK_DIAG_BPF_STORAGE, [map_id, value].concat()));
        let shutdown = emit(DefaultNla::new(8, vec![0]));
        let attrs = [shutdown.clone(), emit(DefaultNla::new(INET_DIAG_SK_BPF_STORAGES, storage))].concat();
        assert_eq!(storage_value(&attrs), Some((1..=8).collect()));
        assert_eq!(storage_value(&shutdown), None, "a socket without storage");
    }

    #[test]
    fn cookie_halves_round_trip() {
        let c = 0x0123_4567_89ab_cdef;
        assert_eq!(cookie_from_kernel(cookie_to_kernel(c)), c);
        let raw = cookie_to_kernel(c);
        assert_eq!(u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]), 0x89ab_cdef, "low half first");
    }

    #[test]
    fn mapped_addresses_are_their_ipv4_form() {
        let backend: SocketAddr = "198.18.1.2:6443".parse().unwrap();
        assert_eq!(canonical("[::ffff:198.18.1.2]:6443".parse().unwrap()), backend);
        assert_ne!(canonical("[::ffff:198.18.1.2]:6444".parse().unwrap()), backend);
        assert_eq!(canonical("[::1]:1".parse().unwrap()), "[::1]:1".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn errors_say_what_to_do() {
        let eperm = SockDiagError::kernel("SOCK_DESTROY", -libc::EPERM).to_string();
        assert!(eperm.contains("SOCK_DESTROY") && eperm.contains("CAP_NET_ADMIN"), "{eperm}");
        let einval = SockDiagError::kernel("the socket dump", -libc::EINVAL).to_string();
        assert!(einval.contains("Invalid argument") && !einval.contains("CAP_NET_ADMIN"), "{einval}");
        assert!(SockDiagError::DestroyUnsupported.to_string().contains("CONFIG_INET_DIAG_DESTROY"));
    }

    // ---- on the real kernel (loopback only) ----

    fn cookie(s: &TcpStream) -> u64 {
        let mut c: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64 into c.
        let rc = unsafe {
            libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&mut c as *mut u64).cast(), &mut len)
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        c
    }

    /// Destroying needs CAP_NET_ADMIN: such tests skip when not root, but
    /// never under CI.
    fn root() -> bool {
        // SAFETY: plain getter.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            assert!(std::env::var_os("CI").is_none(), "socket destroy tests need root in CI");
            eprintln!("skipping: SOCK_DESTROY needs CAP_NET_ADMIN (run as root)");
        }
        root
    }

    /// A loopback address of this test alone: tests run in parallel threads
    /// (and other test processes may run beside), and each checks what is
    /// connected to its own addresses.
    fn test_ip(test: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 78, (std::process::id() % 250) as u8 + 1, test)
    }

    struct Pairs {
        _listener: TcpListener,
        addr: SocketAddr,
        clients: Vec<TcpStream>,
        servers: Vec<TcpStream>,
    }

    /// A listener on `ip` and `n` connected clients with their accepted ends.
    fn connected(ip: IpAddr, n: usize) -> Pairs {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::with_capacity(n);
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(TcpStream::connect(addr).unwrap());
            servers.push(listener.accept().unwrap().0);
        }
        Pairs { _listener: listener, addr, clients, servers }
    }

    fn assert_aborted(c: &mut TcpStream) {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let start = Instant::now();
        let err = c.read(&mut [0u8; 16]).expect_err("a destroyed socket must not read");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    fn assert_open(c: &mut TcpStream) {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let err = c.read(&mut [0u8; 1]).expect_err("nothing was sent");
        assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err}");
    }

    fn tuples(sockets: &[SocketInfo]) -> HashSet<(SocketAddr, SocketAddr)> {
        sockets.iter().map(|s| (s.local, s.remote)).collect()
    }

    fn client_tuples(clients: &[TcpStream]) -> HashSet<(SocketAddr, SocketAddr)> {
        clients.iter().map(|c| (c.local_addr().unwrap(), c.peer_addr().unwrap())).collect()
    }

    fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn lists_and_destroys_established_sockets_to_the_backend() {
        if !root() {
            return;
        }
        let mut backend = connected(test_ip(1).into(), 2);
        let mut other = connected(test_ip(2).into(), 3);

        let found = sockets_to(backend.addr, States::ESTABLISHED.union(States::SYN_SENT)).unwrap();
        assert_eq!(tuples(&found), client_tuples(&backend.clients), "the clients, not the server side");
        let cookies: HashSet<u64> = backend.clients.iter().map(cookie).collect();
        assert_eq!(found.iter().map(|s| s.cookie).collect::<HashSet<_>>(), cookies);
        // SAFETY: plain getter.
        let uid = unsafe { libc::geteuid() };
        assert!(found.iter().all(|s| s.state == TCP_ESTABLISHED && s.uid == uid && s.inode != 0), "{found:?}");

        assert_eq!(destroy(&found).unwrap(), 2);
        for c in &mut backend.clients {
            assert_aborted(c);
        }
        // The server side was not destroyed: it sees the peer's reset.
        for s in &mut backend.servers {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let err = s.read(&mut [0u8; 1]).expect_err("the peer was reset");
            assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "{err}");
        }
        for c in other.clients.iter_mut().chain(&mut other.servers) {
            assert_open(c);
        }
        assert!(sockets_to(backend.addr, States::ESTABLISHED).unwrap().is_empty());
    }

    #[test]
    fn the_kernel_filters_by_destination() {
        // Listing needs no privilege; this runs as any user.
        let crowd = connected(test_ip(3).into(), 300);
        let backend = connected(test_ip(4).into(), 2);

        let q = query(&[backend.addr], States::ESTABLISHED, None).unwrap();
        assert_eq!(
            tuples(&q.sockets.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>()),
            client_tuples(&backend.clients)
        );
        assert_eq!(q.reported, 2, "the kernel sent only the backend's sockets");

        // Without the filter the same dump carries the crowd (600 sockets,
        // both ends of each connection) and whatever else the machine has.
        let mut unfiltered = 0;
        DiagSocket::open().unwrap().dump(AF_INET, States::ESTABLISHED, None, None, |_, _| unfiltered += 1).unwrap();
        assert!(unfiltered >= 2 * crowd.clients.len(), "{unfiltered}");
    }

    #[test]
    fn several_backends_are_found_in_one_query() {
        let crowd = connected(test_ip(11).into(), 100);
        // Three: the middle condition is reached only through a `no` jump.
        let backends =
            [connected(test_ip(12).into(), 2), connected(test_ip(13).into(), 3), connected(test_ip(14).into(), 1)];

        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let q = query(&addrs, States::ESTABLISHED, None).unwrap();
        let found = tuples(&q.sockets.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>());
        let want: HashSet<_> = backends.iter().flat_map(|b| client_tuples(&b.clients)).collect();
        assert_eq!(found, want);
        assert_eq!(
            q.reported,
            6,
            "the kernel sent only the backends' sockets, not the crowd's {}",
            crowd.clients.len()
        );
    }

    #[test]
    fn states_select_what_is_reported() {
        let backend = connected(test_ip(5).into(), 1);
        assert_eq!(sockets_to(backend.addr, States::ESTABLISHED).unwrap().len(), 1);
        assert!(sockets_to(backend.addr, States::SYN_SENT).unwrap().is_empty());
    }

    /// A listener whose accept queue is full drops SYNs: connects to it stay
    /// in SYN_SENT, like connects to a controller that stopped answering.
    #[test]
    fn syn_sent_connects_to_a_silent_backend_are_found_and_destroyed() {
        if !root() {
            return;
        }
        let listener = TcpListener::bind((test_ip(6), 0)).unwrap();
        // SAFETY: listen(2) again on a listening socket only changes its backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let addr = listener.local_addr().unwrap();
        // Backlog 0 still queues one connection; it fills the queue.
        let filler = TcpStream::connect(addr).unwrap();

        let connects: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let r = TcpStream::connect_timeout(&addr, Duration::from_secs(10));
                    (r.map(|_| ()), start.elapsed())
                })
            })
            .collect();
        let stuck = wait_for(Duration::from_secs(3), || {
            let found = sockets_to(addr, States::SYN_SENT).unwrap();
            (found.len() == 3).then_some(found)
        })
        .expect("three connects in SYN_SENT");
        assert!(stuck.iter().all(|s| s.state == TCP_SYN_SENT), "{stuck:?}");
        let filler_tuple = (filler.local_addr().unwrap(), addr);
        assert!(!tuples(&stuck).contains(&filler_tuple), "the established filler is not SYN_SENT");

        let destroyed_at = Instant::now();
        assert_eq!(destroy(&stuck).unwrap(), 3);
        for c in connects {
            let (r, took) = c.join().unwrap();
            let err = r.expect_err("a destroyed connect must fail");
            assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
            assert!(took < Duration::from_secs(5), "the connect ended at the destroy, not at its timeout: {took:?}");
        }
        assert!(destroyed_at.elapsed() < Duration::from_secs(2));
        let mut filler = filler;
        assert_open(&mut filler);
    }

    #[test]
    fn v4_mapped_sockets_match_the_v4_backend() {
        if !root() {
            return;
        }
        let ip = test_ip(7);
        let mut backend = connected(ip.into(), 1);
        // An AF_INET6 socket to the same backend through its ::ffff: form.
        let mapped = SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), backend.addr.port());
        let mut v6_client = TcpStream::connect(mapped).unwrap();
        let _v6_server = backend._listener.accept().unwrap();
        assert!(v6_client.local_addr().unwrap().is_ipv6());

        let mut want = client_tuples(&backend.clients);
        want.insert((v6_client.local_addr().unwrap(), mapped));
        let found = sockets_to(backend.addr, States::ESTABLISHED).unwrap();
        assert_eq!(tuples(&found), want, "the v6 socket keeps its ::ffff: form");
        assert_eq!(tuples(&sockets_to(mapped, States::ESTABLISHED).unwrap()), want, "a mapped backend is the v4 one");

        assert_eq!(destroy(&found).unwrap(), 2);
        assert_aborted(&mut backend.clients[0]);
        assert_aborted(&mut v6_client);
    }

    #[test]
    fn ipv6_loopback_sockets() {
        if !root() {
            return;
        }
        if TcpListener::bind("[::1]:0").is_err() {
            assert!(std::env::var_os("CI").is_none(), "IPv6 loopback is missing");
            eprintln!("skipping: no IPv6 loopback");
            return;
        }
        let mut backend = connected("::1".parse().unwrap(), 2);
        let found = sockets_to(backend.addr, States::ESTABLISHED).unwrap();
        assert_eq!(tuples(&found), client_tuples(&backend.clients));
        assert_eq!(destroy(&found).unwrap(), 2);
        for c in &mut backend.clients {
            assert_aborted(c);
        }
    }

    #[test]
    fn nothing_to_destroy_is_zero() {
        if !root() {
            return;
        }
        let unused = SocketAddr::new(test_ip(8).into(), 1);
        let none = sockets_to(unused, States::ESTABLISHED.union(States::SYN_SENT)).unwrap();
        assert!(none.is_empty(), "{none:?}");
        assert_eq!(destroy(&none).unwrap(), 0);

        // A socket that closed since it was listed is not an error either.
        // (Closed with a reset: a FIN would leave it in FIN_WAIT or
        // TIME_WAIT, which the kernel still finds and destroys.)
        let backend = connected(test_ip(8).into(), 1);
        let found = sockets_to(backend.addr, States::ESTABLISHED).unwrap();
        assert_eq!(found.len(), 1);
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: SO_LINGER reads a struct linger of the given size.
        let rc = unsafe {
            libc::setsockopt(
                backend.clients[0].as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
        drop(backend);
        assert_eq!(destroy(&found).unwrap(), 0);
    }

    /// How long listing and destroying thousands of sockets take.
    #[test]
    fn destroys_thousands_of_sockets() {
        if !root() {
            return;
        }
        const N: usize = 3000;
        // Both ends of each connection, plus the other tests running beside.
        raise_fd_limit(2 * N as u64 + 4096);
        let mut backend = connected(test_ip(9).into(), N);

        let start = Instant::now();
        let found = sockets_to(backend.addr, States::ESTABLISHED.union(States::SYN_SENT)).unwrap();
        let listed = start.elapsed();
        assert_eq!(found.len(), N);

        // What the filter saves: a query for another backend while these
        // 2 × N sockets exist, against a dump of them all.
        let start = Instant::now();
        let elsewhere = query(&[SocketAddr::new(test_ip(10).into(), 1)], States::ESTABLISHED, None).unwrap();
        let filtered = start.elapsed();
        assert_eq!(elsewhere.reported, 0);
        let start = Instant::now();
        let mut all = 0;
        DiagSocket::open().unwrap().dump(AF_INET, States::ESTABLISHED, None, None, |_, _| all += 1).unwrap();
        let unfiltered = start.elapsed();
        assert!(all >= 2 * N, "{all}");
        eprintln!(
            "sock_diag: with {all} sockets, a filtered query took {filtered:?}, an unfiltered dump {unfiltered:?}"
        );

        let start = Instant::now();
        let destroyed = destroy(&found).unwrap();
        let took = start.elapsed();
        assert_eq!(destroyed, N);
        eprintln!(
            "sock_diag: listed {N} sockets in {listed:?}, destroyed {destroyed} in {took:?} ({:.0} per second)",
            destroyed as f64 / took.as_secs_f64()
        );
        for c in &mut backend.clients {
            let err = c.read(&mut [0u8; 1]).expect_err("destroyed");
            assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        }
        // Generous: a loaded 2-core machine, debug build.
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    fn raise_fd_limit(want: u64) {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit with a valid struct.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            if lim.rlim_cur < want {
                lim.rlim_cur = want;
                lim.rlim_max = lim.rlim_max.max(want);
                assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "{}", io::Error::last_os_error());
            }
        }
    }
}
