//! Serving viewers: accept their connections, check who they are, stream GOPs to them.
//!
//! A viewer must hold a viewer certificate from the deployment CA (checked in the TLS
//! handshake), be on the access list, and present a session that the rendezvous introduced
//! and this camera accepted (single use). Then it gets the stream parameters on the control
//! stream and one unidirectional stream per GOP. A viewer that falls behind the latency
//! budget loses the rest of the current GOP and resumes at the next keyframe; it never
//! delays the source or the other viewers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use peercam_common::fec::{Codecs, LossEstimate, MIN_LOSS};
use peercam_common::frame;
use peercam_common::media::{close, FromCamera, GopHeader, ToCamera, FLAG_CACHED, RESET_STALE_GOP};
use peercam_common::tls::peer_identity;
use peercam_common::{unix_micros, ViewerId};
use quinn::{SendStream, VarInt};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::fanout::Published;
use crate::status::ViewerStats;
use crate::State;

/// Priority of the control stream: above every GOP stream.
const CONTROL_PRIORITY: i32 = i32::MAX;

/// How long a viewer has to finish the handshake and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    cancel: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                tasks.spawn(
                    serve_viewer(incoming, state.clone(), cancel.clone())
                        .instrument(info_span!("viewer_conn", %remote)),
                );
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

fn deny(conn: &quinn::Connection, code: u32, why: &str) {
    conn.close(VarInt::from_u32(code), why.as_bytes());
}

async fn serve_viewer(incoming: quinn::Incoming, state: Arc<State>, cancel: CancellationToken) {
    let config = state.server_config_for(incoming.remote_address().ip().to_canonical());
    let connecting = match incoming.accept_with(Arc::new(config)) {
        Ok(c) => c,
        Err(e) => return warn!(error = %e, "cannot accept viewer"),
    };
    let conn = match tokio::time::timeout(HELLO_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return warn!(error = %e, "viewer handshake failed"),
        Err(_) => return warn!("viewer handshake timed out"),
    };
    let Some(viewer) = peer_identity(&conn).and_then(|p| ViewerId::new(&p.identity.id).ok()) else {
        return deny(&conn, close::PROTOCOL, "no viewer identity");
    };
    let span = info_span!("viewer", viewer = %viewer);
    async {
        if !state.allowed(&viewer) {
            warn!("refused: not on the access list");
            let why = format!("viewer {viewer} is not on this camera's access list");
            return deny(&conn, close::ACCESS_DENIED, &why);
        }
        let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (send, mut recv) = conn.accept_bi().await.ok()?;
            // Control before video: GOP streams take priority over each other by age, and
            // under loss a retransmitted answer or pong must not wait behind them.
            let _ = send.set_priority(CONTROL_PRIORITY);
            match frame::read::<ToCamera, _>(&mut recv).await {
                Ok(Some(ToCamera::Hello { session })) => Some((send, recv, session)),
                _ => None,
            }
        })
        .await;
        let Ok(Some((mut send, recv, session))) = hello else {
            return deny(&conn, close::PROTOCOL, "expected Hello");
        };
        let Some(relay) = state.take_session(Instant::now(), &session, &viewer) else {
            warn!(%session, "refused: unknown, used or expired session");
            return deny(&conn, close::ACCESS_DENIED, "unknown or expired session");
        };
        let remote = peercam_common::net::canonical(conn.remote_address());
        let remote_ip = remote.ip();
        let path = if Some(remote) == relay {
            "relay"
        } else if peercam_common::net::on_link(remote_ip) && !remote_ip.is_loopback() {
            "lan"
        } else {
            "direct"
        };
        let Some(_slot) = ViewerSlot::take(&state) else {
            warn!("refused: too many viewers");
            let _ = frame::write(
                &mut send,
                &FromCamera::Refused {
                    message: format!("the camera already serves {} viewers", state.max_viewers),
                },
            )
            .await;
            return deny(&conn, close::TOO_MANY_VIEWERS, "too many viewers");
        };
        info!(remote = %conn.remote_address(), path, "viewer connected");
        let stats = ViewerStats::new(viewer.to_string(), conn.clone(), path);
        state.add_viewer(stats.clone());
        let _listed = Listed(&state, stats.clone());
        let Some(info) = state.fanout.info().await else {
            return;
        };
        if frame::write(&mut send, &FromCamera::StreamInfo(info))
            .await
            .is_err()
        {
            return;
        }
        let control = answer_pings(send, recv, &stats);
        let stream = stream_gops(&conn, &state, &stats);
        let outcome = tokio::select! {
            _ = cancel.cancelled() => "camera shutting down",
            _ = control => "viewer closed its control stream",
            why = stream => why,
            _ = conn.closed() => "connection closed",
        };
        info!(reason = outcome, "viewer gone");
    }
    .instrument(span)
    .await
}

/// Counts a viewer against the limit for as long as it lives.
struct ViewerSlot(Arc<State>);

