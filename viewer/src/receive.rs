//! Receiving: say hello on the control stream, read GOP streams (`gop`), write frames to
//! the sink, keep the clock offset fresh with pings, show progress, build the summary.
//!
//! A reader task turns GOP streams into frame events; the main loop owns the sink, the
//! statistics and the clock, so progress and cancellation never wait on the network.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use peercam_common::frame;
use peercam_common::media::{close, FrameHeader, FromCamera, StreamInfo, ToCamera};
use peercam_common::{quic, unix_micros};
use quinn::{RecvStream, VarInt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info};

use crate::connect::Link;
use crate::gop::{Assembly, ParityStore, ReadEnd};
use crate::stats::{ClockOffset, Stats, Summary};
use crate::{Config, Sink, ViewError};

/// How long the camera has to answer the hello with stream parameters.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval between clock probes after the first few.
const PING_INTERVAL: Duration = Duration::from_secs(2);

enum Event {
    Frame {
        header: FrameHeader,
        data: Bytes,
        recv_us: u64,
    },
    GopDropped(u64),
    /// Frames (or blocks of large ones) rebuilt from parity in a finished GOP.
    Repaired(u64),
}

type Offset = Arc<Mutex<ClockOffset>>;

fn offset_now(o: &Offset) -> ClockOffset {
    *o.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) async fn run(
    config: &Config,
    link: Link,
    started: Instant,
    cancel: CancellationToken,
) -> Result<Summary, ViewError> {
    let camera = config.camera.clone();
    let lost = |why: String| ViewError::Lost {
        camera: camera.clone(),
        why,
    };
    let conn = link.conn.clone();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
    let hello = ToCamera::Hello {
        session: link.session,
    };
    frame::write(&mut send, &hello)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let info = match tokio::time::timeout(HELLO_TIMEOUT, frame::read(&mut recv)).await {
        Ok(Ok(Some(FromCamera::StreamInfo(info)))) => info,
        Ok(Ok(Some(FromCamera::Refused { message }))) => {
            return Err(ViewError::CameraRefused {
                camera: camera.clone(),
                why: message,
            })
        }
        Ok(_) => return Err(refused_or_lost(&conn, config)),
        Err(_) => return Err(lost("the camera sent no stream parameters".into())),
    };
    info!(
        target: "progress",
        "stream {}x{} at {:.1} fps; waiting for the first keyframe",
        info.width,
        info.height,
        info.fps_milli as f64 / 1000.0
    );
    let offset: Offset = Arc::default();
    let _pinger = AbortOnDropHandle::new(tokio::spawn(ping_loop(send, recv, offset.clone())));
    let (tx, rx) = mpsc::channel(64);
    let _reader = AbortOnDropHandle::new(tokio::spawn(read_gops(
        conn.clone(),
        tx,
        config.latency_budget,
        offset.clone(),
    )));
    let mut sink = open_sink(&config.sink).await?;
    let outcome = main_loop(
        config, &link, &info, rx, &mut sink, &offset, started, cancel,
    )
    .await;
    let _ = sink.flush().await;
    conn.close(VarInt::from_u32(close::OK), b"viewer done");
    let _ = tokio::time::timeout(Duration::from_secs(1), link.endpoint.wait_idle()).await;
    let (stats, ended) = outcome?;
    let o = offset_now(&offset);
    Ok(Summary {
        camera: camera.to_string(),
        path: link.path.to_string(),
        remote: link.remote.to_string(),
        frames: stats.frames,
        bytes: stats.bytes,
        ttff_ms: stats.ttff.map(ms),
        connect_ms: Some(ms(link.connected_after)),
        latency_p50_ms: stats.latency_ms(0.5, &o),
        latency_p99_ms: stats.latency_ms(0.99, &o),
        latency_max_ms: stats.latency_ms(1.0, &o),
        gops_dropped: stats.gops_dropped,
        repaired: stats.repaired,
        rtt_ms: ms(conn.rtt()),
        clock_offset_ms: o.offset_us() as f64 / 1000.0,
        duration_s: started.elapsed().as_secs_f64(),
        ended,
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn refused_or_lost(conn: &quinn::Connection, config: &Config) -> ViewError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == VarInt::from_u32(close::ACCESS_DENIED)
                || c.error_code == VarInt::from_u32(close::TOO_MANY_VIEWERS) =>
        {
            ViewError::CameraRefused {
                camera: config.camera.clone(),
                why: String::from_utf8_lossy(&c.reason).into_owned(),
            }
        }
        Some(e) => ViewError::Lost {
            camera: config.camera.clone(),
            why: e.to_string(),
        },
        None => ViewError::Lost {
            camera: config.camera.clone(),
            why: "the camera closed the control stream".into(),
        },
    }
}

type BoxSink = tokio::io::BufWriter<Box<dyn AsyncWrite + Unpin + Send>>;

async fn open_sink(sink: &Sink) -> Result<BoxSink, ViewError> {
    let inner: Box<dyn AsyncWrite + Unpin + Send> =
        match sink {
            Sink::File(path) => {
                Box::new(tokio::fs::File::create(path).await.map_err(|source| {
                    ViewError::Output {
                        path: path.display().to_string(),
                        source,
                    }
                })?)
            }
            Sink::Stdout => Box::new(tokio::io::stdout()),
            Sink::Discard => Box::new(tokio::io::sink()),
        };
    Ok(tokio::io::BufWriter::with_capacity(256 * 1024, inner))
}

#[allow(clippy::too_many_arguments)]
async fn main_loop(
    config: &Config,
    link: &Link,
    info: &StreamInfo,
    mut rx: mpsc::Receiver<Event>,
    sink: &mut BoxSink,
    offset: &Offset,
    started: Instant,
    cancel: CancellationToken,
) -> Result<(Stats, String), ViewError> {
    let mut stats = Stats::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0u64, 0u64); // frames, bytes at the previous tick
    let stop_at = config.duration.map(|d| started + d);
    let stop = async {
        match stop_at {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let mut recorder = config
        .record
        .as_ref()
        .map(|path| crate::mp4::Recorder::new(path, info.clone(), config.record_segment_secs));
    let ended = loop {
        tokio::select! {
            _ = cancel.cancelled() => break "interrupted".to_string(),
            _ = &mut stop => break "duration reached".to_string(),
            _ = tick.tick(), if config.progress => {
                progress(link, &stats, offset, last);
                last = (stats.frames, stats.bytes);
            }
            ev = rx.recv() => match ev {
                Some(Event::GopDropped(n)) => stats.gops_dropped += n,
                Some(Event::Repaired(n)) => stats.repaired += n,
                Some(Event::Frame { header, data, recv_us }) => {
                    if stats.ttff.is_none() && !header.is_keyframe() {
                        continue; // undecodable until the first keyframe
                    }
                    if let Err(e) = write_frame(sink, &data).await {
                        break format!("output closed: {e}");
                    }
                    if let Some(hook) = &config.frame_hook {
                        let skew = offset_now(offset).offset_us();
                        let behind = recv_us as i64 - header.capture_us as i64 + skew;
                        let latency = (!header.is_cached())
                            .then(|| Duration::from_micros(behind.max(0) as u64));
                        let path = link.path;
                        (hook.0)(&crate::FrameSeen { header: &header, data: &data, path, latency });
                    }
                    if let Some(r) = recorder.as_mut() {
                        if let Err(e) = r.push(header.pts, header.is_keyframe(), &data) {
                            break format!("recording failed: {e}");
                        }
                    }
                    if stats.ttff.is_none() {
                        stats.ttff = Some(started.elapsed());
                        let mut to = match &config.sink {
                            Sink::File(p) => format!("writing to {}", p.display()),
                            Sink::Stdout => "writing to stdout".into(),
                            Sink::Discard if config.record.is_some() => String::new(),
                            Sink::Discard => "not saving it (use -o FILE, -o - or --record FILE.mp4)".into(),
                        };
                        if let Some(r) = &config.record {
                            let sep = if to.is_empty() { "" } else { "; " };
                            to = format!("{to}{sep}recording to {} (one fragment per GOP)", r.display());
                        }
                        info!(target: "progress", "first frame after {:.0} ms; {to}", started.elapsed().as_secs_f64() * 1000.0);
                    }
                    stats.frame(data.len(), recv_us, header.capture_us, header.is_cached());
                    if config.max_frames.is_some_and(|m| stats.frames >= m) {
                        break "frame limit reached".to_string();
                    }
                }
                None => break ended_by_camera(&link.conn, &stats, config)?,
            }
        }
    };
    if let Some(r) = recorder.as_mut() {
        if let Err(e) = r.flush() {
            tracing::error!(error = %e, "could not write the last part of the recording");
        }
    }
    if config.progress {
        progress(link, &stats, offset, last);
    }
    Ok((stats, ended))
}

fn ended_by_camera(
    conn: &quinn::Connection,
    stats: &Stats,
    config: &Config,
) -> Result<String, ViewError> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == VarInt::from_u32(close::SOURCE_ENDED) =>
        {
            Ok("camera ended the stream".into())
        }
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == VarInt::from_u32(close::SHUTDOWN) =>
        {
            Ok("camera shut down".into())
        }
        _ if stats.frames == 0 => Err(refused_or_lost(conn, config)),
        Some(e) => Ok(format!("connection lost: {e}")),
        None => Ok("connection lost".into()),
    }
}

