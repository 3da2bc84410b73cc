//! Host candidates: the local addresses a peer announces for LAN connections.

use std::net::{IpAddr, SocketAddr};

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

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

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
