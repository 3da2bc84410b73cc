//! The live-video benchmark: peercam against one ordered stream on the same impaired link.
//!
//! For each condition, the real `camera-agent` binary (a child process, so its CPU time and
//! peak RSS are its own) streams a looped clip through an in-process rendezvous to an
//! in-process viewer whose socket carries the [`Impairment`]. The baseline sends the same
//! clip, paced the same, over **one** ordered QUIC stream with the same TLS, transport and
//! impairment, as RTSP-over-TCP and most camera SDKs do: it never skips, it starts at the
//! next keyframe (no GOP cache), and its frames queue behind each other.
//!
//! Latency is capture → received on one machine (one clock). Delivered share counts frames
//! captured in the measured window (all but the last 1.5 s) that arrived.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use peercam_certs::Role;
use peercam_common::h264::split_access_units;
use peercam_common::impair::Impairment;
use peercam_common::media::{FrameHeader, FLAG_KEYFRAME, MAX_FRAME_PAYLOAD};
use peercam_common::{quic, tls, unix_micros};
use quinn::VarInt;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::lab::{run_checked, KillOnDrop};
use crate::load::process::Sample as ProcSample;
use crate::tcp_baseline;
use crate::tunlink::{TunLink, ADDR_A};
use crate::{start_rendezvous, viewer_config, Pki};

/// Frames per second of every benchmark clip.
pub const FPS: u32 = 25;
/// Frames at the end of a run not counted in the delivered share: still in flight.
const TAIL: Duration = Duration::from_millis(1500);

/// A test clip, encoded once with ffmpeg and cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Clip {
    /// 1280×720, 4 Mbit/s, 1 s GOP.
    Hd4M,
    /// 3840×2160, 20 Mbit/s, 1 s GOP.
    Uhd20M,
}

impl Clip {
    /// Nominal bitrate in bits per second.
    pub fn bitrate(self) -> u64 {
        match self {
            Clip::Hd4M => 4_000_000,
            Clip::Uhd20M => 20_000_000,
        }
    }

    /// Encodes the clip into `dir` unless it is there; returns its path.
    pub fn ensure(self, dir: &Path) -> Result<PathBuf, String> {
        let (name, size, secs) = match self {
            Clip::Hd4M => ("hd-4mbit-steady.h264", "1280x720", 10),
            Clip::Uhd20M => ("uhd-20mbit-steady.h264", "3840x2160", 4),
        };
        let path = dir.join(name);
        // One encoder at a time in this process; tests ask for the same clip at once.
        static ENCODING: Mutex<()> = Mutex::new(());
        let _one = ENCODING.lock().unwrap_or_else(|p| p.into_inner());
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let rate = format!("{}k", self.bitrate() / 1000);
        let src = format!("testsrc2=size={size}:rate={FPS}");
        let tmp = dir.join(format!("{name}.{}.part", std::process::id()));
        // Noise makes the picture hard to compress, so the encoder really spends the bitrate.
        let status = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "lavfi", "-i", &src, "-t"])
            .arg((secs + 1).to_string())
            .args(["-vf", "noise=alls=30:allf=t", "-c:v", "libx264", "-preset"])
            .args([
                "ultrafast",
                "-tune",
                "zerolatency",
                "-b:v",
                &rate,
                "-maxrate",
            ])
            .args([
                &rate, "-bufsize", &rate, "-g", "25", "-bf", "0", "-f", "h264",
            ])
            .arg(&tmp)
            .status()
            .map_err(|e| format!("cannot run ffmpeg (install ffmpeg): {e}"))?;
        if !status.success() {
            return Err(format!("ffmpeg failed to encode {name}"));
        }
        // x264 starts with a full rate-control buffer, so the first keyframe of a run is
        // ~7× the size of the others (344 KB against ~50 KB here). A camera's encoder runs
        // for days; a clip that loops its first second would put that frame on the wire
        // every loop. So the clip starts at its second GOP, as a running camera's would.
        let encoded = std::fs::read(&tmp).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&tmp);
        let units = split_access_units(&encoded).map_err(|e| e.to_string())?;
        let second_gop = units
            .iter()
            .skip(1)
            .position(|au| au.is_idr && au.has_parameter_sets)
            .ok_or("ffmpeg wrote a clip with a single GOP")?;
        let steady: Vec<u8> = units[second_gop + 1..]
            .iter()
            .flat_map(|au| au.data.iter().copied())
            .collect();
        std::fs::write(&tmp, steady).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        Ok(path)
    }
}

