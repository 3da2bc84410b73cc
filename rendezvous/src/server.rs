//! The rendezvous server: accepts mutual-TLS QUIC connections, runs one session per
//! camera or viewer, and brokers introductions between them.
//!
//! Owns tasks, sockets and timeouts; every decision about who may register or look up what
//! is delegated to [`Registry`]. Shutdown: cancel, stop accepting, tell every camera
//! `GoingAway` (how long to spread its reconnect over, sized to this fleet), close every
//! connection with [`close::SHUTDOWN`] so peers reconnect, wait for the close to go out,
//! abort the rest.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use peercam_certs::Role;
use peercam_common::frame::{self, FrameError};
use peercam_common::going_away::{self, Spread};
use peercam_common::net::canonical;
use peercam_common::rdv::{
    close, FromRendezvous, Refusal, RelayOffer, ToRendezvous, ALPN, GOING_AWAY_SINCE,
    MAX_ACCESS_LIST, MAX_LOCAL_ADDRS,
};
use peercam_common::tls::{self, peer_identity, Credentials, PeerIdentity, Trust};
use peercam_common::{quic, CameraId, SessionId, ViewerId};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::admin::{self, Metrics};
use crate::cluster::{self, Cluster};
use crate::registry::{ConnId, Online, RegisterError, Registry, RegistryLimits};
use crate::relay::{Allocation, Peers, Relay, RelayLimits};

mod cluster_hooks;
use cluster_hooks::{cluster_claim, cluster_inbound, remote_introduce};
/// Default of [`Limits::retry_threshold`]. At 3,000 registrations/s over WAN round trips
/// of 100–300 ms, several hundred honest handshakes are in flight at once; with the former
/// 64, a registration burst was pushed through Retry, and the tail of such a burst
/// stalled (cause not found; the Retry packets do go out): 1,161 instead of 3,240
/// registrations/s for 10,000 cameras (`BENCHMARKS.md`). 1,024 handshakes is under half
/// a second of this server's CPU, which bounds what spoofed Initials can make it spend
/// before Retry.
pub const DEFAULT_RETRY_THRESHOLD: usize = 1024;

/// Limits and timeouts of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Registry rules (pins, rate limits).
    pub registry: RegistryLimits,
    /// How long a viewer waits for the camera to answer an introduction.
    pub intro_timeout: Duration,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// How long a peer has to complete the handshake and send its first message.
    pub first_message_timeout: Duration,
    /// How long a control frame may take to arrive once it has started.
    pub frame_timeout: Duration,
    /// How long shutdown waits in all: for cameras to acknowledge `GoingAway` (at most
    /// half of it), then for close frames to reach peers.
    pub drain: Duration,
    /// How the reconnect window announced on shutdown is sized (fleet / rate, bounded).
    pub reconnect_spread: Spread,
    /// Unvalidated handshakes in progress above which new clients must first prove their
    /// address with a QUIC Retry (0: always). Below it, quinn's anti-amplification limit
    /// applies (three times what the address sent, plus at most one datagram).
    pub retry_threshold: usize,
    /// Second UDP address on which the rendezvous also answers, so that clients can tell
    /// whether their NAT's mapping depends on the destination (netcheck). `None`: none.
    pub probe_listen: Option<SocketAddr>,
    /// TCP address of the admin listener (`/metrics`, `/livez`, `/readyz`); `None`: off.
    pub admin_listen: Option<SocketAddr>,
    /// Relay limits; `None` disables the relay.
    pub relay: Option<RelayLimits>,
    /// Address the relay advertises, when the listen address is not the public one (a
    /// cloud VM behind 1:1 NAT). Default: the address a viewer's packets arrived on.
    pub relay_public_ip: Option<IpAddr>,
    /// Cluster mode (presence and introductions shared through Redis); `None`: a single
    /// node with its registry in memory, the default.
    pub cluster: Option<cluster::ClusterConfig>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            registry: RegistryLimits::default(),
            intro_timeout: Duration::from_secs(5),
            max_connections: 250_000,
            first_message_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(2),
            reconnect_spread: Spread::default(),
            retry_threshold: DEFAULT_RETRY_THRESHOLD,
            probe_listen: None,
            admin_listen: None,
            relay: Some(RelayLimits::default()),
            relay_public_ip: None,
            cluster: None,
        }
    }
}

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// The rendezvous' certificate and key.
    pub credentials: Credentials,
    /// The deployment CA and deny list.
    pub trust: Trust,
    /// Limits and timeouts.
    pub limits: Limits,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The cluster settings are not usable.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// A running rendezvous server.
