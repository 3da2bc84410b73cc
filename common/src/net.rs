//! Host candidates: the local addresses a peer announces for LAN connections.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// A rendezvous server to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousAddr {
    /// UDP address.
    pub addr: SocketAddr,
    /// Name its certificate must be valid for (DNS name or IP).
    pub server_name: String,
}

/// Why a rendezvous address could not be used.
#[derive(Debug, thiserror::Error)]
#[error("bad rendezvous address {value:?}: {why}")]
pub struct AddrError {
    /// The text given.
    pub value: String,
    /// What is wrong.
    pub why: String,
}

impl RendezvousAddr {
    /// Parses `host:port` (resolving a DNS name); the host is the name the rendezvous'
    /// certificate must carry.
    pub fn parse(s: &str) -> Result<Self, AddrError> {
        let bad = |why: String| AddrError {
            value: s.to_string(),
            why,
        };
        let (host, _) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port, e.g. rdv.example.com:7400".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = s
            .to_socket_addrs()
            .map_err(|e| bad(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| bad("name resolves to no address".into()))?;
        Ok(RendezvousAddr {
            addr,
            server_name: host.to_string(),
        })
    }
}

impl std::fmt::Display for RendezvousAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr)
    }
}

/// The address with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack
/// socket reports for an IPv4 peer) turned back into plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The form of `target` that a socket bound to `local` can send to: IPv4 targets become
/// IPv4-mapped for an IPv6 (dual-stack) socket. `None` if the socket cannot reach it.
pub fn for_socket(local: SocketAddr, target: SocketAddr) -> Option<SocketAddr> {
    match (local, target) {
        (SocketAddr::V6(_), SocketAddr::V4(t)) => {
            Some(SocketAddr::new(t.ip().to_ipv6_mapped().into(), t.port()))
        }
        (SocketAddr::V4(_), SocketAddr::V6(t)) => t
            .ip()
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(v4.into(), t.port())),
        _ => Some(target),
    }
}

/// The addresses a socket bound to `bound` can be reached at on the local networks.
///
/// A socket bound to one address announces that address. A socket bound to the unspecified
/// address announces every interface address of the same family (IPv4 sockets) or both
/// families (IPv6 sockets), except loopback and IPv6 link-local (which needs a scope).
pub fn host_candidates(bound: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = ifaces
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !is_link_local_v6(ip))
        .filter(|ip| bound.is_ipv6() || ip.is_ipv4())
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    out.sort();
    out.dedup();
    out.truncate(crate::rdv::MAX_LOCAL_ADDRS);
    out
}

/// Every address of this host's interfaces, loopback included.
pub fn interface_ips() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|ifs| ifs.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

/// Whether `ip` is on the same link as one of this host's interfaces (reachable without a
/// router): what makes a path `lan` rather than `direct`.
pub fn on_link(ip: IpAddr) -> bool {
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        return false;
    };
    ifaces.iter().any(|i| match (&i.addr, ip) {
        (if_addrs::IfAddr::V4(a), IpAddr::V4(ip)) => {
            same_prefix(&a.ip.octets(), &ip.octets(), a.prefixlen)
        }
        (if_addrs::IfAddr::V6(a), IpAddr::V6(ip)) => {
            same_prefix(&a.ip.octets(), &ip.octets(), a.prefixlen)
        }
        _ => false,
    })
}

fn same_prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits).min(a.len() * 8);
    let (full, rest) = (bits / 8, bits % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0
}

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_name_is_the_host() {
        let r = RendezvousAddr::parse("127.0.0.1:7400").unwrap();
        assert_eq!(r.server_name, "127.0.0.1");
        assert_eq!(r.addr.port(), 7400);
        let err = RendezvousAddr::parse("nohost").unwrap_err().to_string();
        assert!(err.contains("host:port"), "{err}");
    }

    #[test]
    fn mapped_addresses_are_normalised_both_ways() {
        let v4: SocketAddr = "198.18.0.5:7".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:198.18.0.5]:7".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        let v6_local: SocketAddr = "[::]:0".parse().unwrap();
        let v4_local: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(for_socket(v6_local, v4), Some(mapped));
        assert_eq!(for_socket(v4_local, mapped), Some(v4));
        assert_eq!(for_socket(v4_local, "[2001:2::1]:7".parse().unwrap()), None);
    }

    #[test]
    fn prefixes_compare_bitwise() {
        assert!(same_prefix(&[198, 19, 1, 2], &[198, 19, 1, 3], 24));
        assert!(!same_prefix(&[198, 19, 1, 2], &[198, 19, 2, 3], 24));
        assert!(same_prefix(&[10, 0, 0, 1], &[10, 0, 0, 130], 24));
        assert!(!same_prefix(&[10, 0, 0, 1], &[10, 0, 0, 130], 25));
        assert!(same_prefix(&[1, 2, 3, 4], &[9, 9, 9, 9], 0));
        assert!(on_link("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bound_address_is_announced_as_is() {
        let a: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        assert_eq!(host_candidates(a), vec![a]);
    }

    #[test]
    fn unspecified_announces_no_loopback() {
        let a: SocketAddr = "0.0.0.0:4000".parse().expect("addr");
        for c in host_candidates(a) {
            assert!(!c.ip().is_loopback());
            assert_eq!(c.port(), 4000);
        }
    }
}
