//! Getting connected: ask the rendezvous for the camera, then dial all of the camera's
//! candidates at once from our one socket and keep the first connection that completes.
//!
//! The viewer always dials and the camera always accepts (the camera punches first), so
//! there is never more than one connection to settle on: the first to finish its handshake
//! wins, the rest are dropped. The handshake proves the peer is the camera we asked for.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use peercam_certs::{Identity, Role};
use peercam_common::frame;
use peercam_common::rdv::{FromRendezvous, PathKind, ToRendezvous};
use peercam_common::tls::{self, Expect};
use peercam_common::{media, net, quic, rdv, SessionId, ViewerId};
use quinn::{ConnectionError, VarInt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info};

use crate::{Config, RelayMode, ViewError};

/// Server name used when dialling a camera. Cameras are identified by the identity in
/// their certificate, which the verifier checks; the name itself is not used.
const CAMERA_SERVER_NAME: &str = "camera.peercam.invalid";
/// Extra time allowed for the camera to answer an introduction.
const INTRO_ALLOWANCE: Duration = Duration::from_secs(6);

/// How the viewer reached the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Through a host candidate: same network.
    Lan,
    /// Through the camera's public (server-reflexive) address.
    Direct,
    /// Through the relay.
    Relay,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::Lan => "lan",
            Path::Direct => "direct",
            Path::Relay => "relay",
        })
    }
}

/// An established, verified connection to the camera.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) conn: quinn::Connection,
    pub(crate) path: Path,
    pub(crate) remote: SocketAddr,
    pub(crate) session: SessionId,
    pub(crate) connected_after: Duration,
    /// Reports the path to the rendezvous, then closes that connection; owned by the link.
    pub(crate) _report: AbortOnDropHandle<()>,
}

fn setup(e: impl fmt::Display) -> ViewError {
    ViewError::Setup(e.to_string())
}

pub(crate) async fn connect(config: &Config, started: Instant) -> Result<Link, ViewError> {
    RendezvousLink::open(config)
        .await?
        .find(config, started)
        .await
}

/// The viewer's socket and its connection to the rendezvous, before any camera is asked for.
#[derive(Debug)]
pub(crate) struct RendezvousLink {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

fn rdv_err(config: &Config, why: String) -> ViewError {
    ViewError::Rendezvous {
        addr: config.rendezvous.to_string(),
        why,
    }
}

impl RendezvousLink {
    /// Binds the socket and connects to the rendezvous.
    pub(crate) async fn open(config: &Config) -> Result<Self, ViewError> {
        let creds = &config.credentials;
        let rdv_tls = tls::client_config(creds, &config.trust, Expect::Rendezvous, rdv::ALPN)
            .map_err(setup)?;
        let rdv_cfg = quic::quic_client(rdv_tls, quic::rendezvous_transport()).map_err(setup)?;
        let shared = quic::bind_endpoint_with(config.bind, None, config.impairment)
            .map_err(|e| setup(format!("cannot bind UDP {}: {e}", config.bind)))?;
        let endpoint = shared.endpoint;
        let local = endpoint.local_addr().map_err(setup)?;
        info!(
            target: "progress",
            "asking the rendezvous at {} for camera {}",
            config.rendezvous,
            config.camera
        );
        let rdv_addr = net::for_socket(local, config.rendezvous.addr).ok_or_else(|| {
            rdv_err(
                config,
                format!("this socket ({local}) cannot reach that address family"),
            )
        })?;
        let connecting = endpoint
            .connect_with(rdv_cfg, rdv_addr, &config.rendezvous.server_name)
            .map_err(|e| rdv_err(config, e.to_string()))?;
        let conn = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(rdv_err(config, e.to_string())),
            Err(_) => {
                return Err(rdv_err(
                    config,
                    format!("no answer within {:?}", config.connect_timeout),
                ))
            }
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| rdv_err(config, e.to_string()))?;
        Ok(RendezvousLink {
            endpoint,
            conn,
            send,
            recv,
        })
    }

