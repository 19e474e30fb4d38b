//! TEMPORARY (lead's branch): the new sock_diag API over the old hand-rolled
//! netlink code, until the crate-based module lands.
//! Closing established TCP sockets to a backend with sock_diag
//! `SOCK_DESTROY` (what `ss -K` does).
//!
//! A connect-time rewrite cannot move a socket that is already connected, so
//! when a backend is removed (or ejected) its long-lived streams, such as
//! kubelet's watches, would hang until TCP gives up. Destroying them makes
//! the owner see `ECONNABORTED` at once and reconnect through the virtual
//! address, which now leads to a healthy controller.
//!
//! Works in the caller's network namespace; needs CAP_NET_ADMIN there and a
//! kernel with `CONFIG_INET_DIAG_DESTROY` (else every destroy fails with
//! `EOPNOTSUPP`, returned as the error).

use std::{
    collections::HashSet,
    io,
    mem::size_of,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
/// Sockets worth closing: connected ones, and connects still waiting for a
/// SYN-ACK from a backend that is gone.
const STATES: u32 = u32::MAX;

/// `struct inet_diag_sockid` (linux/inet_diag.h). Ports and addresses are in
/// network byte order; the cookie is two host-order halves, low first.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    if_index: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg` (the head of each dump reply).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// Destroys the ESTABLISHED and SYN_SENT TCP sockets of this network
/// namespace whose remote end is `backend`. With `only_cookies`, only
/// sockets whose cookie is in the set (the agent passes the keys of
/// `NLLB_SOCKETS`, so only connects nllb rewrote are touched). An IPv4
/// backend also matches IPv6 sockets connected to its `::ffff:` form.
/// Returns how many sockets were destroyed; sockets that closed on their own
/// meanwhile are not errors.
pub fn destroy_sockets_to(backend: SocketAddr, only_cookies: Option<&HashSet<u64>>) -> io::Result<usize> {
    let nl = NetlinkDiag::open()?;
    let mut victims = Vec::new();
    let families: &[u8] = match backend.ip() {
        IpAddr::V4(_) => &[libc::AF_INET as u8, libc::AF_INET6 as u8],
        IpAddr::V6(_) => &[libc::AF_INET6 as u8],
    };
    for &family in families {
        for msg in nl.dump_tcp(family)? {
            if remote_of(&msg).is_some_and(|r| same_backend(r, backend))
                && only_cookies.is_none_or(|set| set.contains(&cookie_of(&msg.id)))
            {
                victims.push(msg);
            }
        }
    }
    let mut destroyed = 0;
    for msg in victims {
        match nl.destroy(&msg) {
            Ok(()) => destroyed += 1,
            // Closed between the dump and now.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(destroyed)
}

fn cookie_of(id: &InetDiagSockId) -> u64 {
    u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32)
}

fn remote_of(msg: &InetDiagMsg) -> Option<SocketAddr> {
    let port = u16::from_be_bytes(msg.id.dport);
    let ip = match i32::from(msg.family) {
        libc::AF_INET => IpAddr::from([msg.id.dst[0], msg.id.dst[1], msg.id.dst[2], msg.id.dst[3]]),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(msg.id.dst)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn same_backend(remote: SocketAddr, backend: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    remote.port() == backend.port() && canon(remote.ip()) == canon(backend.ip())
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

struct NetlinkDiag {
    fd: OwnedFd,
}

impl NetlinkDiag {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(NetlinkDiag { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn send(&self, kind: u16, flags: u16, seq: u32, req: &InetDiagReqV2) -> io::Result<()> {
        let mut buf = Vec::with_capacity(size_of::<NlMsgHdr>() + size_of::<InetDiagReqV2>());
        let hdr =
            NlMsgHdr { len: (size_of::<NlMsgHdr>() + size_of::<InetDiagReqV2>()) as u32, kind, flags, seq, pid: 0 };
        buf.extend_from_slice(as_bytes(&hdr));
        buf.extend_from_slice(as_bytes(req));
        // SAFETY: zeroed sockaddr_nl with the family set addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buf and kernel outlive the call; lengths match.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram (possibly several netlink messages).
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn dump_tcp(&self, family: u8) -> io::Result<Vec<InetDiagMsg>> {
        let req = InetDiagReqV2 { family, protocol: libc::IPPROTO_TCP as u8, states: STATES, ..Default::default() };
        let seq = 1;
        self.send(SOCK_DIAG_BY_FAMILY, (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16, seq, &req)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for (hdr, payload) in messages(&buf[..n]) {
                match i32::from(hdr.kind) {
                    libc::NLMSG_DONE => return Ok(out),
                    libc::NLMSG_ERROR => {
                        return Err(nl_error(payload).unwrap_or_else(|| io::Error::other("netlink error")));
                    }
                    _ if hdr.kind == SOCK_DIAG_BY_FAMILY && payload.len() >= size_of::<InetDiagMsg>() => {
                        out.push(from_bytes::<InetDiagMsg>(payload));
                    }
                    _ => {}
                }
            }
        }
    }

    fn destroy(&self, msg: &InetDiagMsg) -> io::Result<()> {
        let req = InetDiagReqV2 {
            family: msg.family,
            protocol: libc::IPPROTO_TCP as u8,
            states: u32::MAX,
            id: msg.id,
            ..Default::default()
        };
        let seq = 2;
        self.send(SOCK_DESTROY, (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16, seq, &req)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf)?;
            for (hdr, payload) in messages(&buf[..n]) {
                if i32::from(hdr.kind) == libc::NLMSG_ERROR && hdr.seq == seq {
                    return match nl_error(payload) {
                        None => Ok(()),
                        Some(e) => Err(e),
                    };
                }
            }
        }
    }
}

/// Splits a datagram into (header, payload) pairs.
fn messages(mut data: &[u8]) -> impl Iterator<Item = (NlMsgHdr, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < size_of::<NlMsgHdr>() {
            return None;
        }
        let hdr: NlMsgHdr = from_bytes(data);
        let len = hdr.len as usize;
        if len < size_of::<NlMsgHdr>() || len > data.len() {
            return None;
        }
        let payload = &data[size_of::<NlMsgHdr>()..len];
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
        Some((hdr, payload))
    })
}

/// The errno of an NLMSG_ERROR payload; None for an ACK (error 0).
fn nl_error(payload: &[u8]) -> Option<io::Error> {
    if payload.len() < 4 {
        return Some(io::Error::other("short netlink error message"));
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a repr(C) plain-old-data struct without padding bytes
    // that matter to the kernel (all are explicit fields here).
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let n = size_of::<T>().min(b.len());
    // SAFETY: copies at most size_of::<T>() bytes into a plain-old-data T.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), n) };
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct States(u32);
impl States {
    pub const SYN_SENT: States = States(1 << TCP_SYN_SENT);
    pub const ESTABLISHED: States = States(1 << TCP_ESTABLISHED);
    pub const fn union(self, other: States) -> States {
        States(self.0 | other.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    pub cookie: u64,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u32,
    pub uid: u32,
    msg: Msg,
}

#[derive(Clone, Copy)]
struct Msg(InetDiagMsg);
impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("msg")
    }
}
impl PartialEq for Msg {
    fn eq(&self, o: &Msg) -> bool {
        self.0.id.cookie == o.0.id.cookie
    }
}
impl Eq for Msg {}

pub type SockDiagError = io::Error;

pub fn sockets_to(backend: SocketAddr, states: States) -> io::Result<Vec<SocketInfo>> {
    let nl = NetlinkDiag::open()?;
    let families: &[u8] = match backend.ip() {
        IpAddr::V4(_) => &[libc::AF_INET as u8, libc::AF_INET6 as u8],
        IpAddr::V6(_) => &[libc::AF_INET6 as u8],
    };
    let mut out = Vec::new();
    for &family in families {
        for msg in nl.dump_tcp(family)? {
            if states.0 & (1 << msg.state) == 0 {
                continue;
            }
            if let Some(r) = remote_of(&msg).filter(|r| same_backend(*r, backend)) {
                let port = u16::from_be_bytes(msg.id.sport);
                let ip = match i32::from(msg.family) {
                    libc::AF_INET => IpAddr::from([msg.id.src[0], msg.id.src[1], msg.id.src[2], msg.id.src[3]]),
                    _ => IpAddr::V6(Ipv6Addr::from(msg.id.src)),
                };
                out.push(SocketInfo {
                    cookie: cookie_of(&msg.id),
                    state: msg.state,
                    local: SocketAddr::new(ip, port),
                    remote: r,
                    inode: msg.inode,
                    uid: msg.uid,
                    msg: Msg(msg),
                });
            }
        }
    }
    Ok(out)
}

pub fn destroy(sockets: &[SocketInfo]) -> io::Result<usize> {
    let nl = NetlinkDiag::open()?;
    let mut n = 0;
    for s in sockets {
        match nl.destroy(&s.msg.0) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
