//! Socket addresses to and from the map contract's network-order layout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nllb_common::{BackendKey, BackendSlot, FAMILY_V4, FAMILY_V6, SockState, Vip4Key, Vip6Key};

/// IPv6 address as the kernel's `__u32 user_ip6[4]` (each word in network order).
pub fn ip6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

pub fn ip6_from_words(w: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

pub fn ip4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The port as the kernel stores it: network order in a u16.
pub fn port_be(port: u16) -> u16 {
    port.to_be()
}

fn addr_words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip {
        IpAddr::V4(v4) => ([ip4_word(v4), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => (ip6_words(v6), FAMILY_V6),
    }
}

fn words_addr(addr: [u32; 4], family: u16) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))
    } else {
        IpAddr::V6(ip6_from_words(addr))
    }
}

pub fn vip4_key(ip: Ipv4Addr, port: u16) -> Vip4Key {
    Vip4Key { addr: ip4_word(ip), port: port_be(port), _pad: 0 }
}

pub fn vip6_key(ip: Ipv6Addr, port: u16) -> Vip6Key {
    Vip6Key { addr: ip6_words(ip), port: port_be(port), _pad: 0 }
}

/// A slot with no SYN timeout of its own and no clear time; see
/// `tables.rs` for those.
pub fn backend_slot(addr: SocketAddr, stat_id: u32) -> BackendSlot {
    let (words, family) = addr_words(addr.ip());
    BackendSlot { addr: words, port: port_be(addr.port()), family, stat_id, ..Default::default() }
}

pub fn slot_addr(slot: &BackendSlot) -> SocketAddr {
    SocketAddr::new(words_addr(slot.addr, slot.family), u16::from_be(slot.port))
}

pub fn backend_key(addr: SocketAddr) -> BackendKey {
    let (words, family) = addr_words(addr.ip());
    BackendKey { addr: words, port: port_be(addr.port()), family }
}

pub fn key_addr(key: &BackendKey) -> SocketAddr {
    SocketAddr::new(words_addr(key.addr, key.family), u16::from_be(key.port))
}

/// The virtual address a steered socket dialed, as the application did.
pub fn sock_vip(s: &SockState) -> SocketAddr {
    SocketAddr::new(words_addr(s.vip, s.family), u16::from_be(s.vip_port))
}

/// The backend a steered socket was sent to (IPv4-mapped forms folded to
/// IPv4, as backends are published).
pub fn sock_backend(s: &SockState) -> SocketAddr {
    let ip = match words_addr(s.backend, s.family) {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    SocketAddr::new(ip, u16::from_be(s.backend_port))
}

/// Words, port and family of an event's address fields.
pub fn event_addr(addr: [u32; 4], port: u16, family: u16) -> Option<SocketAddr> {
    (family == FAMILY_V4 || family == FAMILY_V6).then(|| SocketAddr::new(words_addr(addr, family), u16::from_be(port)))
}

pub fn vip4_addr(k: &Vip4Key) -> SocketAddr {
    SocketAddr::new(words_addr([k.addr, 0, 0, 0], FAMILY_V4), u16::from_be(k.port))
}

pub fn vip6_addr(k: &Vip6Key) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip6_from_words(k.addr)), u16::from_be(k.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_stored_in_network_order() {
        let k = vip4_key(Ipv4Addr::new(127, 0, 0, 1), 7443);
        // The bytes in memory are the address as on the wire.
        assert_eq!(k.addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), 7443u16.to_be_bytes());
        assert_eq!(vip4_addr(&k), "127.0.0.1:7443".parse().unwrap());
    }

    #[test]
    fn ipv6_round_trips() {
        let a: SocketAddr = "[2001:2:0:1::2]:6443".parse().unwrap();
        let s = backend_slot(a, 7);
        assert_eq!(s.family, FAMILY_V6);
        assert_eq!(s.stat_id, 7);
        assert_eq!(s.addr[0].to_ne_bytes(), [0x20, 0x01, 0x00, 0x02]);
        assert_eq!(slot_addr(&s), a);
        assert_eq!(key_addr(&backend_key(a)), a);
    }

    #[test]
    fn ipv4_backend_round_trips() {
        let a: SocketAddr = "198.18.1.2:6443".parse().unwrap();
        let s = backend_slot(a, 1);
        assert_eq!(s.family, FAMILY_V4);
        assert_eq!(s.addr[1..], [0, 0, 0]);
        assert_eq!(slot_addr(&s), a);
    }
}