/// One link condition.
#[derive(Debug, Clone, Serialize)]
pub struct Condition {
    /// Short name.
    pub name: String,
    /// The impairment on the viewer's socket, as a spec.
    pub link: String,
    /// The clip.
    pub clip: Clip,
    /// Length of the measured session.
    pub secs: u64,
    /// Time-to-first-frame samples per kind (cold, warm).
    pub ttff_samples: usize,
}

impl Condition {
    fn impairment(&self) -> Impairment {
        self.link.parse().unwrap_or_default()
    }
}

/// The conditions the issue names. `scale` shortens sessions (1.0 = full length).
pub fn conditions(scale: f64) -> Vec<Condition> {
    let secs = |s: u64| ((s as f64 * scale).round() as u64).max(4);
    let half = Clip::Hd4M.bitrate() / 2 / 1000;
    let c = |name: &str, link: String, clip, s, n| Condition {
        name: name.into(),
        link,
        clip,
        secs: secs(s),
        ttff_samples: n,
    };
    vec![
        c("rtt50", "rtt=50ms".into(), Clip::Hd4M, 20, 5),
        c("rtt50-loss1", "rtt=50ms,loss=1%".into(), Clip::Hd4M, 20, 5),
        c("rtt50-loss5", "rtt=50ms,loss=5%".into(), Clip::Hd4M, 30, 5),
        c(
            "rtt150-loss2",
            "rtt=150ms,loss=2%".into(),
            Clip::Hd4M,
            20,
            5,
        ),
        c(
            "half-capacity",
            format!("rtt=50ms,rate={half}kbit,queue=200ms"),
            Clip::Hd4M,
            60,
            1,
        ),
        c("4k-clean", "rtt=20ms".into(), Clip::Uhd20M, 10, 1),
    ]
}

/// What one side (peercam or the baseline) achieved under one condition.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// Time to first frame of a viewer started cold, median of the samples, ms.
    pub ttff_cold_ms: Option<f64>,
    /// Worst cold sample, ms.
    pub ttff_cold_max_ms: Option<f64>,
    /// Time to first frame of a viewer already connected to the rendezvous, median, ms.
    pub ttff_warm_ms: Option<f64>,
    /// Frame latency percentiles of delivered live frames, ms.
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile.
    pub latency_p99_ms: Option<f64>,
    /// Largest.
    pub latency_max_ms: Option<f64>,
    /// p99 over frames received in the first 10 s.
    pub first10_p99_ms: Option<f64>,
    /// p99 over frames received in the last 10 s.
    pub last10_p99_ms: Option<f64>,
    /// Share of frames captured in the window that arrived.
    pub delivered: f64,
    /// Live frames received.
    pub frames: u64,
    /// GOPs skipped (abandoned or reset).
    pub gops_skipped: u64,
    /// Frames (blocks of large ones) rebuilt from parity datagrams (peercam only).
    pub repaired: u64,
    /// Sender CPU seconds over the session (camera-agent only).
    pub sender_cpu_s: Option<f64>,
    /// The same as a share of one core.
    pub sender_cpu_pct: Option<f64>,
    /// Sender peak RSS, KiB (camera-agent only).
    pub sender_peak_rss_kib: Option<u64>,
    /// Why the measured session ended.
    pub ended: Option<String>,
    /// Set if the run failed.
    pub error: Option<String>,
    /// Set if the side was not run, saying why (e.g. it needs root).
    pub skipped: Option<String>,
}

/// One condition, every side.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The condition.
    pub condition: Condition,
    /// peercam.
    pub peercam: Outcome,
    /// One ordered stream with TCP's congestion control (Cubic, 10-packet initial window):
    /// what RTSP over TCP does.
    pub baseline: Outcome,
    /// One ordered stream with peercam's own transport (BBR): shows what the GOP streams
    /// add on top of the congestion controller.
    pub baseline_bbr: Outcome,
    /// One real kernel TCP connection between two namespaces over an impaired TUN link
    /// ([`run_baseline_tcp`]): RTSP over TCP as deployed. Needs root.
    pub baseline_tcp: Outcome,
}

