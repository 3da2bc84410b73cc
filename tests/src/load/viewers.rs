//! Simulated viewers: a pool of rendezvous connections issuing `Connect` for random
//! cameras at a fixed rate (open loop), each timed from the write of `Connect` to the
//! `PeerReady` that comes back after the camera answered its introduction.

use std::net::SocketAddr;
use std::time::Duration;

use peercam_certs::Role;
use peercam_common::frame;
use peercam_common::quic;
use peercam_common::rdv::{self, FromRendezvous, ToRendezvous};
use peercam_common::tls::{self, Expect};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::fleet::camera_id;
use crate::Pki;

/// Jobs queued per viewer connection before the dispatcher counts it as saturated.
const QUEUE: usize = 64;

/// What the connect phase measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Brokering {
    /// Connects dispatched.
    pub sent: u64,
    /// Answered with `PeerReady`.
    pub ok: u64,
    /// Answered otherwise (refused, error) or the connection failed.
    pub failed: u64,
    /// Not sent because every viewer connection was busy.
    pub saturated: u64,
    /// Latency percentiles of the `PeerReady` answers, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// A few of the failures seen.
    pub errors: Vec<String>,
}

/// Runs `rate` connects per second for `duration` over `conns` viewer connections, each
/// for a random one of `cameras` cameras.
pub async fn run(
    pki: &Pki,
    viewer: &str,
    rdv: SocketAddr,
    conns: usize,
    cameras: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Brokering> {
    let creds = pki.creds(Role::Viewer, viewer);
    let tls = tls::client_config(&creds, &pki.trust(), Expect::Rendezvous, rdv::ALPN)?;
    let config = quic::quic_client(tls, quic::rendezvous_transport())?;
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let mut workers = JoinSet::new();
    let mut queues = Vec::new();
    for _ in 0..conns.max(1) {
        let conn = ep.connect_with(config.clone(), rdv, "127.0.0.1")?.await?;
        let (send, recv) = conn.open_bi().await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        queues.push(tx);
        workers.spawn(worker(conn, send, recv, rx));
    }
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let mut out = Brokering::default();
    let start = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let camera = rand::random_range(0..cameras.max(1));
        let queue = &queues[i as usize % queues.len()];
        match queue.try_send(camera) {
            Ok(()) => out.sent += 1,
            Err(_) => out.saturated += 1,
        }
    }
    drop(queues);
    let mut latencies = Vec::new();
    while let Some(done) = workers.join_next().await {
        let done = done?;
        latencies.extend(done.latencies);
        out.failed += done.failed;
        for e in done.errors {
            if out.errors.len() < 8 {
                out.errors.push(e);
            }
        }
    }
    ep.close(0u32.into(), b"done");
    out.ok = latencies.len() as u64;
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        let i = ((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    (out.p50_ms, out.p99_ms, out.max_ms) = (pct(0.50), pct(0.99), pct(1.0));
    Ok(out)
}

struct Done {
    latencies: Vec<Duration>,
    failed: u64,
    errors: Vec<String>,
}

async fn worker(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut jobs: mpsc::Receiver<usize>,
) -> Done {
    let mut done = Done {
        latencies: Vec::new(),
        failed: 0,
        errors: Vec::new(),
    };
    while let Some(camera) = jobs.recv().await {
        let ask = ToRendezvous::Connect {
            camera: camera_id(camera),
            local_addrs: Vec::new(),
        };
        let t0 = Instant::now();
        let answer = match frame::write(&mut send, &ask).await {
            Ok(()) => frame::read::<FromRendezvous, _>(&mut recv).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Some(FromRendezvous::PeerReady { .. })) => done.latencies.push(t0.elapsed()),
            other => {
                done.failed += 1;
                if done.errors.len() < 4 {
                    done.errors
                        .push(format!("{other:?} ({:?})", conn.close_reason()));
                }
            }
        }
    }
    conn.close(0u32.into(), b"done");
    done
}
