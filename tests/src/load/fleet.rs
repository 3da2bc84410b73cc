//! Simulated cameras: each has its own key and certificate, its own QUIC connection to the
//! rendezvous, registers with the real protocol, answers introductions with `Accept`, and
//! after a loss reconnects with exponential backoff and full jitter exactly as
//! camera-agent does (`common::backoff`, 0.5 s → 30 s, reset after a registered session),
//! and after the rendezvous' `GoingAway` first waits a random delay within the announced
//! window, as camera-agent does (`common::going_away`).
//!
//! What it leaves out of a real camera: punch packets, media, the access-list check.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peercam_certs::Role;
use peercam_common::backoff::Backoff;
use peercam_common::frame;
use peercam_common::going_away;
use peercam_common::rdv::{self, Capabilities, FromRendezvous, ToRendezvous};
use peercam_common::tls::{self, Expect};
use peercam_common::{quic, CameraId, ViewerId};
use quinn::{RecvStream, SendStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Pki;

/// Handshake and registration answer timeout (as camera-agent's `REGISTER_TIMEOUT`).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// camera-agent's default backoff.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Error samples kept for the report.
const ERROR_SAMPLES: usize = 8;

/// The ID of simulated camera `i`.
pub fn camera_id(i: usize) -> CameraId {
    CameraId::new(&format!("cam-{i:06}")).expect("valid camera ID")
}

/// Builds one rendezvous client config per camera (own key, own certificate), on all cores.
pub fn identities(pki: &Pki, n: usize, viewer: &ViewerId) -> Vec<Identity> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads).max(1);
    let trust = pki.trust();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                let trust = trust.clone();
                s.spawn(move || {
                    (start..(start + chunk).min(n))
                        .map(|i| {
                            let creds = pki.creds(Role::Camera, camera_id(i).as_str());
                            let tls =
                                tls::client_config(&creds, &trust, Expect::Rendezvous, rdv::ALPN)
                                    .expect("client TLS config");
                            Identity {
                                config: quic::quic_client(tls, quic::rendezvous_transport())
                                    .expect("QUIC client config"),
                                access: vec![viewer.clone()],
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("identity thread"))
            .collect()
    })
}

/// One camera's QUIC client config (with its certificate) and access list.
pub struct Identity {
    config: quinn::ClientConfig,
    access: Vec<ViewerId>,
}

/// Counters shared by all simulated cameras.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Cameras registered now.
    pub registered: AtomicUsize,
    /// Successful registrations so far.
    pub registrations: AtomicU64,
    /// Registration attempts that failed (handshake, timeout, refusal).
    pub failures: AtomicU64,
    /// Registered sessions that ended (connection lost or closed by the rendezvous).
    pub losses: AtomicU64,
    /// Introductions answered.
    pub intros: AtomicU64,
    /// Sessions that ended with the rendezvous' `GoingAway`.
    pub going_away: AtomicU64,
    /// The last window a `GoingAway` announced, milliseconds.
    pub going_away_ms: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Dial → `Registered` of every successful registration, microseconds.
    latencies: Mutex<Vec<u32>>,
}

impl Fleet {
    fn failed(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() < ERROR_SAMPLES {
            e.push(why);
        }
    }

    /// Percentiles (50, 99, 100) of dial → `Registered`, milliseconds, of the
    /// registrations so far; clears them.
    pub fn take_latencies(&self) -> [f64; 3] {
        let mut l = std::mem::take(&mut *self.latencies.lock().unwrap_or_else(|p| p.into_inner()));
        l.sort_unstable();
        [0.50, 0.99, 1.0].map(|p| {
            let i = ((l.len() as f64 * p).ceil() as usize).saturating_sub(1);
            l.get(i).map_or(0.0, |us| f64::from(*us) / 1000.0)
        })
    }

    /// A few of the errors seen.
    pub fn error_samples(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Starts every camera on `tasks`, spread over `endpoints` client endpoints. At most
/// `gate`'s permits handshakes are in flight at once (add permits to lift the limit).
/// How the simulated cameras reconnect.
#[derive(Debug, Clone, Copy, Default)]
pub enum Reconnect {
    /// As camera-agent does: after `GoingAway`, the first attempt waits uniformly within
    /// the window the rendezvous announced; after any other loss of a registered session,
    /// the backoff restarts at its base (a delay uniform in 0–0.5 s); it grows after each
    /// failed attempt.
    #[default]
    Agent,
    /// An override for comparison: when the rendezvous ended the session (`GoingAway` or a
    /// `SHUTDOWN` close), the first attempt waits uniformly in `[0, window]` whatever it
    /// announced; otherwise as `Agent`.
    SpreadAfterShutdown(Duration),
    /// A camera-agent from before `GoingAway` (comparison): it announces version 1, so the
    /// rendezvous does not send the message, and every loss restarts the backoff at its
    /// base.
    IgnoreGoingAway,
}

/// Starts every camera on `tasks`, spread over `endpoints` client endpoints. At most
/// `gate`'s permits handshakes are in flight at once (add permits to lift the limit).
#[allow(clippy::too_many_arguments)]
pub fn spawn_all(
    tasks: &mut JoinSet<()>,
    ids: Vec<Identity>,
    endpoints: &[quinn::Endpoint],
    rdv: SocketAddr,
    fleet: &Arc<Fleet>,
    gate: &Arc<Semaphore>,
    reconnect: Reconnect,
    cancel: &CancellationToken,
) {
    for (i, id) in ids.into_iter().enumerate() {
        let ep = endpoints[i % endpoints.len()].clone();
        let (fleet, gate, cancel) = (fleet.clone(), gate.clone(), cancel.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = camera(ep, id, rdv, fleet, gate, reconnect) => {}
            }
        });
    }
}