#[derive(Debug)]
pub struct Handle {
    local_addr: SocketAddr,
    probe_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Handle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The second (netcheck) address, if any.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe_addr
    }

    /// Asks the server to shut down (returns at once; see [`Handle::join`]).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until the server has shut down.
    pub async fn join(self) {
        let _ = self.task.await;
    }

    /// Number of cameras online now.
    pub fn cameras_online(&self) -> usize {
        self.shared.registry().online_count()
    }

    /// Relay sessions active now.
    pub fn relay_sessions(&self) -> usize {
        self.shared.relay.as_ref().map_or(0, Relay::active)
    }
}

struct CameraLink {
    /// Boxed: a bounded tokio channel allocates a block of 32 slots up front, which for
    /// `FromRendezvous` itself was ~4.7 KB per registered camera (`BENCHMARKS.md`).
    tx: mpsc::Sender<Box<FromRendezvous>>,
    conn: quinn::Connection,
}

enum Answer {
    Accepted(Vec<SocketAddr>),
    Declined,
}

struct Pending {
    camera_conn: ConnId,
    reply: oneshot::Sender<Answer>,
}

struct Shared {
    listen: SocketAddr,
    probe_port: Option<u16>,
    relay: Option<Relay>,
    registry: Mutex<Registry>,
    cameras: Mutex<HashMap<ConnId, CameraLink>>,
    pending: Mutex<HashMap<SessionId, Pending>>,
    next_conn: AtomicU64,
    handshaking: AtomicUsize,
    metrics: Metrics,
    limits: Limits,
    cluster: Option<Arc<Cluster>>,
    /// The reconnect window announced on shutdown, sized once, by the first camera session
    /// to say goodbye (before any has unregistered).
    going_away: OnceLock<Duration>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps half-updated in a way
    // that matters more than stopping the whole server would; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    /// The window every camera is told to spread its reconnect over on shutdown.
    fn going_away_window(&self) -> Duration {
        *self.going_away.get_or_init(|| {
            let cameras = lock(&self.cameras).len();
            let window = self.limits.reconnect_spread.window(cameras);
            info!(
                cameras,
                window_ms = going_away::window_ms(window),
                "asking cameras to spread their reconnects"
            );
            window
        })
    }

    fn gauges(&self) -> admin::Gauges {
        let relay = self.relay.as_ref();
        admin::Gauges {
            cameras: self.registry().online_count(),
            relay_active: relay.map_or(0, Relay::active),
            relay_sessions: relay.map_or(0, |r| r.stats.sessions.load(Ordering::Relaxed)),
            relay_bytes: relay.map_or(0, |r| r.stats.bytes.load(Ordering::Relaxed)),
        }
    }
}

