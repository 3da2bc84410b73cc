//! Video sources: an Annex B file paced at its frame rate (optionally looped) and Annex B
//! on stdin. Each turns bytes into timestamped frames and publishes them to the
//! [`Fanout`]; none of them knows about viewers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use peercam_common::h264::{self, AccessUnit, AnnexBReader, H264Error};
use peercam_common::media::{Frame, StreamInfo};
use peercam_common::unix_micros;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::fanout::Fanout;

/// 90 kHz, the RTP/MPEG clock for video timestamps.
pub const TIMESCALE: u32 = 90_000;
/// Frame rate assumed when neither the stream nor the configuration says.
pub const DEFAULT_FPS: f64 = 25.0;

/// Where the video comes from.
#[derive(Clone, PartialEq)]
pub enum SourceSpec {
    /// An Annex B H.264 file, sent at its frame rate.
    File {
        /// The file.
        path: PathBuf,
        /// Start again at the end.
        looped: bool,
        /// Frame rate override (else from the SPS, else 25).
        fps: Option<f64>,
    },
    /// Annex B H.264 on standard input, sent as it arrives.
    Stdin,
    /// A camera's own RTSP server (`rtsp://[user:pass@]host[:port]/path`): H.264 over
    /// RTP/TCP, reconnected with backoff when the server goes away.
    Rtsp(String),
    /// A command (run with `sh -c`) writing Annex B H.264 to its stdout, such as
    /// `libcamera-vid -t 0 --inline -o -` or `ffmpeg ... -f h264 -`; restarted with
    /// backoff whenever it exits.
    Exec(String),
}

// Manual, so that an RTSP password never reaches a log through `{:?}`.
impl std::fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::File { path, looped, fps } => f
                .debug_struct("File")
                .field("path", path)
                .field("looped", looped)
                .field("fps", fps)
                .finish(),
            SourceSpec::Stdin => f.write_str("Stdin"),
            SourceSpec::Rtsp(url) => write!(f, "Rtsp({})", peercam_common::config::redact_url(url)),
            SourceSpec::Exec(command) => write!(f, "Exec({command:?})"),
        }
    }
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be opened or read.
    #[error("cannot read video source {path}")]
    Io {
        /// The source.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The RTSP URL is not usable.
    #[error("bad RTSP source {url}: {why}")]
    Rtsp {
        /// The URL, without credentials.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The bytes are not usable H.264.
    #[error("video source {path} is not usable H.264 Annex B: {source}")]
    H264 {
        /// The source.
        path: String,
        /// Cause.
        source: H264Error,
    },
    /// The source holds no keyframe with parameter sets.
    #[error("video source {0} has no keyframe with SPS/PPS: is it raw H.264 (Annex B)? Convert with `ffmpeg -i IN -c:v libx264 -bsf:v h264_mp4toannexb -f h264 OUT.h264`")]
    NoKeyframe(String),
}

/// Turns access units into frames: parameter sets before every IDR, stream info for the
/// fan-out, timestamps.
#[derive(Debug)]
pub(crate) struct Framer {
    fanout: Arc<Fanout>,
    sps: Option<Bytes>,
    pps: Option<Bytes>,
    fps_override: Option<f64>,
    fps: f64,
}

impl Framer {
    fn new(fanout: Arc<Fanout>, fps_override: Option<f64>) -> Self {
        Framer {
            fanout,
            sps: None,
            pps: None,
            fps_override,
            fps: fps_override.unwrap_or(DEFAULT_FPS),
        }
    }

    /// Whether parameter sets have been seen, so frames can be decoded.
    fn ready(&self) -> bool {
        self.sps.is_some() && self.pps.is_some()
    }

    /// Publishes one access unit with `pts`; returns false if it was dropped.
    pub(crate) fn publish(&mut self, au: AccessUnit, pts: u64) -> bool {
        if au.has_parameter_sets {
            match h264::stream_params(&au) {
                Ok(p) => {
                    self.fps = self.fps_override.or(p.fps).unwrap_or(DEFAULT_FPS);
                    self.fanout.set_info(StreamInfo {
                        codec: "h264".into(),
                        width: p.width,
                        height: p.height,
                        timescale: TIMESCALE,
                        fps_milli: (self.fps * 1000.0).round() as u32,
                        sps: p.sps.to_vec(),
                        pps: p.pps.to_vec(),
                    });
                    self.sps = Some(p.sps);
                    self.pps = Some(p.pps);
                }
                Err(e) => warn!(error = %e, "ignoring unreadable parameter sets"),
            }
        }
        let au = match (&self.sps, &self.pps) {
            (Some(sps), Some(pps)) => h264::with_parameter_sets(&au, sps, pps),
            // Nothing is decodable before the first parameter sets.
            _ => return false,
        };
        self.fanout.publish(Frame {
            pts,
            capture_us: unix_micros(),
            keyframe: au.is_idr,
            data: au.data,
        });
        true
    }
}

/// Runs a source until it ends, fails or `cancel` fires.
pub async fn run(
    spec: SourceSpec,
    fanout: Arc<Fanout>,
    cancel: CancellationToken,
) -> Result<(), SourceError> {
    match spec {
        SourceSpec::File { path, looped, fps } => {
            let name = path.display().to_string();
            tokio::select! {
                r = run_file(path, looped, Framer::new(fanout, fps)) => r,
                _ = cancel.cancelled() => Ok(()),
            }
            .inspect(|_| info!(source = %name, "source ended"))
        }
        SourceSpec::Stdin => {
            let mut framer = Framer::new(fanout, None);
            tokio::select! {
                r = run_live(tokio::io::stdin(), "stdin", &mut framer) => r,
                _ = cancel.cancelled() => Ok(()),
            }
        }
        SourceSpec::Rtsp(url) => tokio::select! {
            r = crate::rtsp::run(&url, Framer::new(fanout, None)) => r,
            _ = cancel.cancelled() => Ok(()),
        },
        SourceSpec::Exec(command) => tokio::select! {
            r = run_exec(&command, fanout) => r,
            _ = cancel.cancelled() => Ok(()),
        },
    }
}

/// A command that ran at least this long counts as healthy: its next restart is quick.
const EXEC_HEALTHY: Duration = Duration::from_secs(10);

/// Runs `command` and streams its stdout; restarts it with backoff when it exits. Only a
/// command that cannot be started at all ends the source.
async fn run_exec(command: &str, fanout: Arc<Fanout>) -> Result<(), SourceError> {
    let name = format!("exec:{command}");
    let mut backoff =
        peercam_common::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    // Stream parameters and keyframes carry over: a restarted command goes on the same
    // stream, and viewers resume at its first keyframe.
    let mut framer = Framer::new(fanout, None);
    loop {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SourceError::Io {
                path: name.clone(),
                source,
            })?;
        let started = Instant::now();
        info!(source = %name, pid = child.id(), "video command started");
        if let Some(stdout) = child.stdout.take() {
            if let Err(e) = run_live(stdout, &name, &mut framer).await {
                warn!(source = %name, error = %e, "reading the video command failed");
            }
        }
        let status = child.wait().await;
        if started.elapsed() > EXEC_HEALTHY {
            backoff.reset();
        }
        let delay = backoff.next_delay(rand::random::<f64>().max(0.2));
        warn!(source = %name, ?status, ?delay, "video command exited; restarting");
        tokio::time::sleep(delay).await;
    }
}