async fn write_frame(sink: &mut BoxSink, data: &[u8]) -> std::io::Result<()> {
    sink.write_all(data).await?;
    sink.flush().await
}

fn progress(link: &Link, stats: &Stats, offset: &Offset, last: (u64, u64)) {
    let o = offset_now(offset);
    let fps = stats.frames - last.0;
    let mbit = (stats.bytes - last.1) as f64 * 8.0 / 1e6;
    let latency = stats
        .last_latency_ms(&o)
        .map(|l| format!("{l:.0} ms"))
        .unwrap_or_else(|| "-".into());
    eprintln!(
        "peercam: {} {}  rtt {:.1} ms  {fps} fps  {mbit:.2} Mbit/s  latency {latency}  frames {}  gops dropped {}",
        link.path,
        link.remote,
        link.conn.rtt().as_secs_f64() * 1000.0,
        stats.frames,
        stats.gops_dropped
    );
}

async fn ping_loop(mut send: quinn::SendStream, mut recv: RecvStream, offset: Offset) {
    let mut id = 0u64;
    loop {
        let ping = ToCamera::Ping {
            id,
            viewer_time_us: unix_micros(),
        };
        if frame::write(&mut send, &ping).await.is_err() {
            return;
        }
        match frame::read::<FromCamera, _>(&mut recv).await {
            Ok(Some(FromCamera::Pong {
                viewer_time_us,
                camera_time_us,
                ..
            })) => {
                let now = unix_micros();
                offset.lock().unwrap_or_else(|p| p.into_inner()).add(
                    viewer_time_us,
                    camera_time_us,
                    now,
                );
            }
            Ok(Some(_)) => {}
            _ => return,
        }
        id += 1;
        // A few quick probes first so latency is right from the start.
        let wait = if id < 5 {
            Duration::from_millis(50)
        } else {
            PING_INTERVAL
        };
        tokio::time::sleep(wait).await;
    }
}