async fn camera(
    ep: quinn::Endpoint,
    id: Identity,
    rdv: SocketAddr,
    fleet: Arc<Fleet>,
    gate: Arc<Semaphore>,
    reconnect: Reconnect,
) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        let permit = gate.acquire().await;
        let t0 = std::time::Instant::now();
        let old = matches!(reconnect, Reconnect::IgnoreGoingAway);
        let registered = register(&ep, &id, rdv, old).await;
        drop(permit);
        if registered.is_ok() {
            let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
            fleet
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(us);
        }
        let mut delay = None;
        match registered {
            Ok((conn, send, recv)) => {
                fleet.registrations.fetch_add(1, Ordering::Relaxed);
                fleet.registered.fetch_add(1, Ordering::Relaxed);
                let going_away = serve(send, recv, &fleet).await;
                if let Some(ms) = going_away {
                    fleet.going_away.fetch_add(1, Ordering::Relaxed);
                    fleet.going_away_ms.store(ms, Ordering::Relaxed);
                }
                fleet.registered.fetch_sub(1, Ordering::Relaxed);
                fleet.losses.fetch_add(1, Ordering::Relaxed);
                backoff.reset();
                let unit = rand::random::<f64>();
                delay = match (reconnect, going_away) {
                    (Reconnect::Agent, Some(ms)) => {
                        conn.close(quinn::VarInt::from_u32(rdv::close::OK), b"going away");
                        Some(going_away::first_reconnect_delay(ms, unit))
                    }
                    (Reconnect::SpreadAfterShutdown(window), _) => {
                        let shutdown = going_away.is_some()
                            || matches!(
                                conn.close_reason(),
                                Some(quinn::ConnectionError::ApplicationClosed(c))
                                    if c.error_code == quinn::VarInt::from_u32(rdv::close::SHUTDOWN)
                            );
                        shutdown.then(|| window.mul_f64(unit))
                    }
                    _ => None,
                };
            }
            Err(why) => fleet.failed(why),
        }
        let delay = delay.unwrap_or_else(|| backoff.next_delay(rand::random::<f64>()));
        tokio::time::sleep(delay).await;
    }
}

async fn register(
    ep: &quinn::Endpoint,
    id: &Identity,
    rdv: SocketAddr,
    ignore_going_away: bool,
) -> Result<(quinn::Connection, SendStream, RecvStream), String> {
    let connecting = ep
        .connect_with(id.config.clone(), rdv, "127.0.0.1")
        .map_err(|e| format!("cannot dial: {e}"))?;
    let conn = match tokio::time::timeout(REGISTER_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("handshake failed: {e}")),
        Err(_) => return Err("handshake timed out".into()),
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| format!("cannot open stream: {e}"))?;
    let register = ToRendezvous::Register {
        local_addrs: ep.local_addr().into_iter().collect(),
        access: id.access.clone(),
        caps: Capabilities {
            codecs: vec!["h264".into()],
            // An agent from before GoingAway announces version 1 and is not sent it.
            version: if ignore_going_away {
                1
            } else {
                rdv::AGENT_VERSION
            },
        },
    };
    frame::write(&mut send, &register)
        .await
        .map_err(|e| format!("cannot register: {e}"))?;
    match tokio::time::timeout(REGISTER_TIMEOUT, frame::read(&mut recv)).await {
        Ok(Ok(Some(FromRendezvous::Registered { .. }))) => Ok((conn, send, recv)),
        Ok(Ok(other)) => Err(format!(
            "unexpected answer {other:?} ({:?})",
            conn.close_reason()
        )),
        Ok(Err(e)) => Err(format!(
            "registration failed: {e} ({:?})",
            conn.close_reason()
        )),
        Err(_) => Err("no answer to Register".into()),
    }
}

/// Answers introductions until the connection ends; returns the window of a `GoingAway`.
async fn serve(mut send: SendStream, mut recv: RecvStream, fleet: &Fleet) -> Option<u64> {
    while let Ok(Some(msg)) = frame::read::<FromRendezvous, _>(&mut recv).await {
        match msg {
            FromRendezvous::Introduce { session, .. } => {
                let accept = ToRendezvous::Accept {
                    session,
                    local_addrs: Vec::new(),
                };
                if frame::write(&mut send, &accept).await.is_err() {
                    return None;
                }
                fleet.intros.fetch_add(1, Ordering::Relaxed);
            }
            FromRendezvous::GoingAway {
                reconnect_within_ms,
            } => return Some(reconnect_within_ms),
            _ => {}
        }
    }
    None
}
