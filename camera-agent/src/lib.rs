//! camera-agent: registers a camera with a rendezvous, accepts viewers that the camera's
//! access list allows, and streams H.264 to them end to end over QUIC.
//!
//! One UDP socket, one quinn endpoint: the rendezvous connection (camera dials) and viewer
//! connections (viewers dial the camera) share it, so the address the rendezvous observes
//! is the one viewers reach. [`start`] takes a [`Config`] and returns a [`Handle`].

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod fanout;
pub mod punch;
mod rdv_client;
mod rtsp;
mod serve;
pub mod source;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use peercam_certs::Role;
pub use peercam_common::net::RendezvousAddr;
use peercam_common::tls::{self, Credentials, Expect, Trust};
use peercam_common::{media, quic, rdv, SessionId, ViewerId};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::fanout::Fanout;
pub use crate::source::SourceSpec;

/// Default cap on concurrent viewers.
pub const DEFAULT_MAX_VIEWERS: usize = 8;
/// Default latency budget: a GOP still unsent after this long is abandoned.
pub const DEFAULT_LATENCY_BUDGET: Duration = Duration::from_millis(1500);
/// How long an introduction stays valid for the viewer to connect.
pub const SESSION_TTL: Duration = Duration::from_secs(15);
/// Most introductions waiting for their viewer at once.
pub const MAX_PENDING_SESSIONS: usize = 64;
/// Introductions answered in a burst; beyond it, at [`INTRO_RATE`] per second. Each
/// accepted introduction sends at most `punch::MAX_PACKETS` tiny packets, so even a
/// compromised rendezvous cannot turn the camera into a packet cannon.
pub const INTRO_BURST: f64 = 16.0;
/// Introductions per second sustained.
pub const INTRO_RATE: f64 = 4.0;

/// Runtime configuration of the agent.
#[derive(Debug, Clone)]
pub struct Config {
    /// Local UDP address (port 0 picks one).
    pub bind: SocketAddr,
    /// Rendezvous servers, tried in order (failover).
    pub rendezvous: Vec<RendezvousAddr>,
    /// The camera's certificate and key.
    pub credentials: Credentials,
    /// The deployment CA and deny list.
    pub trust: Trust,
    /// Viewers allowed to watch.
    pub access: Vec<ViewerId>,
    /// Where the video comes from.
    pub source: SourceSpec,
    /// Most viewers at once.
    pub max_viewers: usize,
    /// Latency budget per viewer.
    pub latency_budget: Duration,
    /// Send parity datagrams beside the video when a viewer's link loses packets, so the
    /// viewer rebuilds lost bytes without waiting for retransmissions (`common::fec`).
    /// Costs up to ~20 % more bandwidth on a lossy link, nothing on a clean one.
    pub fec: bool,
    /// First reconnect delay ceiling.
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Send punch packets to viewers (turn off only to measure what punching buys).
    pub punch: bool,
}

impl Config {
    /// A configuration with defaults for everything but identity, servers and source.
    pub fn new(
        credentials: Credentials,
        trust: Trust,
        rendezvous: Vec<RendezvousAddr>,
        source: SourceSpec,
    ) -> Self {
        Config {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            rendezvous,
            credentials,
            trust,
            access: Vec::new(),
            source,
            max_viewers: DEFAULT_MAX_VIEWERS,
            latency_budget: DEFAULT_LATENCY_BUDGET,
            fec: true,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            punch: true,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// No rendezvous configured.
    #[error(
        "no rendezvous address configured: set `rendezvous = [\"host:port\"]` or pass --rendezvous"
    )]
    NoRendezvous,
}

/// Registration state, for status displays and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Address the current rendezvous observed, while registered.
    pub registered: Option<SocketAddr>,
    /// Registrations so far (a re-registration after a rendezvous restart adds one).
    pub registrations: u64,
    /// Last error from the rendezvous, in words.
    pub last_error: Option<String>,
    /// Viewers connected now.
    pub viewers: usize,
    /// The last `GoingAway` a rendezvous sent: the window it announced and the delay this
    /// camera drew within it before reconnecting.
    pub going_away: Option<GoingAway>,
}

/// A rendezvous' announced shutdown, as this camera acted on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoingAway {
    /// The window announced (`reconnect_within_ms`), as capped by this camera.
    pub window: Duration,
    /// The delay drawn uniformly within it before the first reconnect.
    pub delay: Duration,
}

#[derive(Debug)]
struct PendingSession {
    viewer: ViewerId,
    expires: Instant,
    /// Addresses the viewer's packets may come from (its candidates, the relay).
    ips: Vec<IpAddr>,
    /// The relay's address, if one was offered.
    relay: Option<SocketAddr>,
    /// RTT to the viewer estimated through the rendezvous.
    rtt: Duration,
}