/// How often a reader blocked on a GOP stream checks whether a newer GOP waits.
const STALL_CHECK: Duration = Duration::from_millis(10);

/// How long a GOP may keep the reader waiting once a newer GOP waits: about one round
/// trip, time for a lost packet to be resent when it was noticed at once. Every frame of
/// the newer GOP waits as long as the older one is read, so this is kept short: measured
/// against half and twice this (BENCHMARKS.md, "Live video").
fn stall_grace(conn: &quinn::Connection, budget: Duration) -> Duration {
    (conn.rtt() + Duration::from_millis(10)).clamp(Duration::from_millis(30), budget)
}

/// Parity datagrams queued between the datagram task and the reader.
const DATAGRAM_QUEUE: usize = 1024;

/// Reads GOP streams in order and turns them into frame events.
async fn read_gops(
    conn: quinn::Connection,
    tx: mpsc::Sender<Event>,
    budget: Duration,
    offset: Offset,
) {
    let (stream_tx, mut streams) = mpsc::channel::<RecvStream>(quic::MAX_GOP_STREAMS as usize);
    let accept_conn = conn.clone();
    let _acceptor = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Ok(s) = accept_conn.accept_uni().await {
            if stream_tx.send(s).await.is_err() {
                return;
            }
        }
    }));
    let (datagram_tx, mut datagrams) = mpsc::channel::<Bytes>(DATAGRAM_QUEUE);
    let datagram_conn = conn.clone();
    let _datagrams = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Ok(d) = datagram_conn.read_datagram().await {
            // Full means the reader is far behind; parity is only ever a shortcut.
            let _ = datagram_tx.try_send(d);
        }
    }));
    let mut parity = ParityStore::default();
    let mut last_seq: Option<u64> = None;
    while let Some(stream) = streams.recv().await {
        let mut gop_stream = Assembly::new(stream);
        // Several GOPs waiting means the older ones are stale already: take the newest
        // (the camera sends it first) and drop the others; the sequence gap counts them.
        while let Ok(newer) = streams.try_recv() {
            let mut older = std::mem::replace(&mut gop_stream, Assembly::new(newer));
            older.stop();
        }
        let gop = match gop_stream.header(&mut parity, &mut datagrams).await {
            Ok(Some(gop)) => gop,
            Ok(None) => continue, // reset before its header arrived: counted by the gap
            Err(ReadEnd::Broken(why)) => {
                debug!(%why, "GOP stream without a usable header: ignored");
                gop_stream.stop();
                continue;
            }
            Err(ReadEnd::ConnectionLost) => return,
        };
        if let Some(last) = last_seq {
            if gop.seq <= last {
                gop_stream.stop();
                continue;
            }
            if gop.seq > last + 1
                && tx
                    .send(Event::GopDropped(gop.seq - last - 1))
                    .await
                    .is_err()
            {
                return;
            }
        }
        last_seq = Some(gop.seq);
        let go_on = read_gop(
            &conn,
            &mut gop_stream,
            &mut streams,
            &mut parity,
            &mut datagrams,
            &tx,
            budget,
            &offset,
        )
        .await;
        parity.forget_up_to(gop_stream.id());
        if gop_stream.repaired > 0 && tx.send(Event::Repaired(gop_stream.repaired)).await.is_err() {
            return;
        }
        if !go_on {
            return;
        }
    }
}

