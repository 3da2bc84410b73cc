//! The relay: forwards a viewer's and a camera's end-to-end encrypted QUIC packets when no
//! direct path works (symmetric NAT on one side and a filtering NAT on the other).
//!
//! Each relay session owns two UDP sockets: the viewer dials the first as if it were the
//! camera; the camera announces itself on the second with a token-bearing packet. Packets
//! are forwarded only between those two confirmed addresses, so the relay is no open
//! reflector. It forwards ciphertext and stores nothing; each session is capped in bytes,
//! duration and idle time. It never holds a key: the QUIC handshake runs end to end.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peercam_common::rdv::RELAY_HELLO;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, info_span, Instrument};

/// Limits of the relay.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// Most bytes forwarded per session (both directions).
    pub max_bytes: u64,
    /// Longest session.
    pub max_duration: Duration,
    /// A session with no packet for this long ends.
    pub idle: Duration,
    /// Most sessions at once.
    pub max_sessions: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_bytes: 2 * 1024 * 1024 * 1024,
            max_duration: Duration::from_secs(3600),
            idle: Duration::from_secs(20),
            max_sessions: 1000,
        }
    }
}

/// Addresses of one relay session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Where the viewer sends (it dials this as the camera).
    pub viewer_side: SocketAddr,
    /// Where the camera announces itself and sends.
    pub camera_side: SocketAddr,
    /// Proof the camera puts in its announcement.
    pub token: [u8; 16],
}

/// Counters for operators.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Sessions allocated so far.
    pub sessions: AtomicU64,
    /// Bytes forwarded so far.
    pub bytes: AtomicU64,
    active: AtomicUsize,
}

/// The relay of one rendezvous.
#[derive(Debug)]
pub struct Relay {
    limits: RelayLimits,
    tasks: Mutex<JoinSet<()>>,
    /// Counters.
    pub stats: Arc<RelayStats>,
}

/// Who may use a session: the peers' addresses as the rendezvous observed them.
#[derive(Debug, Clone, Copy)]
pub struct Peers {
    /// The viewer's public IP (its port may differ towards the relay: symmetric NAT).
    pub viewer_ip: IpAddr,
    /// The camera's public IP.
    pub camera_ip: IpAddr,
}

impl Relay {
    /// A relay with these limits.
    pub fn new(limits: RelayLimits) -> Self {
        Relay {
            limits,
            tasks: Mutex::new(JoinSet::new()),
            stats: Arc::default(),
        }
    }

    /// Allocates a session on `ip` for `peers`; `None` when at the session limit or the
    /// sockets cannot be bound.
    pub async fn allocate(&self, ip: IpAddr, peers: Peers) -> Option<Allocation> {
        if self.stats.active.load(Ordering::Relaxed) >= self.limits.max_sessions {
            return None;
        }
        let viewer_sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await.ok()?;
        let camera_sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await.ok()?;
        let alloc = Allocation {
            viewer_side: viewer_sock.local_addr().ok()?,
            camera_side: camera_sock.local_addr().ok()?,
            token: rand::random(),
        };
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            viewer_sock,
            camera_sock,
            peers,
            token: alloc.token,
            limits: self.limits.clone(),
            stats: self.stats.clone(),
        };
        let span =
            info_span!("relay", viewer_side = %alloc.viewer_side, camera_side = %alloc.camera_side);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(session.run().instrument(span));
        Some(alloc)
    }

    /// Sessions active now.
    pub fn active(&self) -> usize {
        self.stats.active.load(Ordering::Relaxed)
    }

    /// Stops every session.
    pub fn shutdown(&self) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
    }
}

struct Session {
    viewer_sock: UdpSocket,
    camera_sock: UdpSocket,
    peers: Peers,
    token: [u8; 16],
    limits: RelayLimits,
    stats: Arc<RelayStats>,
}

/// Largest UDP payload relayed (QUIC packets are far smaller).
const MAX_PACKET: usize = 2048;