/// State shared by the agent's tasks.
#[derive(Debug)]
pub(crate) struct State {
    access: RwLock<HashSet<ViewerId>>,
    /// Bumped on every access list change; the rendezvous session forwards the list.
    access_gen: watch::Sender<u64>,
    sessions: Mutex<HashMap<SessionId, PendingSession>>,
    intro_tokens: Mutex<(f64, Instant)>,
    fanout: Arc<Fanout>,
    status: watch::Sender<Status>,
    source_ended: CancellationToken,
    max_viewers: usize,
    latency_budget: Duration,
    fec: bool,
    /// The media server configuration; each viewer connection gets a copy whose
    /// `initial_rtt` comes from its introduction.
    server_config: quinn::ServerConfig,
    /// Viewers being served now.
    viewers: Mutex<Vec<Arc<status::ViewerStats>>>,
    /// Since when the agent has not been registered (None while registered).
    unregistered_since: Mutex<Option<Instant>>,
}

/// What a viewer's datagrams may occupy at the camera, which never reads them.
const CAMERA_DATAGRAM_BUFFER: usize = 16 * 1024;

/// Transport of the camera's media connections.
fn camera_media_transport(initial_rtt: Option<Duration>) -> quinn::TransportConfig {
    let mut t = quic::media_transport(initial_rtt);
    // Writes block once this much is queued, so a stalled viewer shows up as a timeout.
    t.send_window(4 * 1024 * 1024);
    // The camera sends parity datagrams and reads none; quinn sends datagrams only when it
    // also takes them, so it gets a small buffer (oldest dropped) that nobody reads.
    t.datagram_receive_buffer_size(Some(CAMERA_DATAGRAM_BUFFER));
    t
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    pub(crate) fn add_viewer(&self, v: Arc<status::ViewerStats>) {
        lock(&self.viewers).push(v);
    }

    pub(crate) fn remove_viewer(&self, v: &Arc<status::ViewerStats>) {
        lock(&self.viewers).retain(|x| !Arc::ptr_eq(x, v));
    }

    pub(crate) fn set_registered(&self, registered: bool) {
        let mut since = lock(&self.unregistered_since);
        match (registered, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    pub(crate) fn allowed(&self, viewer: &ViewerId) -> bool {
        self.access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(viewer)
    }

    fn access_list(&self) -> Vec<ViewerId> {
        let mut v: Vec<_> = self
            .access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Remembers an accepted introduction; false if too many are pending.
    pub(crate) fn expect_session(
        &self,
        now: Instant,
        session: SessionId,
        viewer: ViewerId,
        ips: Vec<IpAddr>,
        relay: Option<SocketAddr>,
        rtt: Duration,
    ) -> bool {
        let mut s = lock(&self.sessions);
        s.retain(|_, p| p.expires > now);
        if s.len() >= MAX_PENDING_SESSIONS {
            return false;
        }
        s.insert(
            session,
            PendingSession {
                viewer,
                expires: now + SESSION_TTL,
                ips,
                relay,
                rtt,
            },
        );
        true
    }

    /// Takes one introduction token; false when introductions arrive too fast.
    pub(crate) fn take_intro_token(&self, now: Instant) -> bool {
        let mut t = lock(&self.intro_tokens);
        let refill = now.saturating_duration_since(t.1).as_secs_f64() * INTRO_RATE;
        *t = ((t.0 + refill).min(INTRO_BURST), now);
        if t.0 < 1.0 {
            return false;
        }
        t.0 -= 1.0;
        true
    }

    /// The server configuration for a connection from `ip`: with the RTT of the
    /// introduction it belongs to, so lost handshake packets are resent in time.
    pub(crate) fn server_config_for(&self, ip: IpAddr) -> quinn::ServerConfig {
        let rtt = lock(&self.sessions)
            .values()
            .find(|p| p.ips.contains(&ip))
            .map(|p| p.rtt);
        let mut config = self.server_config.clone();
        config.transport_config(Arc::new(camera_media_transport(rtt)));
        config
    }

    /// Consumes a session: valid once, for the viewer it was made for, before it expires.
    /// Returns the relay address of the introduction (`Some(None)`: no relay).
    pub(crate) fn take_session(
        &self,
        now: Instant,
        session: &SessionId,
        viewer: &ViewerId,
    ) -> Option<Option<SocketAddr>> {
        let mut s = lock(&self.sessions);
        match s.get(session) {
            Some(p) if &p.viewer == viewer && p.expires > now => s.remove(session).map(|p| p.relay),
            _ => None,
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Handle {
    local_addr: SocketAddr,
    camera: String,
    not_after: i64,
    cancel: CancellationToken,
    status: watch::Receiver<Status>,
    task: tokio::task::JoinHandle<()>,
    state: Arc<State>,
}

impl Handle {
    /// The agent's UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Current registration state.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Replaces the access list, without a restart: new viewers are checked against it at
    /// once, and the rendezvous gets it right away.
    pub fn set_access(&self, access: Vec<ViewerId>) {
        *self.state.access.write().unwrap_or_else(|p| p.into_inner()) =
            access.into_iter().collect();
        self.state.access_gen.send_modify(|g| *g += 1);
    }

    /// The agent's status: identity, certificate, registration, viewers, warnings.
    pub fn report(&self) -> status::Report {
        self.reporter().report()
    }

    /// Something that can produce status reports while the agent runs (for an admin
    /// socket), without holding the handle.
    pub fn reporter(&self) -> Reporter {
        Reporter {
            camera: self.camera.clone(),
            not_after: self.not_after,
            status: self.status.clone(),
            state: self.state.clone(),
        }
    }

    /// Asks the agent to stop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until the agent has stopped.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Produces status reports of a running agent.
#[derive(Debug, Clone)]
pub struct Reporter {
    camera: String,
    not_after: i64,
    status: watch::Receiver<Status>,
    state: Arc<State>,
}

impl Reporter {
    /// The agent's status now.
    pub fn report(&self) -> status::Report {
        let viewers = lock(&self.state.viewers)
            .iter()
            .map(|v| v.report())
            .collect();
        let status = self.status.borrow().clone();
        let unregistered = if status.registered.is_some() {
            None
        } else {
            lock(&self.state.unregistered_since).map(|t| t.elapsed())
        };
        status::report(&self.camera, self.not_after, &status, viewers, unregistered)
    }
}

/// Starts the agent: binds the socket, starts the source, registers, serves viewers.
pub async fn start(config: Config) -> Result<Handle, StartError> {
    if config.rendezvous.is_empty() {
        return Err(StartError::NoRendezvous);
    }
    let creds = &config.credentials;
    let media_tls = tls::server_config(creds, &config.trust, &[Role::Viewer], media::ALPN)?;
    let server = quic::quic_server(media_tls, camera_media_transport(None))?;
    let rdv_tls = tls::client_config(creds, &config.trust, Expect::Rendezvous, rdv::ALPN)?;
    let rdv_client = quic::quic_client(rdv_tls, quic::rendezvous_transport())?;
    let shared = quic::bind_endpoint(config.bind, Some(server.clone())).map_err(|source| {
        StartError::Bind {
            addr: config.bind,
            source,
        }
    })?;
    let local_addr = shared
        .endpoint
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
    let (status_tx, status_rx) = watch::channel(Status::default());
    let state = Arc::new(State {
        access: RwLock::new(config.access.iter().cloned().collect()),
        access_gen: watch::channel(0).0,
        sessions: Mutex::default(),
        intro_tokens: Mutex::new((INTRO_BURST, Instant::now())),
        fanout: Arc::new(Fanout::new()),
        status: status_tx,
        source_ended: CancellationToken::new(),
        max_viewers: config.max_viewers,
        latency_budget: config.latency_budget,
        fec: config.fec,
        server_config: server,
        viewers: Mutex::default(),
        unregistered_since: Mutex::new(Some(Instant::now())),
    });
    let cancel = CancellationToken::new();
    let camera = creds.identity.id.clone();
    let config_not_after = creds.not_after;
    let span = info_span!("camera", camera = %camera);
    let task = tokio::spawn(
        run(config, shared, rdv_client, state.clone(), cancel.clone()).instrument(span),
    );
    info!(%local_addr, camera = %camera, "camera-agent started");
    Ok(Handle {
        local_addr,
        camera: camera.clone(),
        not_after: config_not_after,
        cancel,
        status: status_rx,
        task,
        state,
    })
}

async fn run(
    config: Config,
    shared: quic::SharedEndpoint,
    rdv_client: quinn::ClientConfig,
    state: Arc<State>,
    cancel: CancellationToken,
) {
    let endpoint = shared.endpoint.clone();
    let mut tasks = JoinSet::new();
    let source_state = state.clone();
    let source_cancel = cancel.clone();
    tasks.spawn(async move {
        let fanout = source_state.fanout.clone();
        if let Err(e) = source::run(config.source.clone(), fanout, source_cancel).await {
            warn!(error = %e, "video source failed");
        }
        source_state.source_ended.cancel();
    });
    tasks.spawn(rdv_client::run(
        rdv_client::Client {
            endpoint: shared.endpoint.clone(),
            punch: shared.punch.clone(),
            config: rdv_client,
            targets: config.rendezvous.clone(),
            backoff: peercam_common::backoff::Backoff::new(config.backoff_base, config.backoff_max),
            punching: config.punch,
        },
        state.clone(),
        cancel.clone(),
    ));
    tasks.spawn(serve::accept_loop(
        shared.endpoint.clone(),
        state.clone(),
        cancel.clone(),
    ));
    cancel.cancelled().await;
    info!("shutting down");
    endpoint.close(
        quinn::VarInt::from_u32(media::close::SHUTDOWN),
        b"camera shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}