/// Which ordered-stream baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Cubic with a 10-packet initial window, like TCP.
    TcpLike,
    /// peercam's media transport.
    SameTransport,
}

impl Baseline {
    fn transport(self) -> quinn::TransportConfig {
        let mut t = quic::media_transport(None);
        if self == Baseline::TcpLike {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
        t
    }
}

/// A received frame: when (since the session started), its capture time and latency.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    capture_us: u64,
    latency: Duration,
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn p99_where(samples: &[Sample], keep: impl Fn(&Sample) -> bool) -> Option<f64> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| keep(s))
        .map(|s| ms(s.latency))
        .collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.99)
}

/// Fills latency, window and delivery figures from the received frames of a session that
/// ran from `start_us` (wall clock) for `length`.
fn fill(out: &mut Outcome, samples: &[Sample], start_us: u64, length: Duration) {
    let mut lat: Vec<f64> = samples.iter().map(|s| ms(s.latency)).collect();
    lat.sort_by(f64::total_cmp);
    out.latency_p50_ms = percentile(&lat, 0.5);
    out.latency_p99_ms = percentile(&lat, 0.99);
    out.latency_max_ms = lat.last().copied();
    out.frames = samples.len() as u64;
    let end = samples.iter().map(|s| s.at).max().unwrap_or_default();
    if length >= Duration::from_secs(20) {
        let ten = Duration::from_secs(10);
        out.first10_p99_ms = p99_where(samples, |s| s.at < ten);
        out.last10_p99_ms = p99_where(samples, |s| s.at + ten >= end);
    }
    // Frames captured from the first received live frame's capture to the end of the
    // window; each source frame is 1/FPS apart.
    let Some(first) = samples.iter().map(|s| s.capture_us).min() else {
        return;
    };
    let window_end = start_us + (length.saturating_sub(TAIL)).as_micros() as u64;
    if window_end <= first {
        return;
    }
    let expected = ((window_end - first) as f64 / 1e6 * FPS as f64).floor() + 1.0;
    let got = samples
        .iter()
        .filter(|s| s.capture_us >= first && s.capture_us <= window_end)
        .count() as f64;
    out.delivered = (got / expected).min(1.0);
}

/// A camera-agent child process, killed on drop.
struct CameraProcess {
    child: std::process::Child,
}

impl Drop for CameraProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs peercam under one condition.
pub async fn run_peercam(cond: &Condition, clip: &Path, camera_bin: &Path) -> Outcome {
    match peercam_side(cond, clip, camera_bin).await {
        Ok(o) => o,
        Err(e) => Outcome {
            error: Some(e),
            ..Outcome::default()
        },
    }
}