/// Starts a rendezvous server.
pub async fn start(config: Config) -> Result<Handle, StartError> {
    let server = rendezvous_server_config(&config)?;
    let endpoint =
        quic::endpoint_with_buffers(config.listen, Some(server), quic::RENDEZVOUS_SOCKET_BUFFER)
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
    let local_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let probe = match config.limits.probe_listen {
        Some(addr) => {
            let server = rendezvous_server_config(&config)?;
            let ep =
                quic::endpoint_with_buffers(addr, Some(server), quic::RENDEZVOUS_SOCKET_BUFFER)
                    .map_err(|source| StartError::Bind { addr, source })?;
            Some(ep)
        }
        None => None,
    };
    let probe_addr = probe.as_ref().and_then(|ep| ep.local_addr().ok());
    let (pin, remember) = (config.limits.registry.pin, config.limits.registry.remember);
    let cluster = match config.limits.cluster.clone() {
        Some(c) => Some(Cluster::new(c, pin, remember)?),
        None => None,
    };
    let shared = Arc::new(Shared {
        listen: local_addr,
        probe_port: probe_addr.map(|a| a.port()),
        relay: config.limits.relay.clone().map(Relay::new),
        registry: Mutex::new(Registry::new(config.limits.registry.clone())),
        cameras: Mutex::default(),
        pending: Mutex::default(),
        next_conn: AtomicU64::new(1),
        handshaking: AtomicUsize::new(0),
        metrics: Metrics::default(),
        limits: config.limits,
        cluster: cluster.as_ref().map(|(c, ..)| c.clone()),
        going_away: OnceLock::new(),
    });
    let cancel = CancellationToken::new();
    let admin = match shared.limits.admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let admin_loop = admin.map(|listener| {
        let (for_scrape, for_ready) = (shared.clone(), cancel.clone());
        admin::serve(
            listener,
            move || {
                let mut text = admin::render(&for_scrape.metrics, for_scrape.gauges());
                if let Some(c) = &for_scrape.cluster {
                    text.push_str(&c.render_metrics());
                }
                text
            },
            move || !for_ready.is_cancelled(),
            cancel.clone(),
        )
    });
    let main_loop = accept_loop(endpoint, shared.clone(), cancel.clone());
    let probe_loop = probe.map(|ep| accept_loop(ep, shared.clone(), cancel.clone()));
    let cluster_loop = cluster.map(|(_, driver, inbound)| {
        let inbound = cluster_inbound(shared.clone(), inbound, cancel.clone());
        let driver = driver.run(cancel.clone());
        async { tokio::join!(driver, inbound) }
    });
    let task = tokio::spawn(
        async move {
            let probe = async {
                if let Some(p) = probe_loop {
                    p.await
                }
            };
            let admin = async {
                if let Some(a) = admin_loop {
                    a.await
                }
            };
            let cluster = async {
                if let Some(c) = cluster_loop {
                    c.await;
                }
            };
            tokio::join!(main_loop, probe, admin, cluster);
        }
        .instrument(info_span!("rendezvous", listen = %local_addr)),
    );
    info!(%local_addr, probe = ?probe_addr, "rendezvous listening");
    Ok(Handle {
        local_addr,
        probe_addr,
        admin_addr,
        cancel,
        task,
        shared,
    })
}

/// The QUIC server config of the rendezvous: mutual TLS for cameras and viewers with the
/// cheapest suite to handshake (`tls::handshake_server_config`), the idle-connection
/// transport, and no TLS session tickets: rustls' default session cache
/// holds 256 sessions and dies with the process, so tickets sent to 100,000 cameras would
/// almost never be redeemed, yet each costs an encryption and bytes per registration.
fn rendezvous_server_config(config: &Config) -> Result<quinn::ServerConfig, StartError> {
    let mut tls = tls::handshake_server_config(
        &config.credentials,
        &config.trust,
        &[Role::Camera, Role::Viewer],
        ALPN,
    )?;
    tls.send_tls13_tickets = 0;
    Ok(quic::quic_server(tls, quic::rendezvous_server_transport())?)
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if tasks.len() >= shared.limits.max_connections {
                    warn!(remote = %incoming.remote_address(), "connection limit reached, refusing");
                    incoming.refuse();
                    continue;
                }
                let remote = incoming.remote_address();
                let busy = shared.handshaking.load(Ordering::Relaxed) >= shared.limits.retry_threshold;
                if busy && !incoming.remote_address_validated() && incoming.may_retry() {
                    debug!(%remote, "asking for address validation (Retry)");
                    let _ = incoming.retry();
                    continue;
                }
                // Boxed: an `Incoming` is 384 bytes, and as an argument of the task's
                // future it would stay in every camera's task for the connection's life.
                tasks.spawn(
                    handle_incoming(Box::new(incoming), shared.clone(), cancel.clone())
                        .instrument(info_span!("conn", %remote)),
                );
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    info!("shutting down: telling cameras, then closing connections");
    // Stop accepting silently rather than refusing: a camera that reconnects at once (its
    // session was just closed with SHUTDOWN) resends its Initial after a probe timeout,
    // and on a restart that lands on the next process bound to this port instead of
    // failing against this one while it drains (`BENCHMARKS.md`, restart).
    endpoint.set_server_config(None);
    // Camera sessions send GoingAway and close once it is acknowledged; every other task
    // ends at once on cancel. Closing the endpoint first would discard the unsent message.
    // Both waits share `drain`, so the port is not held longer than before GoingAway: a
    // lingering process is time in which early reconnects pile up (`BENCHMARKS.md`).
    let deadline = tokio::time::Instant::now() + shared.limits.drain;
    let sessions = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout_at(deadline - shared.limits.drain / 2, sessions).await;
    endpoint.close(
        VarInt::from_u32(close::SHUTDOWN),
        b"rendezvous shutting down",
    );
    let _ = tokio::time::timeout_at(deadline, endpoint.wait_idle()).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(relay) = &shared.relay {
        relay.shutdown();
    }
    info!("rendezvous stopped");
}

