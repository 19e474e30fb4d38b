//! The two kinds of address nllb deals in, each checked once where it is
//! read (config, API server, cache):
//!
//! - [`VirtualAddr`]: what clients dial, a loopback IP and a port;
//! - [`BackendAddr`]: a controller's IP, never a local or non-unicast one.
//!
//! Both read `[::ffff:a.b.c.d]` as the IPv4 address it carries
//! ([`canonical_ip`]): connect6 sees v4-mapped addresses in that form, and
//! one address must not be two map keys. As config values they deserialize
//! through `TryFrom<String>`, so a bad one is reported at its own field
//! path (`services[0].listen[1]`, `backends[2]`) with the fix.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// What both address types share: the inner address, conversions from and
/// to the config's strings (through the type's `FromStr`), and display.
macro_rules! address_type {
    ($name:ident, $inner:ty) => {
        impl $name {
            pub fn get(self) -> $inner {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                text.parse()
            }
        }

        impl From<$name> for String {
            fn from(a: $name) -> String {
                a.0.to_string()
            }
        }

        impl From<$name> for $inner {
            fn from(a: $name) -> $inner {
                a.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

address_type!(VirtualAddr, SocketAddr);
address_type!(BackendAddr, IpAddr);

/// A virtual address: loopback IP and a non-zero port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct VirtualAddr(SocketAddr);

impl FromStr for VirtualAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let addr: SocketAddr = text
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address:port; write \"127.0.0.1:7443\" or \"[::1]:7443\""))?;
        let ip = canonical_ip(addr.ip());
        if !ip.is_loopback() {
            return Err(format!("{text:?} is not a loopback address; virtual addresses must be in 127.0.0.0/8 or ::1"));
        }
        if addr.port() == 0 {
            return Err(format!("{text:?} has port 0; use the port clients dial, e.g. 7443"));
        }
        Ok(VirtualAddr(SocketAddr::new(ip, addr.port())))
    }
}

/// A controller address: an IP that is neither loopback, unspecified nor
/// multicast (also how addresses from the API server are checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackendAddr(IpAddr);

impl FromStr for BackendAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let ip: IpAddr = text
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address; write a controller IP such as 198.18.1.2"))?;
        let ip = canonical_ip(ip);
        if ip.is_loopback() {
            return Err(format!("{text:?} is loopback; a backend must be a controller's address, not a local one"));
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("{text:?} cannot be a backend; use a controller's unicast address"));
        }
        Ok(BackendAddr(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_loopback_vip_is_its_ipv4_form() {
        let v: VirtualAddr = "[::ffff:127.0.0.1]:7443".parse().unwrap();
        assert_eq!(v.get(), "127.0.0.1:7443".parse().unwrap());
    }

    #[test]
    fn virtual_addresses_must_be_loopback_with_a_port() {
        assert!("10.0.0.1:7443".parse::<VirtualAddr>().unwrap_err().contains("loopback"));
        assert!("127.0.0.1:0".parse::<VirtualAddr>().unwrap_err().contains("port 0"));
        assert!("127.0.0.1".parse::<VirtualAddr>().unwrap_err().contains("address:port"));
        assert_eq!("[::1]:7443".parse::<VirtualAddr>().unwrap().to_string(), "[::1]:7443");
    }

    #[test]
    fn backends_are_remote_unicast_addresses() {
        assert_eq!("::ffff:198.18.1.2".parse::<BackendAddr>().unwrap().get(), "198.18.1.2".parse::<IpAddr>().unwrap());
        for bad in ["127.0.0.5", "::1", "0.0.0.0", "224.0.0.1", "not-an-ip"] {
            assert!(bad.parse::<BackendAddr>().is_err(), "{bad}");
        }
    }
}