impl Session {
    async fn run(self) {
        let started = Instant::now();
        let end = started + self.limits.max_duration;
        let mut viewer: Option<SocketAddr> = None;
        let mut camera: Option<SocketAddr> = None;
        let mut bytes: u64 = 0;
        let mut last = Instant::now();
        let (mut vbuf, mut cbuf) = ([0u8; MAX_PACKET], [0u8; MAX_PACKET]);
        let why = loop {
            let idle_at = last + self.limits.idle;
            tokio::select! {
                _ = tokio::time::sleep_until(end) => break "duration cap",
                _ = tokio::time::sleep_until(idle_at) => break "idle",
                r = self.viewer_sock.recv_from(&mut vbuf) => {
                    let Ok((n, from)) = r else { continue };
                    if viewer.is_none() && from.ip().to_canonical() == self.peers.viewer_ip {
                        viewer = Some(from);
                    }
                    if Some(from) != viewer {
                        continue;
                    }
                    last = Instant::now();
                    if let Some(cam) = camera {
                        bytes += n as u64;
                        let _ = self.camera_sock.send_to(&vbuf[..n], cam).await;
                    }
                }
                r = self.camera_sock.recv_from(&mut cbuf) => {
                    let Ok((n, from)) = r else { continue };
                    if is_hello(&cbuf[..n], &self.token) {
                        if from.ip().to_canonical() == self.peers.camera_ip && camera.is_none() {
                            debug!(%from, "camera announced");
                            camera = Some(from);
                        }
                        continue;
                    }
                    if Some(from) != camera {
                        continue;
                    }
                    last = Instant::now();
                    if let Some(v) = viewer {
                        bytes += n as u64;
                        let _ = self.viewer_sock.send_to(&cbuf[..n], v).await;
                    }
                }
            }
            if bytes > self.limits.max_bytes {
                break "byte cap";
            }
        };
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        info!(
            reason = why,
            bytes,
            secs = started.elapsed().as_secs(),
            "relay session ended"
        );
    }
}

fn is_hello(packet: &[u8], token: &[u8; 16]) -> bool {
    packet.len() == RELAY_HELLO.len() + 16
        && packet.starts_with(RELAY_HELLO)
        && &packet[RELAY_HELLO.len()..] == token
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn udp() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    async fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    fn hello(token: &[u8; 16]) -> Vec<u8> {
        [RELAY_HELLO, &token[..]].concat()
    }

    #[tokio::test]
    async fn forwards_only_between_confirmed_peers_and_caps_bytes() {
        let relay = Relay::new(RelayLimits {
            max_bytes: 100,
            ..RelayLimits::default()
        });
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let a = relay
            .allocate(
                local,
                Peers {
                    viewer_ip: local,
                    camera_ip: local,
                },
            )
            .await
            .unwrap();
        let (viewer, camera, stranger) = (udp().await, udp().await, udp().await);
        // A wrong token does not make anyone the camera.
        camera
            .send_to(&hello(&[0; 16]), a.camera_side)
            .await
            .unwrap();
        viewer.send_to(b"v1", a.viewer_side).await.unwrap();
        assert_eq!(recv(&camera).await, None);
        camera
            .send_to(&hello(&a.token), a.camera_side)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        viewer.send_to(b"v2", a.viewer_side).await.unwrap();
        assert_eq!(recv(&camera).await.as_deref(), Some(&b"v2"[..]));
        camera.send_to(b"c1", a.camera_side).await.unwrap();
        assert_eq!(recv(&viewer).await.as_deref(), Some(&b"c1"[..]));
        // Someone else on the camera side is ignored.
        stranger.send_to(b"x", a.camera_side).await.unwrap();
        assert_eq!(recv(&viewer).await, None);
        // Past the byte cap the session ends.
        for _ in 0..3 {
            viewer.send_to(&[7u8; 60], a.viewer_side).await.unwrap();
            let _ = recv(&camera).await;
        }
        viewer.send_to(b"late", a.viewer_side).await.unwrap();
        assert_eq!(recv(&camera).await, None);
        assert_eq!(relay.active(), 0);
    }
}
