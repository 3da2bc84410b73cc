//! QUIC defaults and the one-socket endpoint every camera and viewer owns.
//!
//! Owns transport parameters (keep-alive, idle timeout, flow-control windows, stream
//! limits) for the two kinds of connection, and the endpoint constructor that also keeps a
//! clone of the UDP socket for punch packets. Does not dial or accept.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::impair::{ImpairedSocket, Impairment};
use crate::tls::TlsError;

/// Keep-alive on rendezvous connections, sent by the camera (and viewer) only. Half the
/// shortest UDP mapping timeout NATs are known to use (30 s; RFC 4787 asks for at least
/// 2 minutes), so one lost ping (quinn resends it after a probe timeout) still refreshes
/// the mapping in time, and half the 30 s idle timeout. Not shorter: every idle camera's
/// ping costs the rendezvous CPU, 10 s instead of 15 s cost 1.5 times as much
/// (`BENCHMARKS.md`, keep-alive cost; `ARCHITECTURE.md`, rendezvous at scale).
pub const RENDEZVOUS_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Idle timeout on rendezvous connections.
pub const RENDEZVOUS_IDLE: Duration = Duration::from_secs(30);
/// Parity datagrams a media connection buffers before dropping the oldest.
pub const MEDIA_DATAGRAM_BUFFER: usize = 1024 * 1024;
/// Keep-alive on media connections.
pub const MEDIA_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Idle timeout on media connections: a viewer notices a dead camera within this.
pub const MEDIA_IDLE: Duration = Duration::from_secs(10);
/// Most GOP streams a camera may have open towards one viewer at once.
pub const MAX_GOP_STREAMS: u32 = 32;

fn idle(d: Duration) -> Option<IdleTimeout> {
    IdleTimeout::try_from(d).ok()
}

/// RTT assumed before the first measurement on a rendezvous connection (as Chromium's
/// QUIC does): a lost first packet is resent after ~300 ms instead of quinn's ~1 s.
pub const RENDEZVOUS_INITIAL_RTT: Duration = Duration::from_millis(100);

/// Transport for rendezvous connections (both ends): small windows, one control stream, so
/// that a rendezvous can hold very many idle registrations.
pub fn rendezvous_transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.initial_rtt(RENDEZVOUS_INITIAL_RTT)
        .keep_alive_interval(Some(RENDEZVOUS_KEEP_ALIVE))
        .max_idle_timeout(idle(RENDEZVOUS_IDLE))
        .max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(128 * 1024))
        .receive_window(VarInt::from_u32(256 * 1024))
        .send_window(256 * 1024)
        .datagram_receive_buffer_size(None)
        // Control messages are small: no MTU probes (packets every few minutes per
        // connection) and one datagram per transmit, so quinn's per-connection send
        // buffer stays one packet long instead of a GSO batch (`BENCHMARKS.md`).
        .mtu_discovery_config(None)
        .enable_segmentation_offload(false);
    t
}

/// Transport for the rendezvous' side of rendezvous connections: as
/// [`rendezvous_transport`], but the rendezvous sends no keep-alives of its own. The
/// client's keep-alive every 15 s already holds its NAT mapping open and keeps the
/// connection from idling out on both ends; the server's own pings doubled the packets
/// per idle connection (`BENCHMARKS.md`, keep-alive cost).
pub fn rendezvous_server_transport() -> TransportConfig {
    let mut t = rendezvous_transport();
    t.keep_alive_interval(None);
    t
}

/// Congestion window of a new media connection: the camera's cached GOP (a keyframe and
/// up to a GOP of frames, ~0.5 MB at 4 Mbit/s with a 1 s GOP) goes out in the first round
/// trip, so a viewer starts one RTT after asking and its first live frames do not queue
/// behind rounds of slow start. 256 KB left the first ~7 live frames 90-220 ms late on a
/// clean 50 ms link (p99 88 ms against 29 ms with 1 MB); on a link of half the stream's
/// bitrate the larger burst changed nothing measurable (BENCHMARKS.md, "Live video").
pub const MEDIA_INITIAL_WINDOW: u64 = 1024 * 1024;

