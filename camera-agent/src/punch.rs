//! Punch packets: which addresses to send tiny UDP packets to, and when. Pure.
//!
//! The camera sends them from its QUIC socket towards the viewer's candidates, just before
//! it tells the rendezvous it accepts, so that its NAT has a mapping open for the viewer's
//! first Initial. They are at most [`PUNCH_LEN`] bytes (quinn answers nothing to packets
//! that short) and bounded in number and time: a camera never becomes a packet cannon
//! aimed at an address it was merely told about.

use std::net::SocketAddr;
use std::time::Duration;

pub use peercam_common::quic::{PUNCH, PUNCH_LEN};

/// Most distinct addresses punched per introduction.
pub const MAX_TARGETS: usize = 8;
/// When each round of punches leaves, relative to the introduction.
pub const ROUNDS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(30),
    Duration::from_millis(120),
];
/// Upper bound of packets per introduction.
pub const MAX_PACKETS: usize = MAX_TARGETS * ROUNDS.len();

/// The targets to punch, in the form the socket bound to `local` sends to: deduplicated,
/// reachable from the socket's family (an IPv4 socket cannot reach IPv6), no unspecified
/// or multicast addresses, at most [`MAX_TARGETS`].
pub fn targets(candidates: &[SocketAddr], local: SocketAddr) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for c in candidates {
        let usable = !c.ip().is_unspecified() && !c.ip().is_multicast() && c.port() != 0;
        let Some(c) = peercam_common::net::for_socket(local, *c).filter(|_| usable) else {
            continue;
        };
        if !out.contains(&c) {
            out.push(c);
        }
        if out.len() == MAX_TARGETS {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_bounded_deduplicated_and_sane() {
        let local: SocketAddr = "0.0.0.0:5000".parse().expect("addr");
        let mut cands: Vec<SocketAddr> = (1..40)
            .map(|i| format!("198.18.0.{i}:4000").parse().expect("addr"))
            .collect();
        cands.insert(0, "198.18.0.1:4000".parse().expect("addr"));
        cands.insert(0, "0.0.0.0:4000".parse().expect("addr"));
        cands.insert(0, "[2001:db8::1]:4000".parse().expect("addr"));
        cands.insert(0, "224.0.0.1:4000".parse().expect("addr"));
        let t = targets(&cands, local);
        assert_eq!(t.len(), MAX_TARGETS);
        assert_eq!(t[0], "198.18.0.1:4000".parse::<SocketAddr>().expect("addr"));
        assert!(t.iter().all(|a| a.is_ipv4() && !a.ip().is_unspecified()));
        assert!(PUNCH.len() <= 21);
        assert_eq!(MAX_PACKETS, 24);
    }
}