impl ViewerSlot {
    fn take(state: &Arc<State>) -> Option<Self> {
        let mut taken = false;
        state.status.send_if_modified(|s| {
            taken = s.viewers < state.max_viewers;
            if taken {
                s.viewers += 1;
            }
            taken
        });
        taken.then(|| ViewerSlot(state.clone()))
    }
}

impl Drop for ViewerSlot {
    fn drop(&mut self) {
        self.0
            .status
            .send_modify(|s| s.viewers = s.viewers.saturating_sub(1));
    }
}

/// Takes a viewer off the status list when its session ends.
struct Listed<'a>(&'a State, Arc<ViewerStats>);

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.0.remove_viewer(&self.1);
    }
}

async fn answer_pings(mut send: SendStream, mut recv: quinn::RecvStream, stats: &ViewerStats) {
    while let Ok(Some(msg)) = frame::read::<ToCamera, _>(&mut recv).await {
        if let ToCamera::Ping { id, viewer_time_us } = msg {
            let now = unix_micros();
            // The ping left the viewer about half an RTT ago.
            let half_rtt = stats.conn.rtt().as_micros() as i64 / 2;
            let skew = viewer_time_us as i64 + half_rtt - now as i64;
            stats
                .skew_us
                .store(skew, std::sync::atomic::Ordering::Relaxed);
            let pong = FromCamera::Pong {
                id,
                viewer_time_us,
                camera_time_us: now,
            };
            if frame::write(&mut send, &pong).await.is_err() {
                return;
            }
        }
    }
}

/// The GOP stream currently being written to one viewer.
struct GopStream {
    gop: u64,
    stream: SendStream,
    /// The stream's id, as parity datagrams name it.
    id: u64,
    /// Bytes written so far: the stream offset of the next frame.
    written: u64,
}

/// How long parity stays off after a sign of congestion.
const CONGESTED_QUIET: Duration = Duration::from_secs(10);
/// Loss rate assumed for the cached GOP sent to a new viewer, before its link's loss is
/// known: that burst is what the viewer's first seconds wait on, and a retransmission
/// round in it delays every live frame queued behind it.
const STARTUP_LOSS: f64 = 0.03;

/// Parity for one viewer (`common::fec`): sent while its link loses packets, held back
/// while it is congested, where parity would only lengthen the queue that causes the loss.
struct Protection {
    enabled: bool,
    codecs: Codecs,
    loss: LossEstimate,
    quiet_until: Option<Instant>,
}

impl Protection {
    fn new(enabled: bool) -> Self {
        Protection {
            enabled,
            codecs: Codecs::default(),
            loss: LossEstimate::default(),
            quiet_until: None,
        }
    }

    /// A GOP went stale or the viewer lagged: the link does not carry the stream.
    fn congested(&mut self) {
        self.quiet_until = Some(Instant::now() + CONGESTED_QUIET);
    }

    /// Sends parity for one frame record written at `start` of stream `stream`.
    fn protect(
        &mut self,
        conn: &quinn::Connection,
        stream: u64,
        start: u64,
        record: &[&[u8]],
        cached: bool,
    ) {
        if !self.enabled {
            return;
        }
        let Some(max) = conn.max_datagram_size() else {
            return; // the viewer takes no datagrams (an older viewer)
        };
        let path = conn.stats().path;
        let mut loss = self.loss.update(path.sent_packets, path.lost_packets);
        if cached {
            loss = loss.max(STARTUP_LOSS);
        }
        if loss < MIN_LOSS || self.quiet_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let bytes = record.concat();
        for d in self.codecs.protect(stream, start, &bytes, max, loss) {
            if conn.send_datagram(d).is_err() {
                return;
            }
        }
    }
}

/// Streams the cached GOP, then live frames, until the source ends or the viewer is gone.
async fn stream_gops(conn: &quinn::Connection, state: &State, stats: &ViewerStats) -> &'static str {
    let budget = state.latency_budget;
    let sub = state.fanout.subscribe();
    let mut live = sub.live;
    let mut current: Option<GopStream> = None;
    let mut skip_gop: Option<u64> = None;
    let mut retiring = Retiring::new(budget);
    let mut fec = Protection::new(state.fec);
    // The cached GOP is sent whatever its age: it is what lets a viewer start at once.
    for frame in sub.cached {
        let p = Published {
            gop: sub.gop,
            frame,
        };
        let size = p.frame.data.len();
        if let Err(why) =
            send_frame(conn, &mut current, &mut retiring, &mut fec, &p, None, true).await
        {
            return why;
        }
        stats.sent(size);
    }
    loop {
        let p = tokio::select! {
            p = live.recv() => p,
            _ = state.source_ended.cancelled() => {
                finish(current.take()).await;
                conn.close(VarInt::from_u32(close::SOURCE_ENDED), b"source ended");
                return "source ended";
            }
        };
        let p = match p {
            Ok(p) => p,
            Err(RecvError::Lagged(n)) => {
                debug!(frames = n, "viewer lagged: skipping to the next keyframe");
                abandon(&mut current);
                fec.congested();
                // Anything before the next keyframe is undecodable now.
                skip_gop = Some(u64::MAX);
                continue;
            }
            Err(RecvError::Closed) => return "source closed",
        };
        if p.frame.keyframe {
            skip_gop = None;
        } else if skip_gop.is_some() {
            continue;
        }
        let age = Duration::from_micros(unix_micros().saturating_sub(p.frame.capture_us));
        if age > budget {
            debug!(
                gop = p.gop,
                ?age,
                "frame older than the latency budget: abandoning GOP"
            );
            abandon(&mut current);
            fec.congested();
            skip_gop = Some(p.gop);
            continue;
        }
        match send_frame(
            conn,
            &mut current,
            &mut retiring,
            &mut fec,
            &p,
            Some(budget - age),
            false,
        )
        .await
        {
            Ok(()) => stats.sent(p.frame.data.len()),
            Err("stale") => {
                abandon(&mut current);
                fec.congested();
                skip_gop = Some(p.gop);
            }
            Err(why) => return why,
        }
    }
}