    /// Asks for `config.camera` and connects to it; the rendezvous connection is closed
    /// once the camera is reached.
    pub(crate) async fn find(self, config: &Config, started: Instant) -> Result<Link, ViewError> {
        let RendezvousLink {
            endpoint,
            conn: rdv_conn,
            mut send,
            mut recv,
        } = self;
        let local = endpoint.local_addr().map_err(setup)?;
        let creds = &config.credentials;
        let rdv_err = |why: String| rdv_err(config, why);
        let ask = ToRendezvous::Connect {
            camera: config.camera.clone(),
            local_addrs: net::host_candidates(local),
        };
        let why = |e: frame::FrameError| {
            let closed = rdv_conn
                .close_reason()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            match e {
                frame::FrameError::Io(io) => format!("{io}{closed}"),
                other => format!("{other}{closed}"),
            }
        };
        frame::write(&mut send, &ask)
            .await
            .map_err(|e| rdv_err(why(e)))?;
        let reply = tokio::time::timeout(
            config.connect_timeout + INTRO_ALLOWANCE,
            frame::read(&mut recv),
        )
        .await
        .map_err(|_| ViewError::IntroTimeout(config.camera.clone()))?
        .map_err(|e| rdv_err(why(e)))?;
        let viewer = ViewerId::new(&creds.identity.id).map_err(setup)?;
        let (session, observed, camera_local, camera_rtt, relay) = match reply {
            Some(FromRendezvous::PeerReady {
                session,
                camera_observed,
                camera_local,
                camera_rtt_us,
                relay,
            }) => (
                session,
                camera_observed,
                camera_local,
                Duration::from_micros(camera_rtt_us),
                relay,
            ),
            Some(FromRendezvous::Refused { reason }) => {
                rdv_conn.close(VarInt::from_u32(rdv::close::OK), b"");
                return Err(ViewError::from_refusal(reason, &config.camera, &viewer));
            }
            Some(other) => return Err(rdv_err(format!("unexpected answer {other:?}"))),
            None => {
                let why = rdv_conn
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "closed the stream".into());
                return Err(rdv_err(why));
            }
        };
        // The viewer↔camera RTT is at most about the two legs through the rendezvous.
        let rtt_hint = rdv_conn.rtt() + camera_rtt;
        let mut candidates = vec![observed];
        candidates.extend(camera_local.iter().copied());
        if config.relay == RelayMode::Only {
            candidates.clear();
        }
        let relay = relay.filter(|_| config.relay != RelayMode::Never);
        info!(
            target: "progress",
            "camera {} found; connecting to {} candidate address(es){}",
            config.camera,
            candidates.len(),
            if relay.is_some() { " and the relay" } else { "" }
        );
        let link = dial(config, &endpoint, &candidates, relay, rtt_hint).await;
        let (conn, remote) = match link {
            Ok(link) => link,
            Err(e) => {
                rdv_conn.close(VarInt::from_u32(rdv::close::OK), b"not connected");
                return Err(e);
            }
        };
        // A host candidate that is also the observed address is a public host: direct. A
        // global IPv6 host candidate behind routers is direct too: lan means on our link.
        let path = if Some(remote) == relay {
            Path::Relay
        } else if remote != observed && camera_local.contains(&remote) && net::on_link(remote.ip())
        {
            Path::Lan
        } else {
            Path::Direct
        };
        let connected_after = started.elapsed();
        let report =
            AbortOnDropHandle::new(tokio::spawn(report_path(rdv_conn, send, session, path)));
        info!(
            target: "progress",
            "connected to camera {}: {path} {remote} in {:.0} ms (end-to-end encrypted, identity verified)",
            config.camera,
            connected_after.as_secs_f64() * 1000.0
        );
        Ok(Link {
            endpoint,
            conn,
            path,
            remote,
            session,
            connected_after,
            _report: report,
        })
    }
}

/// Longest the rendezvous connection stays open for the path report to be acknowledged.
const REPORT_WAIT: Duration = Duration::from_secs(2);

/// Tells the rendezvous which path this session took (its `/metrics` count paths), waits
/// until the report is acknowledged (bounded), then hangs up on the rendezvous.
async fn report_path(
    rdv_conn: quinn::Connection,
    mut send: quinn::SendStream,
    session: SessionId,
    path: Path,
) {
    let path = match path {
        Path::Lan => PathKind::Lan,
        Path::Direct => PathKind::Direct,
        Path::Relay => PathKind::Relay,
    };
    let report = ToRendezvous::Report { session, path };
    if frame::write(&mut send, &report).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(REPORT_WAIT, send.stopped()).await;
    }
    rdv_conn.close(VarInt::from_u32(rdv::close::OK), b"connected");
}

/// How long a relayed connection waits for a direct one still in progress: a direct path
/// is preferred, but not at any price.
fn relay_grace(rtt_hint: Duration) -> Duration {
    (rtt_hint * 3 + Duration::from_millis(150)).min(Duration::from_secs(1))
}