/// Transport for media connections. `initial_rtt` comes from the RTT measured through the
/// rendezvous, so a lost first packet is resent after tens of milliseconds, not a second.
pub fn media_transport(initial_rtt: Option<Duration>) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(MEDIA_KEEP_ALIVE))
        .max_idle_timeout(idle(MEDIA_IDLE))
        .max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_GOP_STREAMS))
        .stream_receive_window(VarInt::from_u32(8 * 1024 * 1024))
        .send_window(16 * 1024 * 1024)
        // Parity datagrams (`fec`) beside the GOP streams; the viewer reads them at once.
        .datagram_receive_buffer_size(Some(MEDIA_DATAGRAM_BUFFER));
    // BBR, not loss-based Cubic: random loss is not congestion, and Cubic's answer to 1-5 %
    // loss (a window too small for the stream) is what makes video fall behind. Measured in
    // BENCHMARKS.md ("Live video"); quinn marks its BBR experimental, see ARCHITECTURE.md.
    let mut cc = quinn::congestion::BbrConfig::default();
    cc.initial_window(MEDIA_INITIAL_WINDOW);
    t.congestion_controller_factory(Arc::new(cc));
    if let Some(rtt) = initial_rtt {
        t.initial_rtt(rtt.clamp(Duration::from_millis(1), Duration::from_millis(333)));
    }
    t
}

/// Wraps a rustls client config for quinn with a transport.
pub fn quic_client(
    tls: rustls::ClientConfig,
    transport: TransportConfig,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::BadCa(format!("TLS config unusable for QUIC: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Wraps a rustls server config for quinn with a transport.
pub fn quic_server(
    tls: rustls::ServerConfig,
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::BadCa(format!("TLS config unusable for QUIC: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    // Validate addresses of new clients before spending work on them only when loaded;
    // the 3x anti-amplification limit of QUIC applies regardless.
    config.migration(true);
    Ok(config)
}

/// A quinn endpoint on one UDP socket, and a clone of that socket for punch packets.
#[derive(Debug)]
pub struct SharedEndpoint {
    /// The QUIC endpoint: rendezvous and peer traffic alike.
    pub endpoint: quinn::Endpoint,
    /// The same UDP socket, for sending tiny punch packets that quinn cannot send.
    pub punch: Arc<UdpSocket>,
}

/// UDP socket buffers a rendezvous asks for. A burst of registrations arrives faster than
/// one endpoint task drains it; with Linux's default 208 KiB (~90 full-size datagrams on
/// loopback) the overflow was dropped and each drop cost a 300 ms handshake retransmit
/// (see `BENCHMARKS.md`). The kernel caps the request at `net.core.rmem_max`/`wmem_max`.
pub const RENDEZVOUS_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds a UDP socket and asks for `buffer` bytes of receive and send buffer (best effort:
/// the kernel caps it; the size obtained is logged at debug level).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    let _ = state.set_recv_buffer_size((&socket).into(), buffer);
    let _ = state.set_send_buffer_size((&socket).into(), buffer);
    tracing::debug!(
        %addr,
        recv = ?state.recv_buffer_size((&socket).into()),
        send = ?state.send_buffer_size((&socket).into()),
        "UDP socket buffers"
    );
    Ok(socket)
}

/// A quinn endpoint on a socket from [`bind_udp`]; with a server config it accepts too.
/// Must run inside a tokio runtime.
pub fn endpoint_with_buffers(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    buffer: usize,
) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_udp(addr, buffer)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// Binds one UDP socket and builds an endpoint on it. Must run inside a tokio runtime.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<SharedEndpoint> {
    bind_endpoint_with(addr, server, None)
}

/// [`bind_endpoint`], with the endpoint's traffic (not the punches) passed through a
/// user-space [`Impairment`] when one is given: for tests and benchmarks.
pub fn bind_endpoint_with(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    impairment: Option<Impairment>,
) -> std::io::Result<SharedEndpoint> {
    let socket = UdpSocket::bind(addr)?;
    let punch = Arc::new(socket.try_clone()?);
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    let config = quinn::EndpointConfig::default();
    let endpoint = match impairment {
        None => quinn::Endpoint::new(config, server, socket, runtime)?,
        Some(imp) => {
            let socket = ImpairedSocket::new(socket, imp)?;
            quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)?
        }
    };
    Ok(SharedEndpoint { endpoint, punch })
}

/// Largest punch packet: quinn answers unknown packets longer than about 21 bytes with a
/// stateless reset, so punches stay at or below this and draw no reply.
pub const PUNCH_LEN: usize = 12;
/// Payload of a punch packet.
pub const PUNCH: &[u8; PUNCH_LEN] = b"peercam-hole";