fn close_conn(conn: &quinn::Connection, code: u32, reason: &str) {
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn handle_incoming(
    incoming: Box<quinn::Incoming>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    // The handshake's futures are boxed so that they do not enlarge the task, which
    // lives as long as the camera stays registered (`BENCHMARKS.md`, memory per camera).
    let Some((conn, peer, send, recv)) = Box::pin(handshake(incoming, &shared, &cancel)).await
    else {
        return;
    };
    let id = peer.identity.id.clone();
    match peer.identity.role {
        Role::Camera => {
            camera_session(conn, peer, send, recv, shared, cancel)
                .instrument(info_span!("camera", camera = %id))
                .await
        }
        Role::Viewer => {
            // Boxed: a task is as large as its largest state, and the viewer's (waiting on
            // an introduction and a relay allocation) would otherwise enlarge every idle
            // camera's task.
            Box::pin(viewer_session(conn, peer, send, recv, shared, cancel))
                .instrument(info_span!("viewer", viewer = %id))
                .await
        }
        Role::Rendezvous => close_conn(&conn, close::WRONG_ROLE, "rendezvous may not connect"),
    }
}

/// Completes the handshake of a new connection and accepts its control stream; `None`
/// (the connection closed with a reason where there is one) if that fails.
async fn handshake(
    incoming: Box<quinn::Incoming>,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Option<(quinn::Connection, PeerIdentity, SendStream, RecvStream)> {
    let limit = shared.limits.first_message_timeout;
    shared.handshaking.fetch_add(1, Ordering::Relaxed);
    let handshake = cancel
        .run_until_cancelled(tokio::time::timeout(limit, (*incoming).into_future()))
        .await;
    shared.handshaking.fetch_sub(1, Ordering::Relaxed);
    // `None`: shutting down, the endpoint's close ends it.
    let conn = match handshake? {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            Metrics::inc(&shared.metrics.handshake_failures);
            warn!(error = %e, "handshake failed");
            return None;
        }
        Err(_) => {
            Metrics::inc(&shared.metrics.handshake_failures);
            warn!("handshake timed out");
            return None;
        }
    };
    let Some(peer) = peer_identity(&conn) else {
        close_conn(&conn, close::WRONG_ROLE, "no peercam identity");
        return None;
    };
    let streams = cancel
        .run_until_cancelled(tokio::time::timeout(limit, conn.accept_bi()))
        .await;
    let Some(Ok(Ok((send, recv)))) = streams else {
        debug!("no control stream opened");
        close_conn(&conn, close::PROTOCOL, "expected a control stream");
        return None;
    };
    Some((conn, peer, send, recv))
}

/// Messages queued towards one camera (introductions) before it counts as not keeping up.
const CAMERA_QUEUE: usize = 32;

/// Sessions a viewer connection may hold unreported; older ones are forgotten (a viewer
/// that never reports only loses its own metrics).
const MAX_UNREPORTED: usize = 16;

fn check_addrs(addrs: &[SocketAddr]) -> Result<(), String> {
    if addrs.len() > MAX_LOCAL_ADDRS {
        return Err(format!("more than {MAX_LOCAL_ADDRS} local addresses"));
    }
    Ok(())
}

async fn camera_session(
    conn: quinn::Connection,
    peer: PeerIdentity,
    mut send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    // Boxed: the registration's futures (the first read, a cluster claim over Redis) are
    // larger than the idle loop below, and the task stays as large as its largest state
    // for as long as the camera is registered (`BENCHMARKS.md`, memory per camera).
    let registration = register_camera(&conn, &peer, &mut send, &mut recv, &shared, &cancel);
    let Some(Registration {
        camera,
        conn_id,
        observed,
        version,
    }) = Box::pin(registration).await
    else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Box<FromRendezvous>>(CAMERA_QUEUE);
    lock(&shared.cameras).insert(
        conn_id,
        CameraLink {
            tx: tx.clone(),
            conn: conn.clone(),
        },
    );
    Metrics::inc(&shared.metrics.registrations_ok);
    info!(%observed, "camera registered");
    let _ = tx.try_send(Box::new(FromRendezvous::Registered { observed }));
    // The writer owns the send half; introductions queue behind the bounded channel. On
    // shutdown it sends GoingAway last and waits for the camera to acknowledge it.
    let says_goodbye = version >= GOING_AWAY_SINCE;
    let mut writer = AbortOnDropHandle::new(tokio::spawn(write_to_camera(
        send,
        rx,
        says_goodbye.then(|| shared.clone()),
        cancel.clone(),
    )));
    drop(tx);
    let reason = loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => {
                if says_goodbye {
                    let _ = tokio::time::timeout(shared.limits.drain / 2, &mut writer).await;
                }
                // Close with our code before the stream ends, so the camera learns why.
                close_conn(&conn, close::SHUTDOWN, "rendezvous shutting down");
                break "shutdown";
            }
            msg = frame::read_within::<ToRendezvous, _>(&mut recv, Some(shared.limits.frame_timeout)) => msg,
        };
        match msg {
            Ok(Some(msg)) => {
                if let Err(why) = camera_message(&shared, &camera, conn_id, msg) {
                    close_conn(&conn, close::PROTOCOL, why);
                    break why;
                }
            }
            Ok(None) => break "stream closed",
            Err(FrameError::Io(_)) => break "connection lost",
            Err(e) => {
                warn!(error = %e, "malformed message from camera");
                close_conn(&conn, close::PROTOCOL, "malformed message");
                break "malformed message";
            }
        }
    };
    lock(&shared.cameras).remove(&conn_id);
    shared
        .registry()
        .unregister(Instant::now(), &camera, conn_id);
    if let Some(c) = &shared.cluster {
        c.release(&camera, conn_id);
    }
    info!(reason, "camera unregistered");
}