async fn run_file(path: PathBuf, looped: bool, mut framer: Framer) -> Result<(), SourceError> {
    let name = path.display().to_string();
    let io = |source| SourceError::Io {
        path: name.clone(),
        source,
    };
    // Read as it plays, not into memory at once: a camera has tens of megabytes, a
    // recording can have gigabytes.
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for pass in 0u64.. {
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let mut reader = AnnexBReader::new();
        let sent_before = sent;
        loop {
            let n = file.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                while let Some(au) = reader.finish() {
                    play(&mut framer, au, start, &mut sent).await;
                }
                break;
            }
            if let Err(e) = reader.push(&buf[..n]) {
                warn!(source = %name, error = %e, "dropped a damaged access unit");
            }
            while let Some(au) = reader.next_access_unit() {
                play(&mut framer, au, start, &mut sent).await;
            }
        }
        if sent == sent_before {
            return Err(SourceError::NoKeyframe(name));
        }
        if pass == 0 {
            info!(source = %name, frames = sent, looped, "streamed file once");
        }
        if !looped {
            return Ok(());
        }
    }
    Ok(())
}

/// Publishes one access unit of a file at its time; frames that cannot be decoded yet
/// (before the first parameter sets) are dropped without waiting.
async fn play(framer: &mut Framer, au: AccessUnit, start: Instant, sent: &mut u64) {
    if !(au.has_parameter_sets || framer.ready()) {
        return;
    }
    let at = start + Duration::from_secs_f64(*sent as f64 / framer.fps);
    tokio::time::sleep_until(at).await;
    let pts = (*sent as f64 * TIMESCALE as f64 / framer.fps).round() as u64;
    if framer.publish(au, pts) {
        *sent += 1;
    }
}

/// Reads a live Annex B stream; frames go out as they complete.
pub(crate) async fn run_live<R: AsyncRead + Unpin>(
    mut input: R,
    name: &str,
    framer: &mut Framer,
) -> Result<(), SourceError> {
    let mut reader = AnnexBReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    loop {
        let n = input
            .read(&mut buf)
            .await
            .map_err(|source| SourceError::Io {
                path: name.to_string(),
                source,
            })?;
        if n == 0 {
            while let Some(au) = reader.finish() {
                framer.publish(au, pts_now(start));
            }
            info!(source = name, "input ended");
            return Ok(());
        }
        if let Err(e) = reader.push(&buf[..n]) {
            warn!(source = name, error = %e, "dropped a damaged access unit");
        }
        while let Some(au) = reader.next_access_unit() {
            framer.publish(au, pts_now(start));
        }
    }
}

fn pts_now(start: Instant) -> u64 {
    (start.elapsed().as_secs_f64() * TIMESCALE as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/sample.h264"
    ));

    #[tokio::test]
    async fn live_input_publishes_every_frame_with_info() {
        let fanout = Arc::new(Fanout::new());
        let mut sub = fanout.subscribe();
        run_live(SAMPLE, "sample", &mut Framer::new(fanout.clone(), None))
            .await
            .expect("runs");
        let info = fanout.info().await.expect("info");
        assert_eq!(
            (info.width, info.height, info.fps_milli),
            (640, 360, 25_000)
        );
        let mut n = 0;
        let mut keys = 0;
        while let Ok(p) = sub.live.try_recv() {
            n += 1;
            keys += p.frame.keyframe as usize;
        }
        assert_eq!((n, keys), (100, 4));
    }

    #[tokio::test]
    async fn file_without_keyframe_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("peercam-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("junk.h264");
        std::fs::write(&path, b"this is not video").expect("write");
        let err = run(
            SourceSpec::File {
                path,
                looped: false,
                fps: None,
            },
            Arc::new(Fanout::new()),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no keyframe"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