/// Dials every usable candidate and the relay at once; returns the first verified direct
/// connection, or the relayed one if no direct connection completes within a grace period.
async fn dial(
    config: &Config,
    endpoint: &quinn::Endpoint,
    candidates: &[SocketAddr],
    relay: Option<SocketAddr>,
    rtt_hint: Duration,
) -> Result<(quinn::Connection, SocketAddr), ViewError> {
    let expect = Expect::Exactly(Identity {
        role: Role::Camera,
        id: config.camera.as_str().to_string(),
    });
    let media_tls = tls::client_config(&config.credentials, &config.trust, expect, media::ALPN)
        .map_err(setup)?;
    let media_cfg =
        quic::quic_client(media_tls, quic::media_transport(Some(rtt_hint))).map_err(setup)?;
    let local = endpoint.local_addr().map_err(setup)?;
    // Candidates as given (so the winner can be compared with them), if this socket can
    // reach them at all.
    let mut targets: Vec<SocketAddr> = Vec::new();
    for c in candidates.iter().chain(relay.iter()) {
        let usable = !c.ip().is_unspecified() && net::for_socket(local, *c).is_some();
        if usable && !targets.contains(c) {
            targets.push(*c);
        }
    }
    let mut attempts = JoinSet::new();
    for addr in &targets {
        let Some(dial_addr) = net::for_socket(local, *addr) else {
            continue;
        };
        match endpoint.connect_with(media_cfg.clone(), dial_addr, CAMERA_SERVER_NAME) {
            Ok(connecting) => {
                let addr = *addr;
                attempts.spawn(async move { (addr, connecting.await) });
            }
            Err(e) => debug!(%addr, error = %e, "cannot dial candidate"),
        }
    }
    let tried = format!("{targets:?}");
    let unreachable = || ViewError::Unreachable {
        camera: config.camera.clone(),
        tried: tried.clone(),
        secs: config.connect_timeout.as_secs(),
    };
    let mut failure = None;
    let mut relayed: Option<quinn::Connection> = None;
    let deadline = tokio::time::sleep(config.connect_timeout);
    tokio::pin!(deadline);
    let grace = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut deadline, if relayed.is_none() => {
                return Err(failure.unwrap_or_else(unreachable))
            }
            _ = &mut grace, if relayed.is_some() => break,
            next = attempts.join_next() => match next {
                None => break,
                Some(Ok((addr, Ok(conn)))) if Some(addr) == relay => {
                    debug!("relayed connection ready; waiting briefly for a direct one");
                    relayed = Some(conn);
                    grace.as_mut().reset(Instant::now() + relay_grace(rtt_hint));
                }
                Some(Ok((addr, Ok(conn)))) => {
                    attempts.abort_all();
                    if let Some(r) = relayed {
                        r.close(VarInt::from_u32(media::close::OK), b"direct path found");
                    }
                    return Ok((conn, addr));
                }
                Some(Ok((addr, Err(e)))) => {
                    debug!(%addr, error = %e, "candidate failed");
                    if let Some(err) = classify(config, addr, &e) {
                        if matches!(err, ViewError::CameraRefused { .. }) {
                            return Err(err);
                        }
                        failure.get_or_insert(err);
                    }
                }
                Some(Err(_)) => {}
            }
        }
    }
    attempts.abort_all();
    match (relayed, relay) {
        (Some(conn), Some(addr)) => Ok((conn, addr)),
        _ => Err(failure.unwrap_or_else(unreachable)),
    }
}

/// Turns a failed handshake into the error a user should see, if it says more than
/// "unreachable".
fn classify(config: &Config, addr: SocketAddr, e: &ConnectionError) -> Option<ViewError> {
    match e {
        // Our own TLS refused the peer: it is not the camera we asked for.
        ConnectionError::TransportError(t) => Some(ViewError::WrongPeer {
            camera: config.camera.clone(),
            addr,
            why: t.reason.clone(),
        }),
        ConnectionError::ApplicationClosed(c) => Some(ViewError::CameraRefused {
            camera: config.camera.clone(),
            why: String::from_utf8_lossy(&c.reason).into_owned(),
        }),
        // The camera's TLS refused our certificate.
        ConnectionError::ConnectionClosed(c) => Some(ViewError::CameraRefused {
            camera: config.camera.clone(),
            why: format!("it rejected this viewer's certificate ({c})"),
        }),
        _ => None,
    }
}