/// What a camera session keeps of its registration.
struct Registration {
    camera: CameraId,
    conn_id: ConnId,
    /// The address its packets come from, as the camera is told in `Registered`.
    observed: SocketAddr,
    /// `Capabilities.version` the camera announced.
    version: u32,
}

/// Reads a camera's first message and registers it (answering a netcheck instead, if
/// that is what it asked for). `None` if the camera is not registered; the connection is
/// then closed with the reason.
async fn register_camera(
    conn: &quinn::Connection,
    peer: &PeerIdentity,
    send: &mut SendStream,
    recv: &mut RecvStream,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
) -> Option<Registration> {
    let Ok(camera) = CameraId::new(&peer.identity.id) else {
        return refuse(conn, close::WRONG_ROLE, "bad camera id");
    };
    let first = tokio::time::timeout(shared.limits.first_message_timeout, frame::read(recv));
    let Some(first) = cancel.run_until_cancelled(first).await else {
        return refuse(conn, close::SHUTDOWN, "rendezvous shutting down");
    };
    let (local_addrs, access, version) = match first {
        Ok(Ok(Some(ToRendezvous::Register {
            local_addrs,
            access,
            caps,
        }))) if access.len() <= MAX_ACCESS_LIST && check_addrs(&local_addrs).is_ok() => {
            (local_addrs, access, caps.version)
        }
        Ok(Ok(Some(ToRendezvous::WhoAmI))) => {
            let netcheck = who_am_i(conn, send, recv, shared);
            if cancel.run_until_cancelled(netcheck).await.is_none() {
                close_conn(conn, close::SHUTDOWN, "rendezvous shutting down");
            }
            return None;
        }
        _ => return refuse(conn, close::PROTOCOL, "expected Register"),
    };
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let observed = canonical(conn.remote_address());
    let online = Online {
        conn: conn_id,
        observed,
        local: local_addrs,
    };
    let registered = match &shared.cluster {
        Some(c) => cluster_claim(c, &camera, peer.key, &online, &access).await,
        None => Ok(()),
    }
    .and_then(|()| {
        shared.registry().register(
            Instant::now(),
            &camera,
            peer.key,
            access.into_iter().collect(),
            online,
        )
    });
    if let (Err(_), Some(c)) = (&registered, &shared.cluster) {
        c.release(&camera, conn_id);
    }
    match registered {
        Ok(Some(old)) => {
            if let Some(link) = lock(&shared.cameras).remove(&old) {
                close_conn(
                    &link.conn,
                    close::REPLACED,
                    "replaced by a newer connection",
                );
            }
        }
        Ok(None) => {}
        Err(RegisterError::IdTaken) => {
            Metrics::inc(&shared.metrics.registrations_id_taken);
            warn!(key = %peer.key, "refused: camera ID is held by another key");
            let _ = frame::write(
                send,
                &FromRendezvous::Error {
                    message: format!("camera ID {camera} is registered with another key"),
                },
            )
            .await;
            let _ = send.finish();
            return refuse(conn, close::ID_TAKEN, "camera ID held by another key");
        }
        Err(RegisterError::Full) => return refuse(conn, close::BUSY, "registry full"),
    }
    Some(Registration {
        camera,
        conn_id,
        observed,
        version,
    })
}