async fn peercam_side(cond: &Condition, clip: &Path, camera_bin: &Path) -> Result<Outcome, String> {
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, crate::any_port()).await;
    let (cert, key) = pki.files(Role::Camera, "bench-cam");
    let dir = pki.dir.path();
    let toml = format!(
        "rendezvous = [\"127.0.0.1:{port}\"]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
         access = [\"bench-viewer\"]\nsource = {clip:?}\nloop = true\nfps = {FPS}\n\
         bind = \"127.0.0.1:0\"\n",
        port = rdv.local_addr().port(),
        ca = pki.ca_path(),
    );
    let config = dir.join("camera.toml");
    std::fs::write(&config, toml).map_err(|e| e.to_string())?;
    let child = std::process::Command::new(camera_bin)
        .arg("--config")
        .arg(&config)
        .arg("--status-socket")
        .arg(dir.join("status.sock"))
        .env(
            "RUST_LOG",
            std::env::var("LIVE_BENCH_CAMERA_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create("/tmp/live-bench-camera.log").map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", camera_bin.display()))?;
    let camera = CameraProcess { child };
    let pid = camera.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rdv.cameras_online() == 0 {
        if Instant::now() > deadline {
            return Err("the camera-agent did not register within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = {
        let mut c = viewer_config(&pki, "bench-viewer", rdv.local_addr(), "bench-cam");
        c.impairment = Some(cond.impairment());
        c.connect_timeout = Duration::from_secs(5);
        c.max_frames = Some(1);
        c
    };
    // Let the camera's GOP cache fill, as it would be for a camera that runs all day.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut out = Outcome::default();
    let (cold, warm) = ttff_samples(&base, cond.ttff_samples).await?;
    out.ttff_cold_ms = median(&cold);
    out.ttff_cold_max_ms = cold.iter().copied().reduce(f64::max);
    out.ttff_warm_ms = median(&warm);
    // The measured session.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let mut config = base.clone();
    config.max_frames = None;
    config.duration = Some(Duration::from_secs(cond.secs));
    let session_start = Instant::now();
    let start_us = unix_micros();
    let sink = samples.clone();
    config.frame_hook = Some(peercam_viewer::FrameHook(Arc::new(move |f| {
        // One machine, one clock: the true latency, not the viewer's estimate.
        if f.latency.is_some() {
            let now = unix_micros();
            let s = Sample {
                at: session_start.elapsed(),
                capture_us: f.header.capture_us,
                latency: Duration::from_micros(now.saturating_sub(f.header.capture_us)),
            };
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        }
    })));
    let before = ProcSample::of(pid).ok();
    let summary = peercam_viewer::watch(config, CancellationToken::new())
        .await
        .map_err(|e| format!("viewer: {e}"))?;
    let wall = session_start.elapsed();
    let after = ProcSample::of(pid).ok();
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    fill(&mut out, &samples, start_us, Duration::from_secs(cond.secs));
    out.gops_skipped = summary.gops_dropped;
    out.repaired = summary.repaired;
    out.ended = Some(format!(
        "{} after {:.1} s",
        summary.ended, summary.duration_s
    ));
    dump(&cond.name, "peercam", &samples);
    if let (Some(before), Some(after)) = (before, after) {
        let cpu = after.cpu_secs - before.cpu_secs;
        out.sender_cpu_s = Some(cpu);
        out.sender_cpu_pct = Some(cpu / wall.as_secs_f64() * 100.0);
        out.sender_peak_rss_kib = Some(after.hwm_kib);
    }
    drop(camera);
    rdv.shutdown();
    rdv.join().await;
    Ok(out)
}

/// With `LIVE_BENCH_DUMP=DIR`, writes every received frame as CSV (receive time, latency).
fn dump(cond: &str, side: &str, samples: &[Sample]) {
    let Some(dir) = std::env::var_os("LIVE_BENCH_DUMP") else {
        return;
    };
    let text: String = samples
        .iter()
        .map(|s| format!("{:.3},{:.1}\n", s.at.as_secs_f64(), ms(s.latency)))
        .collect();
    let _ = std::fs::write(Path::new(&dir).join(format!("{cond}-{side}.csv")), text);
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Cold and warm time-to-first-frame samples, alternating.
async fn ttff_samples(
    base: &peercam_viewer::Config,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..n {
        let s = peercam_viewer::watch(base.clone(), CancellationToken::new())
            .await
            .map_err(|e| format!("cold viewer: {e}"))?;
        cold.extend(s.ttff_ms);
        let client = peercam_viewer::Client::connect(base)
            .await
            .map_err(|e| format!("warm viewer: {e}"))?;
        // Connected to the rendezvous; the user picks the camera a moment later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = client
            .watch(base.clone(), CancellationToken::new())
            .await
            .map_err(|e| format!("warm viewer: {e}"))?;
        warm.extend(s.ttff_ms);
        // The camera limits introductions per second; stay under it.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok((cold, warm))
}

/// Runs the baseline under one condition.
pub async fn run_baseline(cond: &Condition, clip: &Path, kind: Baseline) -> Outcome {
    match baseline_side(cond, clip, kind).await {
        Ok(o) => o,
        Err(e) => Outcome {
            error: Some(e),
            ..Outcome::default()
        },
    }
}

/// Frames of the clip, in order, each with its keyframe flag.
pub(crate) fn load_frames(clip: &Path) -> Result<Vec<(bool, Bytes)>, String> {
    let data = std::fs::read(clip).map_err(|e| format!("{}: {e}", clip.display()))?;
    let aus = split_access_units(&data).map_err(|e| e.to_string())?;
    Ok(aus.into_iter().map(|a| (a.is_idr, a.data)).collect())
}

/// A frame as captured by the baseline's camera.
pub(crate) struct Captured {
    pub(crate) keyframe: bool,
    pub(crate) capture_us: u64,
    pub(crate) data: Bytes,
}

impl Captured {
    /// The frame's header on an ordered baseline stream (no presentation time).
    pub(crate) fn header(&self) -> FrameHeader {
        FrameHeader {
            len: self.data.len() as u32,
            flags: if self.keyframe { FLAG_KEYFRAME } else { 0 },
            pts: 0,
            capture_us: self.capture_us,
        }
    }
}

/// The baseline camera: captures the looped clip at `FPS` from the moment it starts, like a
/// camera, and sends it to one viewer on one ordered stream from the next keyframe on.
async fn baseline_sender(
    endpoint: quinn::Endpoint,
    frames: Arc<Vec<(bool, Bytes)>>,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<Captured>(100_000);
    let capture = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / FPS);
        for (keyframe, data) in frames.iter().cycle() {
            tick.tick().await;
            let f = Captured {
                keyframe: *keyframe,
                capture_us: unix_micros(),
                data: data.clone(),
            };
            // Frames captured while nobody watches are dropped, as a camera's encoder
            // output is.
            let _ = tx.try_send(f);
        }
    };
    let serve = async move {
        let Some(incoming) = endpoint.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        while rx.try_recv().is_ok() {}
        let Ok(mut stream) = conn.open_uni().await else {
            return;
        };
        let mut started = false;
        while let Some(f) = rx.recv().await {
            started |= f.keyframe;
            if !started {
                continue;
            }
            if stream.write_all(&f.header().encode()).await.is_err()
                || stream.write_chunk(f.data).await.is_err()
            {
                return;
            }
        }
    };
    tokio::select! {
        _ = capture => {}
        _ = serve => {}
        _ = cancel.cancelled() => {}
    }
}

async fn baseline_side(cond: &Condition, clip: &Path, kind: Baseline) -> Result<Outcome, String> {
    let pki = Pki::new();
    let frames = Arc::new(load_frames(clip)?);
    let cam = pki.creds(Role::Camera, "bench-cam");
    let viewer = pki.creds(Role::Viewer, "bench-viewer");
    let trust = pki.trust();
    let alpn = b"peercam-bench-baseline/1";
    let server_tls =
        tls::server_config(&cam, &trust, &[Role::Viewer], alpn).map_err(|e| e.to_string())?;
    let server =
        quic::quic_server(server_tls, quic::media_transport(None)).map_err(|e| e.to_string())?;
    let cancel = CancellationToken::new();
    let mut out = Outcome::default();
    let mut cold = Vec::new();
    let mut samples = Vec::new();
    let mut start_us = 0;
    for round in 0..cond.ttff_samples.max(1) {
        let last = round + 1 == cond.ttff_samples.max(1);
        let ep = quic::bind_endpoint(crate::any_port(), Some(server.clone()))
            .map_err(|e| e.to_string())?
            .endpoint;
        let addr = ep.local_addr().map_err(|e| e.to_string())?;
        let _sender = AbortOnDropHandle::new(tokio::spawn(baseline_sender(
            ep,
            frames.clone(),
            cancel.child_token(),
        )));
        // The camera has been running a while when the viewer arrives.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let expect = tls::Expect::Exactly(
            peercam_certs::Identity::new(Role::Camera, "bench-cam").map_err(|e| e.to_string())?,
        );
        let client_tls =
            tls::client_config(&viewer, &trust, expect, alpn).map_err(|e| e.to_string())?;
        let client = quic::quic_client(client_tls, kind.transport()).map_err(|e| e.to_string())?;
        let shared = quic::bind_endpoint_with(crate::any_port(), None, Some(cond.impairment()))
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        start_us = unix_micros();
        let conn = shared
            .endpoint
            .connect_with(client, addr, "camera.peercam.invalid")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("baseline connect: {e}"))?;
        let length = if last {
            Duration::from_secs(cond.secs)
        } else {
            Duration::from_secs(3)
        };
        let got = tokio::time::timeout(length, receive_ordered(&conn, started, &mut samples)).await;
        if let Ok(Err(e)) = got {
            return Err(format!("baseline stream: {e}"));
        }
        conn.close(VarInt::from_u32(0), b"done");
        if let Some(first) = samples.first() {
            cold.push(ms(first.at));
        }
        if !last {
            samples.clear();
        }
    }
    cancel.cancel();
    dump(&cond.name, &format!("baseline-{kind:?}"), &samples);
    out.ttff_cold_ms = median(&cold);
    out.ttff_cold_max_ms = cold.iter().copied().reduce(f64::max);
    fill(&mut out, &samples, start_us, Duration::from_secs(cond.secs));
    Ok(out)
}

