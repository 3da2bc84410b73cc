//! viewer: finds a camera through the rendezvous, connects to it directly over QUIC from
//! one UDP socket, checks that it reached the camera it asked for, and writes the H.264 it
//! receives (Annex B) to a sink while measuring what a user notices.
//!
//! [`watch`] runs one session and returns a [`stats::Summary`]; `main.rs` only parses
//! flags and prints.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
mod connect;
mod gop;
pub mod mp4;
mod receive;
pub mod stats;
#[cfg(feature = "window")]
pub mod window;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use peercam_common::impair::Impairment;
use peercam_common::media::FrameHeader;
use peercam_common::net::RendezvousAddr;
use peercam_common::rdv::Refusal;
use peercam_common::tls::{Credentials, Trust};
use peercam_common::{CameraId, ViewerId};
use tokio_util::sync::CancellationToken;

pub use connect::Path;
pub use stats::Summary;

/// Where received video goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Annex B to a file (created or truncated).
    File(PathBuf),
    /// Annex B to standard output.
    Stdout,
    /// Nowhere (measure only).
    Discard,
}

/// Whether to use the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Direct when possible, relay otherwise (the default).
    Auto,
    /// Direct only.
    Never,
    /// Relay only (for tests and diagnosis).
    Only,
}

/// One viewing session's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Local UDP address (port 0 picks one).
    pub bind: SocketAddr,
    /// The rendezvous.
    pub rendezvous: RendezvousAddr,
    /// The viewer's certificate and key.
    pub credentials: Credentials,
    /// The deployment CA.
    pub trust: Trust,
    /// The camera to watch.
    pub camera: CameraId,
    /// Where the video goes.
    pub sink: Sink,
    /// Stop after this many frames.
    pub max_frames: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Limit for reaching the rendezvous and for the direct connection.
    pub connect_timeout: Duration,
    /// Print progress to stderr every second.
    pub progress: bool,
    /// Abandon a GOP whose frames arrive later than this when a newer one is waiting.
    pub latency_budget: Duration,
    /// Relay use.
    pub relay: RelayMode,
    /// Also record to fragmented MP4 here (crash-safe).
    pub record: Option<PathBuf>,
    /// Start a new recording file every this many seconds.
    pub record_segment_secs: Option<u64>,
    /// Called with every frame written to the sink (for the live window).
    pub frame_hook: Option<FrameHook>,
    /// For tests and benchmarks: a user-space impairment on this viewer's socket.
    pub impairment: Option<Impairment>,
}

/// A frame as handed to a [`FrameHook`].
#[derive(Debug, Clone, Copy)]
pub struct FrameSeen<'a> {
    /// Its header (keyframe flag, capture time).
    pub header: &'a FrameHeader,
    /// One access unit, Annex B.
    pub data: &'a Bytes,
    /// How the camera is reached.
    pub path: Path,
    /// Capture to receive, clock offset corrected; `None` for frames from the GOP cache.
    pub latency: Option<Duration>,
}

/// Called on the receive task with every frame written to the sink: it must not block.
#[derive(Clone)]
pub struct FrameHook(pub Arc<dyn Fn(&FrameSeen<'_>) + Send + Sync>);

impl std::fmt::Debug for FrameHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameHook(..)")
    }
}

impl Config {
    /// A configuration with defaults for everything but identity, servers and camera.
    pub fn new(
        credentials: Credentials,
        trust: Trust,
        rendezvous: RendezvousAddr,
        camera: CameraId,
    ) -> Self {
        Config {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            rendezvous,
            credentials,
            trust,
            camera,
            sink: Sink::Discard,
            max_frames: None,
            duration: None,
            connect_timeout: Duration::from_secs(5),
            progress: false,
            latency_budget: Duration::from_millis(1500),
            relay: RelayMode::Auto,
            record: None,
            record_segment_secs: None,
            frame_hook: None,
            impairment: None,
        }
    }
}

