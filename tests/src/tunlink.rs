//! A real, impaired IP link between two network namespaces, for programs that use the
//! kernel's own stacks (TCP above all), which the in-socket model of
//! [`peercam_common::impair`] cannot reach.
//!
//! ```text
//!  ns <prefix>-ta                                           ns <prefix>-tb
//!  <prefix>a 198.18.250.1/24 ─┐                       ┌─ <prefix>b 198.18.250.2/24
//!                         TUN fd ── Shaper a→b ──▶ TUN fd
//!                         TUN fd ◀── Shaper b→a ── TUN fd
//!                      (both held by this process, in the root namespace)
//! ```
//!
//! This process creates both TUN devices, moves each into its namespace (the file
//! descriptor stays with us), and runs one forwarder task per direction that reads IP
//! packets from one device and writes them to the other when a
//! [`Shaper`] says the modelled link delivers them: the same one-way delay, jitter, loss
//! and rate with a tail-drop queue as the QUIC socket model, per packet instead of per
//! datagram. Nothing is routed out of the lab: each namespace only knows the /24.
//!
//! Owns the two namespaces (deleted on drop, with every process left in them) and the two
//! forwarder tasks (aborted on drop). Does not start anything inside the namespaces: use
//! [`TunLink::command`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peercam_common::impair::{Draws, Impairment, Shaper};
use tokio_tun::Tun;
use tokio_util::task::AbortOnDropHandle;

use crate::lab::{fresh_prefix, ip_path, kill_ns_processes, run_checked};

/// The address of side A (its namespace is [`TunLink::ns_a`]).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
/// The address of side B.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 2);
/// Packets held in flight per direction at most; beyond that they are dropped, as a
/// router with a full buffer would.
const MAX_HELD: usize = 16 * 1024;
/// Largest packet read from a TUN device (its MTU is 1500; no offloads without a vnet
/// header).
const PACKET_BUF: usize = 64 * 1024;
/// Time limit for one `ip` command.
const CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// Two namespaces joined by an impaired TUN link. Dropping it stops the forwarders and
/// deletes the namespaces, even while unwinding from a panic.
#[derive(Debug)]
pub struct TunLink {
    namespaces: Vec<String>,
    forwarders: Vec<AbortOnDropHandle<()>>,
}

impl TunLink {
    /// Builds the link with `imp` on each direction. Needs root and `/dev/net/tun`, and
    /// must run inside a tokio runtime (the forwarders are spawned on it). Runs a few
    /// short, bounded `ip` commands synchronously.
    pub fn build(imp: Impairment) -> Result<TunLink, String> {
        let prefix = fresh_prefix();
        let mut link = TunLink {
            namespaces: Vec::new(),
            forwarders: Vec::new(),
        };
        let mut tuns = Vec::new();
        for (side, addr) in [("a", ADDR_A), ("b", ADDR_B)] {
            let ns = format!("{prefix}-t{side}");
            ip(&["netns", "add", &ns])?;
            link.namespaces.push(ns.clone());
            let dev = format!("{prefix}{side}");
            let tun = Tun::builder()
                .name(&dev)
                .build()
                .map_err(|e| {
                    format!("cannot create TUN device {dev} (needs root and /dev/net/tun): {e}")
                })?
                .pop()
                .ok_or_else(|| format!("no TUN queue for {dev}"))?;
            ip(&["link", "set", &dev, "netns", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &dev])?;
            ip(&["-n", &ns, "link", "set", &dev, "up"])?;
            tuns.push(Arc::new(tun));
        }
        let (a, b) = (tuns[0].clone(), tuns[1].clone());
        link.forwarders = vec![
            AbortOnDropHandle::new(tokio::spawn(forward(a.clone(), b.clone(), imp))),
            AbortOnDropHandle::new(tokio::spawn(forward(b, a, imp))),
        ];
        Ok(link)
    }

    /// The namespace of side A ([`ADDR_A`]).
    pub fn ns_a(&self) -> &str {
        &self.namespaces[0]
    }

    /// The namespace of side B ([`ADDR_B`]).
    pub fn ns_b(&self) -> &str {
        &self.namespaces[1]
    }

    /// `ip netns exec NS PROGRAM`: configure arguments and stdio, then run it bounded
    /// ([`crate::lab::run_bounded`], [`crate::lab::KillOnDrop`]).
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(ip_path());
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        for f in &self.forwarders {
            f.abort();
        }
        for ns in self.namespaces.iter().rev() {
            kill_ns_processes(ns);
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new(ip_path());
    cmd.args(args);
    run_checked(&mut cmd, None, CMD_TIMEOUT)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Packets of one direction waiting for their time: earliest first, then in arrival order.
#[derive(Default)]
struct Held {
    heap: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    seq: u64,
}

impl Held {
    fn push(&mut self, due: Instant, packet: Vec<u8>) {
        if self.heap.len() < MAX_HELD {
            self.seq += 1;
            self.heap.push(Reverse((due, self.seq, packet)));
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_due()? <= now {
            self.heap.pop().map(|Reverse((_, _, p))| p)
        } else {
            None
        }
    }
}

/// One direction of the link: packets read from `from` come out of `to` when the shaper
/// says so. Ends only when aborted or when `from` fails.
async fn forward(from: Arc<Tun>, to: Arc<Tun>, imp: Impairment) {
    let mut shaper = Shaper::new(imp);
    let mut held = Held::default();
    let mut buf = vec![0u8; PACKET_BUF];
    loop {
        let due = held.next_due();
        tokio::select! {
            got = from.recv(&mut buf) => {
                let Ok(n) = got else { return };
                if let Some(at) = shaper.admit(Instant::now(), n, Draws::random()) {
                    held.push(at, buf[..n].to_vec());
                }
            }
            _ = sleep_until(due) => {
                while let Some(p) = held.pop_due(Instant::now()) {
                    // A failed write loses the packet, as a full interface queue would.
                    let _ = to.send(&p).await;
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_packets_come_out_in_due_then_arrival_order() {
        let t = Instant::now();
        let mut h = Held::default();
        h.push(t + Duration::from_millis(20), vec![1]);
        h.push(t + Duration::from_millis(10), vec![2]);
        h.push(t + Duration::from_millis(10), vec![3]);
        assert_eq!(h.pop_due(t + Duration::from_millis(5)), None);
        assert_eq!(h.pop_due(t + Duration::from_millis(15)), Some(vec![2]));
        assert_eq!(h.pop_due(t + Duration::from_millis(15)), Some(vec![3]));
        assert_eq!(h.pop_due(t + Duration::from_millis(15)), None);
        assert_eq!(h.pop_due(t + Duration::from_millis(20)), Some(vec![1]));
    }
}