/// Closes a connection whose camera was not registered.
fn refuse(conn: &quinn::Connection, code: u32, reason: &str) -> Option<Registration> {
    close_conn(conn, code, reason);
    None
}

/// Writes queued messages to a camera until the stream fails. For a camera that
/// understands it (`going_away` is `Some`), on shutdown: sends `GoingAway` and waits until
/// the camera has it (acknowledged, or the camera hung up). For an older one, keeps the
/// stream open until the session closes the connection: ending it first would show the
/// camera a finished stream instead of the `SHUTDOWN` close.
async fn write_to_camera(
    mut send: SendStream,
    mut rx: mpsc::Receiver<Box<FromRendezvous>>,
    going_away: Option<Arc<Shared>>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled(), if going_away.is_some() => break,
            msg = rx.recv() => msg,
        };
        let Some(msg) = msg else { return };
        if frame::write(&mut send, &*msg).await.is_err() {
            return;
        }
    }
    let Some(shared) = going_away else { return };
    let window = shared.going_away_window();
    let going = FromRendezvous::GoingAway {
        reconnect_within_ms: going_away::window_ms(window),
    };
    if frame::write(&mut send, &going).await.is_ok() && send.finish().is_ok() {
        let _ = send.stopped().await;
    }
    debug!("camera told to reconnect within {window:?}");
}

fn camera_message(
    shared: &Shared,
    camera: &CameraId,
    conn_id: ConnId,
    msg: ToRendezvous,
) -> Result<(), &'static str> {
    match msg {
        ToRendezvous::Accept {
            session,
            local_addrs,
        } => {
            check_addrs(&local_addrs).map_err(|_| "too many addresses")?;
            answer(shared, conn_id, session, Answer::Accepted(local_addrs));
        }
        ToRendezvous::Decline { session } => answer(shared, conn_id, session, Answer::Declined),
        ToRendezvous::SetAccess { access } => {
            if access.len() > MAX_ACCESS_LIST {
                return Err("access list too long");
            }
            if let Some(c) = &shared.cluster {
                c.set_access(camera, conn_id, access.clone());
            }
            shared
                .registry()
                .set_access(camera, conn_id, access.into_iter().collect());
        }
        ToRendezvous::Register { .. }
        | ToRendezvous::Connect { .. }
        | ToRendezvous::WhoAmI
        | ToRendezvous::Report { .. } => return Err("unexpected message for a registered camera"),
    }
    Ok(())
}