/// Why watching failed. Each message says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// Local set-up (TLS, socket, sink) failed.
    #[error("{0}")]
    Setup(String),
    /// The rendezvous could not be reached or refused us.
    #[error("cannot reach the rendezvous at {addr}: {why}. Check the address, that UDP to it is allowed, and that your certificate is from the same CA")]
    Rendezvous {
        /// Its address.
        addr: String,
        /// What went wrong.
        why: String,
    },
    /// Unknown camera or not allowed: the same answer for both, by design.
    #[error("camera {camera} is unknown, or viewer {viewer} is not on its access list: check the ID, or ask the camera's owner to allow {viewer}")]
    NotAllowed {
        /// The camera.
        camera: CameraId,
        /// This viewer.
        viewer: ViewerId,
    },
    /// The camera is not connected to the rendezvous.
    #[error(
        "camera {camera} is offline (last seen {ago} ago): check that it is powered and online"
    )]
    Offline {
        /// The camera.
        camera: CameraId,
        /// How long ago, in words.
        ago: String,
    },
    /// The camera did not answer the introduction.
    #[error("camera {0} did not answer the introduction in time: it may be overloaded or its network may be down; try again")]
    IntroTimeout(CameraId),
    /// Too many requests.
    #[error("the rendezvous is rate-limiting this viewer: wait {0} ms and try again")]
    RateLimited(u64),
    /// No direct path could be opened.
    #[error("could not reach camera {camera} at any of {tried} within {secs} s: no direct path through the NATs and no working relay; check that UDP is not blocked on either side")]
    Unreachable {
        /// The camera.
        camera: CameraId,
        /// Addresses tried.
        tried: String,
        /// Seconds waited.
        secs: u64,
    },
    /// The camera refused us after connecting.
    #[error("camera {camera} refused this viewer: {why}")]
    CameraRefused {
        /// The camera.
        camera: CameraId,
        /// Its reason.
        why: String,
    },
    /// The peer at the camera's address is not the camera we asked for.
    #[error("the peer at {addr} is not camera {camera}: {why}. Connection refused; no video was exchanged")]
    WrongPeer {
        /// The camera.
        camera: CameraId,
        /// The address.
        addr: SocketAddr,
        /// TLS' reason.
        why: String,
    },
    /// The stream broke before anything was received.
    #[error("the connection to camera {camera} was lost: {why}")]
    Lost {
        /// The camera.
        camera: CameraId,
        /// What happened.
        why: String,
    },
    /// Writing the output failed.
    #[error("cannot write the video to {path}: {source}")]
    Output {
        /// The sink.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl ViewError {
    /// Maps a rendezvous refusal to the error a user sees.
    fn from_refusal(r: Refusal, camera: &CameraId, viewer: &ViewerId) -> Self {
        match r {
            Refusal::Unavailable | Refusal::Declined | Refusal::BadRequest => {
                ViewError::NotAllowed {
                    camera: camera.clone(),
                    viewer: viewer.clone(),
                }
            }
            Refusal::Offline { last_seen_secs } => ViewError::Offline {
                camera: camera.clone(),
                ago: human_secs(last_seen_secs),
            },
            Refusal::Timeout => ViewError::IntroTimeout(camera.clone()),
            Refusal::RateLimited { retry_after_ms } => ViewError::RateLimited(retry_after_ms),
        }
    }

    /// Process exit code for this error: 2 not allowed, 3 offline, 4 unreachable,
    /// 5 rendezvous, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ViewError::NotAllowed { .. } | ViewError::CameraRefused { .. } => 2,
            ViewError::Offline { .. } | ViewError::IntroTimeout(_) => 3,
            ViewError::Unreachable { .. } | ViewError::WrongPeer { .. } => 4,
            ViewError::Rendezvous { .. } | ViewError::RateLimited(_) => 5,
            _ => 1,
        }
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..=89 => format!("{s} s"),
        90..=5399 => format!("{} min", (s + 30) / 60),
        _ => format!("{} h", (s + 1800) / 3600),
    }
}

/// One connectivity probe: how the camera was reached and how fast.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    /// `lan`, `direct` or `relay`.
    pub path: String,
    /// The camera address used.
    pub remote: String,
    /// Round-trip time measured by the QUIC handshake, ms.
    pub rtt_ms: f64,
    /// Start to verified connection, ms.
    pub connect_ms: f64,
}

/// Finds and connects to the camera once, measures, and hangs up (no video).
pub async fn probe(config: &Config) -> Result<Probe, ViewError> {
    let started = tokio::time::Instant::now();
    let link = connect::connect(config, started).await?;
    let probe = Probe {
        path: link.path.to_string(),
        remote: link.remote.to_string(),
        rtt_ms: link.conn.rtt().as_secs_f64() * 1000.0,
        connect_ms: link.connected_after.as_secs_f64() * 1000.0,
    };
    link.conn.close(
        quinn::VarInt::from_u32(peercam_common::media::close::OK),
        b"probe done",
    );
    let _ = tokio::time::timeout(Duration::from_millis(300), link.endpoint.wait_idle()).await;
    Ok(probe)
}

/// Watches a camera until a limit is reached, the camera ends the stream, or `cancel`.
pub async fn watch(config: Config, cancel: CancellationToken) -> Result<Summary, ViewError> {
    let started = tokio::time::Instant::now();
    let link = connect::connect(&config, started).await?;
    receive::run(&config, link, started, cancel).await
}

/// A viewer already connected to the rendezvous, so that watching starts sooner: an app
/// opens one when it starts and watches when the user picks a camera.
#[derive(Debug)]
pub struct Client {
    rdv: connect::RendezvousLink,
}

impl Client {
    /// Binds the socket and connects to the rendezvous named in `config`.
    pub async fn connect(config: &Config) -> Result<Client, ViewError> {
        Ok(Client {
            rdv: connect::RendezvousLink::open(config).await?,
        })
    }

    /// Watches `config.camera` (the rendezvous and identity were fixed by [`Client::connect`]);
    /// time to first frame counts from this call.
    pub async fn watch(
        self,
        config: Config,
        cancel: CancellationToken,
    ) -> Result<Summary, ViewError> {
        let started = tokio::time::Instant::now();
        let link = self.rdv.find(&config, started).await?;
        receive::run(&config, link, started, cancel).await
    }
}