/// Reads frames from the one ordered QUIC stream until it ends.
async fn receive_ordered(
    conn: &quinn::Connection,
    started: Instant,
    samples: &mut Vec<Sample>,
) -> Result<(), String> {
    let stream = conn.accept_uni().await.map_err(|e| e.to_string())?;
    read_ordered(stream, |h, now| {
        samples.push(Sample {
            at: started.elapsed(),
            capture_us: h.capture_us,
            latency: Duration::from_micros(now.saturating_sub(h.capture_us)),
        })
    })
    .await
}

/// Reads [`FrameHeader`]-framed frames from one ordered byte stream (a QUIC stream, a TCP
/// connection) until it ends, calling `seen` with each header and its receive time (µs
/// since the Unix epoch).
pub(crate) async fn read_ordered<R: AsyncRead + Unpin>(
    mut input: R,
    mut seen: impl FnMut(&FrameHeader, u64),
) -> Result<(), String> {
    let mut header = [0u8; FrameHeader::LEN];
    let mut buf = Vec::new();
    loop {
        if input.read_exact(&mut header).await.is_err() {
            return Ok(());
        }
        let h = FrameHeader::decode(&header).map_err(|e| e.to_string())?;
        if h.len as usize > MAX_FRAME_PAYLOAD {
            return Err("frame too large".into());
        }
        buf.resize(h.len as usize, 0);
        input
            .read_exact(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        seen(&h, unix_micros());
    }
}

/// Runs the kernel-TCP baseline under one condition: `live-bench tcp-send` in one namespace
/// of a [`TunLink`] carrying the condition's impairment, `live-bench tcp-recv` in the other
/// (see [`crate::tcp_baseline`]). Skipped, saying why, when not root.
pub async fn run_baseline_tcp(cond: &Condition, clip: &Path) -> Outcome {
    if let Err(why) = crate::lab::require_root() {
        return Outcome {
            skipped: Some(why),
            ..Outcome::default()
        };
    }
    match tcp_side(cond, clip).await {
        Ok(o) => o,
        Err(e) => Outcome {
            error: Some(e),
            ..Outcome::default()
        },
    }
}

/// The `live-bench` binary (the one running, or the one next to this test binary).
fn bench_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    if exe.file_stem().is_some_and(|n| n == "live-bench") {
        return Ok(exe);
    }
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("live-bench"))
        .find(|p| p.exists())
        .ok_or_else(|| "live-bench not found: run `cargo build --workspace --bins` first".into())
}