fn answer(shared: &Shared, conn_id: ConnId, session: SessionId, answer: Answer) {
    let mut pending = lock(&shared.pending);
    // Only the camera that was asked may answer.
    if pending
        .get(&session)
        .is_some_and(|p| p.camera_conn == conn_id)
    {
        if let Some(p) = pending.remove(&session) {
            let _ = p.reply.send(answer);
        }
    }
}

async fn viewer_session(
    conn: quinn::Connection,
    peer: PeerIdentity,
    mut send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let Ok(viewer) = ViewerId::new(&peer.identity.id) else {
        return close_conn(&conn, close::WRONG_ROLE, "bad viewer id");
    };
    // Sessions brokered on this connection and not yet reported: a report counts only
    // for one of these, once, so nobody can inflate the path metrics.
    let mut unreported: Vec<SessionId> = Vec::new();
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => {
                return close_conn(&conn, close::SHUTDOWN, "rendezvous shutting down");
            }
            msg = frame::read_within::<ToRendezvous, _>(&mut recv, Some(shared.limits.frame_timeout)) => msg,
        };
        let reply = match msg {
            Ok(Some(ToRendezvous::Connect {
                camera,
                local_addrs,
            })) if check_addrs(&local_addrs).is_ok() => {
                let reply = introduce(&shared, &conn, &viewer, camera, local_addrs).await;
                if let FromRendezvous::PeerReady { session, .. } = &reply {
                    if unreported.len() >= MAX_UNREPORTED {
                        unreported.remove(0);
                    }
                    unreported.push(*session);
                }
                reply
            }
            Ok(Some(ToRendezvous::Report { session, path })) => {
                match unreported.iter().position(|s| *s == session) {
                    Some(i) => {
                        unreported.swap_remove(i);
                        Metrics::inc(shared.metrics.path(path));
                        debug!(%session, path = path.as_str(), "path reported");
                    }
                    None => debug!(%session, "report for a session not brokered here: ignored"),
                }
                continue;
            }
            Ok(Some(ToRendezvous::WhoAmI)) => you_are(&conn, &shared),
            Ok(None) | Err(FrameError::Io(_)) => return,
            Ok(Some(_)) | Err(_) => {
                warn!("malformed or unexpected message from viewer");
                return close_conn(&conn, close::PROTOCOL, "expected Connect");
            }
        };
        if frame::write(&mut send, &reply).await.is_err() {
            return;
        }
    }
}

async fn introduce(
    shared: &Shared,
    viewer_conn: &quinn::Connection,
    viewer: &ViewerId,
    camera: CameraId,
    viewer_local: Vec<SocketAddr>,
) -> FromRendezvous {
    let looked_up = shared.registry().lookup(Instant::now(), viewer, &camera);
    let online = match looked_up {
        Ok(online) => online,
        Err(reason) => {
            let remote = shared
                .cluster
                .as_ref()
                .filter(|_| !matches!(reason, Refusal::RateLimited { .. }));
            if let Some(c) = remote {
                let remote =
                    remote_introduce(shared, c, viewer_conn, viewer, &camera, &viewer_local);
                if let Some(reply) = remote.await {
                    return reply;
                }
            }
            debug!(%camera, ?reason, "connect refused");
            let m = &shared.metrics;
            Metrics::inc(match reason {
                Refusal::Offline { .. } => &m.connects_offline,
                Refusal::RateLimited { .. } => &m.connects_rate_limited,
                Refusal::Timeout => &m.connects_timeout,
                Refusal::Unavailable | Refusal::Declined | Refusal::BadRequest => {
                    &m.connects_unavailable
                }
            });
            return FromRendezvous::Refused { reason };
        }
    };
    let link = lock(&shared.cameras)
        .get(&online.conn)
        .map(|l| (l.tx.clone(), l.conn.clone()));
    let Some((tx, camera_conn)) = link else {
        return FromRendezvous::Refused {
            reason: Refusal::Offline { last_seen_secs: 0 },
        };
    };
    let relay = allocate_relay(shared, viewer_conn, camera_conn.remote_address().ip()).await;
    let session = SessionId::random();
    let intro = FromRendezvous::Introduce {
        session,
        viewer: viewer.clone(),
        viewer_observed: canonical(viewer_conn.remote_address()),
        viewer_local,
        viewer_rtt_us: viewer_conn.rtt().as_micros() as u64,
        relay: relay.map(|a| RelayOffer {
            addr: a.camera_side,
            token: a.token,
        }),
    };
    match ask_camera(shared, online.conn, &tx, session, intro).await {
        Some(Answer::Accepted(camera_local)) => {
            Metrics::inc(&shared.metrics.connects_ok);
            info!(%camera, %session, "introduced");
            FromRendezvous::PeerReady {
                session,
                camera_observed: canonical(camera_conn.remote_address()),
                camera_local,
                camera_rtt_us: camera_conn.rtt().as_micros() as u64,
                relay: relay.map(|a| a.viewer_side),
            }
        }
        // The rendezvous already checked the access list; a camera that still declines
        // gets the same answer as a forbidden one, so declines reveal nothing either.
        Some(Answer::Declined) => {
            Metrics::inc(&shared.metrics.connects_unavailable);
            FromRendezvous::Refused {
                reason: Refusal::Unavailable,
            }
        }
        None => {
            Metrics::inc(&shared.metrics.connects_timeout);
            info!(%camera, %session, "camera did not answer the introduction");
            FromRendezvous::Refused {
                reason: Refusal::Timeout,
            }
        }
    }
}