/// Finished GOP streams whose data may still be queued. quinn keeps sending (and counting
/// against the send window) the queued data of a stream the viewer stopped until the
/// stream is reset, so each one is watched: reset when the viewer stops it, or when it is
/// still not delivered a latency budget later; dropped once delivered.
struct Retiring {
    budget: Duration,
    tasks: JoinSet<()>,
}

impl Retiring {
    fn new(budget: Duration) -> Self {
        Retiring {
            budget,
            tasks: JoinSet::new(),
        }
    }

    fn retire(&mut self, mut stream: SendStream) {
        let _ = stream.finish();
        while self.tasks.try_join_next().is_some() {}
        let budget = self.budget;
        self.tasks.spawn(async move {
            match tokio::time::timeout(budget, stream.stopped()).await {
                Ok(Ok(Some(code))) => {
                    let _ = stream.reset(code);
                }
                Err(_) => {
                    let _ = stream.reset(VarInt::from_u32(RESET_STALE_GOP));
                }
                Ok(_) => {} // delivered, or the connection is gone
            }
        });
    }
}

fn abandon(current: &mut Option<GopStream>) {
    if let Some(mut g) = current.take() {
        let _ = g.stream.reset(VarInt::from_u32(RESET_STALE_GOP));
    }
}

async fn finish(current: Option<GopStream>) {
    if let Some(mut g) = current {
        let _ = g.stream.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), g.stream.stopped()).await;
    }
}

/// Writes one frame, opening a new GOP stream at a keyframe, and sends its parity. With a
/// deadline, a write that cannot complete in time returns `Err("stale")`.
async fn send_frame(
    conn: &quinn::Connection,
    current: &mut Option<GopStream>,
    retiring: &mut Retiring,
    fec: &mut Protection,
    p: &Published,
    deadline: Option<Duration>,
    cached: bool,
) -> Result<(), &'static str> {
    if p.frame.keyframe || current.as_ref().map(|g| g.gop) != Some(p.gop) {
        if !p.frame.keyframe {
            return Ok(()); // mid-GOP without its keyframe: undecodable, skip
        }
        if let Some(old) = current.take() {
            retiring.retire(old.stream);
        }
        let mut stream = conn.open_uni().await.map_err(|_| "connection lost")?;
        // Newer GOPs first; i32 wraps only after 2^31 GOPs.
        let _ = stream.set_priority((p.gop & 0x7fff_ffff) as i32);
        let head = GopHeader { seq: p.gop }.encode();
        stream
            .write_all(&head)
            .await
            .map_err(|_| "connection lost")?;
        let id = u64::from(VarInt::from(stream.id()));
        *current = Some(GopStream {
            gop: p.gop,
            stream,
            id,
            written: head.len() as u64,
        });
    }
    let Some(g) = current.as_mut() else {
        return Ok(());
    };
    let mut header = p.frame.header();
    if cached {
        header.flags |= FLAG_CACHED;
    }
    let header = header.encode();
    let write = async {
        g.stream.write_all(&header).await?;
        g.stream.write_chunk(p.frame.data.clone()).await
    };
    let result = match deadline {
        None => write.await,
        Some(d) => match tokio::time::timeout(d, write).await {
            Ok(r) => r,
            Err(_) => return Err("stale"),
        },
    };
    match result {
        Ok(()) => {
            let start = g.written;
            g.written += (header.len() + p.frame.data.len()) as u64;
            fec.protect(conn, g.id, start, &[&header, &p.frame.data], cached);
            Ok(())
        }
        // The viewer abandoned this GOP (it fell behind): go on with the next one.
        Err(quinn::WriteError::Stopped(_) | quinn::WriteError::ClosedStream) => Err("stale"),
        Err(_) => Err("connection lost"),
    }
}