async fn tcp_side(cond: &Condition, clip: &Path) -> Result<Outcome, String> {
    let exe = bench_exe()?;
    let clip = clip
        .canonicalize()
        .map_err(|e| format!("{}: {e}", clip.display()))?;
    crate::lab::sweep_stale();
    let link = TunLink::build(cond.impairment())?;
    let rounds = cond.ttff_samples.max(1);
    let lifetime = cond.secs + 10 + 5 * rounds as u64;
    let mut sender = link.command(link.ns_a(), &exe);
    sender
        .args([
            "tcp-send",
            "--listen",
            &format!("{ADDR_A}:{}", tcp_baseline::PORT),
        ])
        .arg("--clip")
        .arg(&clip)
        .args(["--for", &lifetime.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    let _sender = KillOnDrop::spawn(&mut sender).map_err(|e| e.to_string())?;
    // The camera has been running a while when the viewer arrives.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut out = Outcome::default();
    let mut cold = Vec::new();
    for round in 0..rounds {
        let last = round + 1 == rounds;
        let length = if last { cond.secs } else { 3 };
        let mut recv = link.command(link.ns_b(), &exe);
        recv.args([
            "tcp-recv",
            "--connect",
            &format!("{ADDR_A}:{}", tcp_baseline::PORT),
        ])
        .args(["--for", &length.to_string()]);
        let report = tokio::task::spawn_blocking(move || {
            run_checked(&mut recv, None, Duration::from_secs(length + 15))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("tcp receiver: {e}"))?;
        let report: tcp_baseline::Report = serde_json::from_slice(&report.stdout)
            .map_err(|e| format!("tcp receiver printed no report: {e}"))?;
        let samples: Vec<Sample> = report
            .frames
            .iter()
            .map(|&(at, capture_us, latency)| Sample {
                at: Duration::from_micros(at),
                capture_us,
                latency: Duration::from_micros(latency),
            })
            .collect();
        if let Some(first) = samples.first() {
            cold.push(ms(first.at));
        }
        if last {
            dump(&cond.name, "baseline-kernel-tcp", &samples);
            fill(
                &mut out,
                &samples,
                report.start_us,
                Duration::from_secs(cond.secs),
            );
        } else {
            // Let the sender see the viewer leave before the next one arrives.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    out.ttff_cold_ms = median(&cold);
    out.ttff_cold_max_ms = cold.iter().copied().reduce(f64::max);
    drop(link);
    Ok(out)
}

/// Runs every condition, peercam then the baseline.
pub async fn run_all(conds: &[Condition], clips: &Path, camera_bin: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for cond in conds {
        eprintln!("live-bench: {} ({}, {} s)", cond.name, cond.link, cond.secs);
        let clip = match cond.clip.ensure(clips) {
            Ok(p) => p,
            Err(e) => {
                let failed = Outcome {
                    error: Some(e),
                    ..Outcome::default()
                };
                rows.push(Row {
                    condition: cond.clone(),
                    peercam: failed.clone(),
                    baseline: failed.clone(),
                    baseline_bbr: failed.clone(),
                    baseline_tcp: failed,
                });
                continue;
            }
        };
        let peercam = run_peercam(cond, &clip, camera_bin).await;
        let baseline = run_baseline(cond, &clip, Baseline::TcpLike).await;
        let baseline_bbr = run_baseline(cond, &clip, Baseline::SameTransport).await;
        let baseline_tcp = run_baseline_tcp(cond, &clip).await;
        rows.push(Row {
            condition: cond.clone(),
            peercam,
            baseline,
            baseline_bbr,
            baseline_tcp,
        });
    }
    rows
}

fn f(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| condition | side | ttff cold (max) ms | ttff warm ms | p50 ms | p99 ms | max ms | p99 first/last 10 s | delivered | GOPs skipped / rebuilt | camera CPU | camera peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let sides = [
            ("peercam", &r.peercam),
            ("one stream, TCP-like", &r.baseline),
            ("one stream, BBR", &r.baseline_bbr),
            ("one stream, kernel TCP", &r.baseline_tcp),
        ];
        for (side, o) in sides {
            if let Some(why) = &o.skipped {
                s += &format!(
                    "| {} | {side} | skipped: {why} |||||||||||\n",
                    r.condition.name
                );
                continue;
            }
            if let Some(e) = &o.error {
                s += &format!("| {} | {side} | error: {e} |||||||||||\n", r.condition.name);
                continue;
            }
            let windows = match (o.first10_p99_ms, o.last10_p99_ms) {
                (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                _ => "-".into(),
            };
            s += &format!(
                "| {} | {side} | {} ({}) | {} | {} | {} | {} | {windows} | {:.1} % | {} / {} | {} | {} |\n",
                r.condition.name,
                f(o.ttff_cold_ms),
                f(o.ttff_cold_max_ms),
                f(o.ttff_warm_ms),
                f(o.latency_p50_ms),
                f(o.latency_p99_ms),
                f(o.latency_max_ms),
                o.delivered * 100.0,
                o.gops_skipped,
                o.repaired,
                o.sender_cpu_pct
                    .map(|c| format!("{c:.1} %"))
                    .unwrap_or_else(|| "-".into()),
                o.sender_peak_rss_kib
                    .map(|k| format!("{:.1} MB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    s
}