/// Sends an introduction to a camera connected here and waits for its answer (`None`:
/// no answer in time, or its queue is full because it is not keeping up).
async fn ask_camera(
    shared: &Shared,
    camera_conn: ConnId,
    tx: &mpsc::Sender<Box<FromRendezvous>>,
    session: SessionId,
    intro: FromRendezvous,
) -> Option<Answer> {
    let (reply, answer) = oneshot::channel();
    lock(&shared.pending).insert(session, Pending { camera_conn, reply });
    let outcome = if tx.try_send(Box::new(intro)).is_ok() {
        tokio::time::timeout(shared.limits.intro_timeout, answer)
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        None
    };
    lock(&shared.pending).remove(&session);
    outcome
}

/// Allocates a relay session for this introduction, when the relay is enabled and both
/// peers use the relay's address family.
async fn allocate_relay(
    shared: &Shared,
    viewer_conn: &quinn::Connection,
    camera_ip: IpAddr,
) -> Option<Allocation> {
    let relay = shared.relay.as_ref()?;
    let ip = if shared.listen.ip().is_unspecified() {
        viewer_conn.local_ip()?.to_canonical()
    } else {
        shared.listen.ip()
    };
    let peers = Peers {
        viewer_ip: viewer_conn.remote_address().ip().to_canonical(),
        camera_ip: camera_ip.to_canonical(),
    };
    if peers.viewer_ip.is_ipv4() != ip.is_ipv4() || peers.camera_ip.is_ipv4() != ip.is_ipv4() {
        return None;
    }
    let mut alloc = relay.allocate(ip, peers).await?;
    if let Some(public) = shared.limits.relay_public_ip {
        alloc.viewer_side.set_ip(public);
        alloc.camera_side.set_ip(public);
    }
    Some(alloc)
}

fn you_are(conn: &quinn::Connection, shared: &Shared) -> FromRendezvous {
    FromRendezvous::YouAre {
        observed: canonical(conn.remote_address()),
        probe_port: shared.probe_port,
    }
}

/// A netcheck session: answers `WhoAmI` until the peer is done.
async fn who_am_i(
    conn: &quinn::Connection,
    send: &mut SendStream,
    recv: &mut RecvStream,
    shared: &Shared,
) {
    let mut asked = true;
    while asked {
        if frame::write(send, &you_are(conn, shared)).await.is_err() {
            return;
        }
        let next = frame::read_within::<ToRendezvous, _>(recv, Some(shared.limits.frame_timeout));
        asked = matches!(next.await, Ok(Some(ToRendezvous::WhoAmI)));
    }
}