/// Reads the frames of one GOP until it ends, breaks or is abandoned; false when the
/// connection or the receiver is gone.
#[allow(clippy::too_many_arguments)]
async fn read_gop(
    conn: &quinn::Connection,
    gop_stream: &mut Assembly,
    streams: &mut mpsc::Receiver<RecvStream>,
    parity: &mut ParityStore,
    datagrams: &mut mpsc::Receiver<Bytes>,
    tx: &mpsc::Sender<Event>,
    budget: Duration,
    offset: &Offset,
) -> bool {
    // Since when a newer GOP has been waiting while this one kept us waiting.
    let mut newer_since: Option<Instant> = None;
    loop {
        // Newer GOPs have priority at the camera, so under congestion the rest of an
        // older one trickles or starves: once a newer GOP waits, this one gets about the
        // time a lost packet takes to be resent to finish, then we jump to the newer one.
        let next = loop {
            // `next_frame` keeps its progress in `gop_stream`, so dropping it on a timeout
            // loses nothing.
            let read = gop_stream.next_frame(parity, datagrams);
            match tokio::time::timeout(STALL_CHECK, read).await {
                Ok(r) => break Some(r),
                Err(_) if streams.is_empty() => {}
                // Nothing of a further frame has arrived and a newer GOP has: this one is
                // over (its end-of-stream may be queued behind the newer keyframe, or lost);
                // waiting for it would only hold back the keyframe.
                Err(_) if !gop_stream.pending() => {
                    gop_stream.stop();
                    return true;
                }
                Err(_) => {
                    let since = *newer_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > stall_grace(conn, budget) {
                        break None;
                    }
                }
            }
        };
        let Some(next) = next else {
            debug!("GOP stalled while a newer one waits: abandoning it");
            gop_stream.stop();
            return tx.send(Event::GopDropped(1)).await.is_ok();
        };
        match next {
            Ok(Some((header, data))) => {
                let recv_us = unix_micros();
                let behind = Duration::from_micros(
                    (recv_us as i64 - header.capture_us as i64 + offset_now(offset).offset_us())
                        .max(0) as u64,
                );
                let frame = Event::Frame {
                    header,
                    data,
                    recv_us,
                };
                if tx.send(frame).await.is_err() {
                    return false;
                }
                // Behind the budget with a newer GOP waiting: jump to its keyframe.
                if !header.is_cached() && behind > budget && !streams.is_empty() {
                    debug!(?behind, "abandoning a late GOP");
                    gop_stream.stop();
                    return tx.send(Event::GopDropped(1)).await.is_ok();
                }
            }
            Ok(None) => return true,
            Err(ReadEnd::Broken(reason)) => {
                debug!(%reason, "GOP stream ended early");
                return tx.send(Event::GopDropped(1)).await.is_ok();
            }
            Err(ReadEnd::ConnectionLost) => return false,
        }
    }
}
