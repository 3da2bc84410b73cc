//! `cluster-bench`: connect latency through a two-node rendezvous cluster (viewer on node
//! B, cameras on node A, a real `redis-server` between them) next to a single node, on
//! loopback, everything in this process.
//!
//! Usage: cluster-bench [--n SAMPLES] (default 200 per figure)
//!
//! Two figures per set-up: *introduction* is `Connect` → `PeerReady` on an established
//! viewer↔rendezvous connection (the part cluster mode changes); *connect* is what
//! `viewer ping` measures: a fresh socket, the rendezvous handshake, the introduction and
//! the verified QUIC connection to the camera.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use peercam_certs::Role;
use peercam_common::rdv::{self, FromRendezvous, ToRendezvous};
use peercam_common::tls::{self, Expect};
use peercam_common::{frame, quic, CameraId};
use peercam_tests::cluster::{node_limits, RedisServer};
use peercam_tests::{any_port, camera_config, start_rendezvous_with, Pki};

/// Cameras per node: introductions are spread over them so that no camera's own
/// introduction rate limit (16 burst, 4/s) is reached.
const CAMERAS: usize = 20;
/// Pause between samples, for the same reason.
const PACE: Duration = Duration::from_millis(15);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = match args.as_slice() {
        [] => 200,
        [flag, v] if flag == "--n" => match v.parse() {
            Ok(n) if n > 0 => n,
            _ => return usage(),
        },
        _ => return usage(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cluster-bench: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(n)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: cluster-bench [--n SAMPLES]");
    ExitCode::from(2)
}

fn fast_limits() -> peercam_rendezvous::Limits {
    let mut limits = peercam_rendezvous::Limits::default();
    limits.registry.lookup_rate = 1e6;
    limits.registry.lookup_burst = 1e6;
    limits
}

async fn run(n: usize) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let Some(redis) = RedisServer::start_or_skip("cluster-bench") else {
        anyhow::bail!("needs redis-server");
    };
    let pki = Pki::new();
    let cluster_limits = |id: &str| peercam_rendezvous::Limits {
        cluster: node_limits(&redis, id).cluster,
        ..fast_limits()
    };
    let single = start_rendezvous_with(&pki, fast_limits()).await;
    let a = start_rendezvous_with(&pki, cluster_limits("node-a")).await;
    let b = start_rendezvous_with(&pki, cluster_limits("node-b")).await;
    let mut cameras = Vec::new();
    for rdv in [single.local_addr(), a.local_addr()] {
        for i in 0..CAMERAS {
            let id = format!("cam-{i}");
            let config = camera_config(&pki, pki.creds(Role::Camera, &id), rdv, &["bench"]);
            cameras.push(peercam_camera_agent::start(config).await?);
        }
    }
    for cam in &cameras {
        let mut status = cam.watch_status();
        tokio::time::timeout(
            Duration::from_secs(15),
            status.wait_for(|s| s.registered.is_some()),
        )
        .await??;
    }
    println!("cluster-bench: {n} samples per figure, {CAMERAS} cameras per node, loopback\n");
    println!(
        "{:<48} {:>8} {:>8} {:>8} {:>8}",
        "set-up", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let setups = [
        ("single node", single.local_addr()),
        ("cluster, camera on the same node", a.local_addr()),
        ("cluster, cross-node (B -> A)", b.local_addr()),
    ];
    // Samples of the set-ups are interleaved, so that load from elsewhere on the machine
    // weighs on all of them alike.
    let mut intro = vec![Vec::with_capacity(n); setups.len()];
    let mut rdv_conns = Vec::new();
    for (_, rdv) in &setups {
        rdv_conns.push(RdvClient::connect(&pki, *rdv).await?);
    }
    for i in 0..n {
        for (k, client) in rdv_conns.iter_mut().enumerate() {
            intro[k].push(client.introduce(i).await?);
            tokio::time::sleep(PACE).await;
        }
    }
    let mut connect = vec![Vec::with_capacity(n); setups.len()];
    for i in 0..n {
        for (k, (_, rdv)) in setups.iter().enumerate() {
            connect[k].push(probe(&pki, *rdv, i).await?);
            tokio::time::sleep(PACE).await;
        }
    }
    for ((name, _), samples) in setups.iter().zip(intro) {
        row(&format!("{name}: introduction"), samples);
    }
    for ((name, _), samples) in setups.iter().zip(connect) {
        row(&format!("{name}: connect"), samples);
    }
    for cam in &cameras {
        cam.shutdown();
    }
    for rdv in [single, a, b] {
        rdv.shutdown();
        rdv.join().await;
    }
    Ok(())
}

fn camera(i: usize) -> anyhow::Result<CameraId> {
    Ok(CameraId::new(&format!("cam-{}", i % CAMERAS))?)
}

/// A viewer's rendezvous connection, kept open for `Connect` → `PeerReady` round trips.
struct RdvClient {
    endpoint: quinn::Endpoint,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    rdv: SocketAddr,
}

impl RdvClient {
    async fn connect(pki: &Pki, rdv: SocketAddr) -> anyhow::Result<Self> {
        let creds = pki.creds(Role::Viewer, "bench");
        let tls = tls::client_config(&creds, &pki.trust(), Expect::Rendezvous, rdv::ALPN)?;
        let client = quic::quic_client(tls, quic::rendezvous_transport())?;
        let endpoint = quic::bind_endpoint(any_port(), None)?.endpoint;
        let conn = endpoint.connect_with(client, rdv, "127.0.0.1")?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(RdvClient {
            endpoint,
            send,
            recv,
            rdv,
        })
    }

    /// One introduction to camera `i`, in milliseconds.
    async fn introduce(&mut self, i: usize) -> anyhow::Result<f64> {
        let ask = ToRendezvous::Connect {
            camera: camera(i)?,
            local_addrs: vec![self.endpoint.local_addr()?],
        };
        let t = Instant::now();
        frame::write(&mut self.send, &ask).await?;
        let read = frame::read(&mut self.recv);
        let reply = tokio::time::timeout(Duration::from_secs(5), read).await??;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        match reply {
            Some(FromRendezvous::PeerReady { .. }) => Ok(ms),
            other => anyhow::bail!("introduction {i} via {}: {other:?}", self.rdv),
        }
    }
}

/// One `viewer ping` probe to camera `i`: new socket, rendezvous, introduction, camera
/// handshake; start to verified connection in milliseconds.
async fn probe(pki: &Pki, rdv: SocketAddr, i: usize) -> anyhow::Result<f64> {
    let creds = pki.creds(Role::Viewer, "bench");
    let config = peercam_tests::viewer_config_with(pki, creds, rdv, camera(i)?.as_str());
    Ok(peercam_viewer::probe(&config).await?.connect_ms)
}

fn row(name: &str, mut samples: Vec<f64>) {
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples.get(idx).copied().unwrap_or(f64::NAN)
    };
    println!(
        "{name:<48} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0)
    );
}
