//! The kernel-TCP baseline of the live-video benchmark: what RTSP over TCP and most camera
//! SDKs do, one TCP connection carrying every frame in order, never skipping.
//!
//! Two small programs, run as hidden subcommands of `live-bench` inside the namespaces of a
//! [`crate::tunlink::TunLink`] with `ip netns exec`, so each uses its namespace's own kernel
//! TCP stack (Cubic, chosen per socket, and otherwise the kernel's defaults) through the
//! impaired link:
//!
//! - `tcp-send --listen ADDR --clip PATH --for SECS`: the camera. Captures the looped clip
//!   at [`FPS`] from the moment it starts, and serves one viewer at a time, from the next
//!   keyframe on, every frame in order, each as a [`FrameHeader`] plus payload (the same
//!   framing as peercam's GOP streams). `TCP_NODELAY` is set, so Nagle never holds a frame.
//! - `tcp-recv --connect ADDR --for SECS`: the viewer. Connects, reads frames for SECS and
//!   prints a [`Report`] as JSON on stdout: the session start and one sample per frame.
//!
//! Both exit by themselves after SECS (plus a grace for the receiver's connect). One
//! machine, one clock: latency is the receiver's wall clock minus the capture time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peercam_common::unix_micros;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::live::{load_frames, read_ordered, Captured, FPS};

/// The port the sender listens on inside its namespace (RTSP's alternate port).
pub const PORT: u16 = 8554;
/// The sender's congestion controller: Linux's default, which cameras run. Set per socket
/// (root may pick any available one) because a new namespace inherits the host's default
/// and may only change it to one in the host's `tcp_allowed_congestion_control`.
const CONGESTION: &[u8] = b"cubic";
/// How long the receiver keeps trying to connect (the sender may still be starting).
const CONNECT_FOR: Duration = Duration::from_secs(5);
/// Captured frames queued for the viewer at most (the baseline never skips; this only
/// bounds memory, ~7 minutes of video).
const QUEUE: usize = 10_000;

/// What the receiver saw, printed as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Wall clock when the receiver started connecting, µs since the Unix epoch.
    pub start_us: u64,
    /// One per received frame: (µs since the start, capture µs, latency µs).
    pub frames: Vec<(u64, u64, u64)>,
}

/// Parses `--key value` pairs; `None` on anything else.
fn flags<'a>(args: &'a [String], keys: &[&str]) -> Option<Vec<&'a str>> {
    let mut out = vec![None; keys.len()];
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let i = keys.iter().position(|x| k.strip_prefix("--") == Some(*x))?;
        out[i] = Some(it.next()?.as_str());
    }
    out.into_iter().collect()
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start tokio: {e}"))
}

/// `live-bench tcp-send --listen ADDR --clip PATH --for SECS`.
pub fn send_main(args: &[String]) -> ExitCode {
    let Some([listen, clip, secs]) =
        flags(args, &["listen", "clip", "for"]).map(|v| [v[0], v[1], v[2]])
    else {
        eprintln!("usage: live-bench tcp-send --listen ADDR --clip PATH --for SECS");
        return ExitCode::from(2);
    };
    let run = || -> Result<(), String> {
        let listen: SocketAddr = listen.parse().map_err(|e| format!("--listen: {e}"))?;
        let secs: u64 = secs.parse().map_err(|e| format!("--for: {e}"))?;
        let frames = load_frames(&PathBuf::from(clip))?;
        runtime()?.block_on(async {
            match tokio::time::timeout(Duration::from_secs(secs), send(listen, frames)).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        })
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-send: {e}");
            ExitCode::from(1)
        }
    }
}

async fn send(listen: SocketAddr, frames: Vec<(bool, Bytes)>) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<Captured>(QUEUE);
    let capture = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / FPS);
        for (keyframe, data) in frames.iter().cycle() {
            tick.tick().await;
            // Frames captured while nobody watches are dropped, as a camera's encoder
            // output is.
            let _ = tx.try_send(Captured {
                keyframe: *keyframe,
                capture_us: unix_micros(),
                data: data.clone(),
            });
        }
    };
    let serve = async move {
        loop {
            let (sock, _) = listener.accept().await.map_err(|e| e.to_string())?;
            socket2::SockRef::from(&sock)
                .set_tcp_congestion(CONGESTION)
                .map_err(|e| format!("cannot select TCP congestion control cubic: {e}"))?;
            while rx.try_recv().is_ok() {}
            serve_one(sock, &mut rx).await;
        }
    };
    tokio::select! {
        _ = capture => Ok(()),
        r = serve => r,
    }
}

/// Sends every frame from the next keyframe on, in order, until the viewer goes away.
async fn serve_one(mut sock: TcpStream, rx: &mut mpsc::Receiver<Captured>) {
    let _ = sock.set_nodelay(true);
    let mut started = false;
    let mut buf = Vec::new();
    while let Some(f) = rx.recv().await {
        started |= f.keyframe;
        if !started {
            continue;
        }
        buf.clear();
        buf.extend_from_slice(&f.header().encode());
        buf.extend_from_slice(&f.data);
        if sock.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// `live-bench tcp-recv --connect ADDR --for SECS`: prints a [`Report`] on stdout.
pub fn recv_main(args: &[String]) -> ExitCode {
    let Some([connect, secs]) = flags(args, &["connect", "for"]).map(|v| [v[0], v[1]]) else {
        eprintln!("usage: live-bench tcp-recv --connect ADDR --for SECS");
        return ExitCode::from(2);
    };
    let run = || -> Result<Report, String> {
        let addr: SocketAddr = connect.parse().map_err(|e| format!("--connect: {e}"))?;
        let secs: u64 = secs.parse().map_err(|e| format!("--for: {e}"))?;
        runtime()?.block_on(receive(addr, Duration::from_secs(secs)))
    };
    match run().and_then(|r| serde_json::to_string(&r).map_err(|e| e.to_string())) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tcp-recv: {e}");
            ExitCode::from(1)
        }
    }
}

async fn receive(addr: SocketAddr, length: Duration) -> Result<Report, String> {
    let give_up = Instant::now() + CONNECT_FOR;
    let (mut sock, started, start_us) = loop {
        let started = Instant::now();
        let start_us = unix_micros();
        match tokio::time::timeout(CONNECT_FOR, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => break (s, started, start_us),
            Ok(Err(e)) if Instant::now() >= give_up => {
                return Err(format!("cannot connect to {addr}: {e}"))
            }
            Err(_) => return Err(format!("connecting to {addr} timed out")),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut report = Report {
        start_us,
        frames: Vec::new(),
    };
    let remaining = length.saturating_sub(started.elapsed());
    let read = read_ordered(&mut sock, |h, now| {
        report.frames.push((
            started.elapsed().as_micros() as u64,
            h.capture_us,
            now.saturating_sub(h.capture_us),
        ))
    });
    match tokio::time::timeout(remaining, read).await {
        Ok(Err(e)) => Err(e),
        _ => Ok(report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_parse_known_keys_and_refuse_the_rest() {
        let args = s(&["--for", "3", "--connect", "1.2.3.4:5"]);
        let got = flags(&args, &["connect", "for"]);
        assert_eq!(got, Some(vec!["1.2.3.4:5", "3"]));
        assert_eq!(flags(&s(&["--for", "3"]), &["connect", "for"]), None);
        assert_eq!(flags(&s(&["--bogus", "3"]), &["for"]), None);
        assert_eq!(flags(&s(&["--for"]), &["for"]), None);
    }
}
