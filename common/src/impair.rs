//! A user-space network impairment (delay, jitter, loss, a bandwidth cap with a bounded
//! queue) applied to the real UDP socket under a quinn endpoint, for tests and benchmarks.
//!
//! This kernel has no `netem`, so the impairment lives in the socket: [`ImpairedSocket`]
//! wraps quinn's own tokio socket and holds every datagram, in both directions, until the
//! modelled link would have delivered it. The deciding part, [`Shaper`], is a plain struct
//! with time passed in; the socket only executes what it decides. Punch packets, sent on a
//! clone of the socket, are not impaired.
//!
//! Owns two tasks per socket (egress and ingress), aborted when the socket is dropped.

use std::collections::BinaryHeap;
use std::fmt;
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

/// Datagrams held in flight per direction at most; beyond that they are dropped, as a
/// router with a full buffer would.
const MAX_HELD: usize = 16 * 1024;
/// Largest datagram taken from the real socket at once (GRO may coalesce several).
const RECV_BUF: usize = 64 * 1024;

/// What the link does to every datagram, in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// One-way delay (half the added round-trip time).
    pub delay: Duration,
    /// Uniform jitter added to the delay, ± this (may reorder, as netem does).
    pub jitter: Duration,
    /// Share of datagrams lost, 0.0 to 1.0.
    pub loss: f64,
    /// Capacity in bits per second; `None` is unlimited.
    pub rate_bps: Option<u64>,
    /// Bottleneck buffer, as time at `rate_bps`: datagrams that would wait longer are dropped.
    pub queue: Duration,
}

/// Default bottleneck buffer: a typical home router's, in time.
pub const DEFAULT_QUEUE: Duration = Duration::from_millis(200);

/// A malformed impairment spec.
#[derive(Debug, thiserror::Error)]
#[error("bad impairment `{spec}`: {why} (expected e.g. `rtt=50ms,jitter=5ms,loss=5%,rate=2mbit,queue=200ms`)")]
pub struct ImpairmentParseError {
    spec: String,
    why: String,
}

impl FromStr for Impairment {
    type Err = ImpairmentParseError;

    /// Parses `rtt=50ms,jitter=5ms,loss=5%,rate=2mbit,queue=200ms` (any subset; `delay=`
    /// gives the one-way delay instead of `rtt=`).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ImpairmentParseError {
            spec: spec.to_string(),
            why,
        };
        let mut out = Impairment {
            queue: DEFAULT_QUEUE,
            ..Impairment::default()
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("`{part}` is not key=value")))?;
            match key {
                "rtt" => out.delay = parse_duration(value).map_err(err)? / 2,
                "delay" => out.delay = parse_duration(value).map_err(err)?,
                "jitter" => out.jitter = parse_duration(value).map_err(err)?,
                "queue" => out.queue = parse_duration(value).map_err(err)?,
                "loss" => out.loss = parse_percent(value).map_err(err)?,
                "rate" => out.rate_bps = Some(parse_rate(value).map_err(err)?),
                other => return Err(err(format!("unknown key `{other}`"))),
            }
        }
        if out.delay > Duration::from_secs(10) || out.jitter > Duration::from_secs(10) {
            return Err(err("delay and jitter are limited to 10 s".into()));
        }
        Ok(out)
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rtt={}ms,jitter={}ms,loss={}%",
            (self.delay * 2).as_millis(),
            self.jitter.as_millis(),
            self.loss * 100.0
        )?;
        if let Some(r) = self.rate_bps {
            write!(
                f,
                ",rate={}kbit,queue={}ms",
                r / 1000,
                self.queue.as_millis()
            )?;
        }
        Ok(())
    }
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    let (num, unit) = split_unit(v);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{v}` is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "us" => n / 1e6,
        _ => return Err(format!("`{v}`: use ms, s or us")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{v}` is out of range"))
}

fn parse_percent(v: &str) -> Result<f64, String> {
    let n: f64 = v
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{v}` is not a percentage"))?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("loss `{v}` is not between 0 and 100 %"));
    }
    Ok(n / 100.0)
}

fn parse_rate(v: &str) -> Result<u64, String> {
    let (num, unit) = split_unit(v);
    let n: f64 = num.parse().map_err(|_| format!("`{v}` is not a rate"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "bit" | "" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(format!("`{v}`: use bit, kbit, mbit or gbit")),
    };
    let bps = n * scale;
    if !(8000.0..=1e11).contains(&bps) {
        return Err(format!("rate `{v}` must be between 8kbit and 100gbit"));
    }
    Ok(bps as u64)
}

fn split_unit(v: &str) -> (&str, &str) {
    let at = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    v.split_at(at)
}

/// The link model for one direction: decides, for each datagram, whether it is lost and
/// when it arrives. No I/O; time and randomness come in as arguments.
#[derive(Debug, Clone)]
pub struct Shaper {
    imp: Impairment,
    /// When the bottleneck finishes sending what it holds.
    busy_until: Option<Instant>,
}

/// Random draws for one datagram, each uniform in `[0, 1)`.
#[derive(Debug, Clone, Copy)]
pub struct Draws {
    /// Decides loss.
    pub loss: f64,
    /// Decides jitter.
    pub jitter: f64,
}

impl Draws {
    /// Fresh draws from the thread's generator.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        Draws {
            loss: rng.random(),
            jitter: rng.random(),
        }
    }
}

impl Shaper {
    /// A link with this impairment, idle.
    pub fn new(imp: Impairment) -> Self {
        Shaper {
            imp,
            busy_until: None,
        }
    }

    /// A datagram of `len` bytes enters the link at `now`: when does it come out, if ever?
    pub fn admit(&mut self, now: Instant, len: usize, draws: Draws) -> Option<Instant> {
        if draws.loss < self.imp.loss {
            return None;
        }
        let mut out = now;
        if let Some(rate) = self.imp.rate_bps {
            let start = self.busy_until.filter(|b| *b > now).unwrap_or(now);
            if start - now > self.imp.queue {
                return None; // the bottleneck's buffer is full: tail drop
            }
            let serialize = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            self.busy_until = Some(start + serialize);
            out = start + serialize;
        }
        let jitter = self.imp.jitter.as_secs_f64() * (draws.jitter * 2.0 - 1.0);
        let delay = (self.imp.delay.as_secs_f64() + jitter).max(0.0);
        Some(out + Duration::from_secs_f64(delay))
    }
}

/// A datagram held by the link until `due`.
struct Held {
    due: Instant,
    seq: u64,
    peer: SocketAddr,
    data: Bytes,
    meta_dst: Option<std::net::IpAddr>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    // Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// Datagrams waiting for their time, in due order.
#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Held>,
    seq: u64,
}

impl Queue {
    fn push(&mut self, due: Instant, peer: SocketAddr, data: Bytes, dst: Option<std::net::IpAddr>) {
        if self.heap.len() >= MAX_HELD {
            return;
        }
        self.seq += 1;
        self.heap.push(Held {
            due,
            seq: self.seq,
            peer,
            data,
            meta_dst: dst,
        });
    }

    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|h| h.due)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Held> {
        if self.next_due()? <= now {
            self.heap.pop()
        } else {
            None
        }
    }
}

/// quinn's UDP socket with an [`Impairment`] on both directions.
pub struct ImpairedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    egress: Mutex<Shaper>,
    to_egress: mpsc::Sender<(Instant, SocketAddr, Bytes)>,
    delivered: Mutex<mpsc::Receiver<Held>>,
    _tasks: [AbortOnDropHandle<()>; 2],
}

impl fmt::Debug for ImpairedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImpairedSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ImpairedSocket {
    /// Wraps `socket` (already bound). Must run inside a tokio runtime.
    pub fn new(socket: std::net::UdpSocket, imp: Impairment) -> io::Result<Arc<Self>> {
        let runtime = quinn::TokioRuntime;
        let inner = quinn::Runtime::wrap_udp_socket(&runtime, socket)?;
        let (to_egress, egress_rx) = mpsc::channel(MAX_HELD);
        let (deliver, delivered) = mpsc::channel(MAX_HELD);
        let tasks = [
            AbortOnDropHandle::new(tokio::spawn(egress(inner.clone(), egress_rx))),
            AbortOnDropHandle::new(tokio::spawn(ingress(inner.clone(), imp, deliver))),
        ];
        Ok(Arc::new(ImpairedSocket {
            inner,
            egress: Mutex::new(Shaper::new(imp)),
            to_egress,
            delivered: Mutex::new(delivered),
            _tasks: tasks,
        }))
    }
}

/// Sends held datagrams on the real socket when they are due.
async fn egress(
    inner: Arc<dyn AsyncUdpSocket>,
    mut rx: mpsc::Receiver<(Instant, SocketAddr, Bytes)>,
) {
    let mut queue = Queue::default();
    let mut poller = inner.clone().create_io_poller();
    loop {
        let due = queue.next_due();
        tokio::select! {
            got = rx.recv() => match got {
                Some((due, peer, data)) => queue.push(due, peer, data, None),
                None => return,
            },
            _ = sleep_until(due) => {
                while let Some(h) = queue.pop_due(Instant::now()) {
                    let transmit = Transmit {
                        destination: h.peer,
                        ecn: None,
                        contents: &h.data,
                        segment_size: None,
                        src_ip: None,
                    };
                    // A full socket buffer loses the datagram, as a full NIC queue would;
                    // wait for room before the next one.
                    if let Err(e) = inner.try_send(&transmit) {
                        if e.kind() == io::ErrorKind::WouldBlock {
                            let _ = poll_fn(|cx| poller.as_mut().poll_writable(cx)).await;
                        }
                    }
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Takes datagrams from the real socket, shapes them, and hands them to quinn when due.
async fn ingress(inner: Arc<dyn AsyncUdpSocket>, imp: Impairment, deliver: mpsc::Sender<Held>) {
    let mut shaper = Shaper::new(imp);
    let mut queue = Queue::default();
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let due = queue.next_due();
        let mut meta = [RecvMeta::default()];
        tokio::select! {
            got = poll_fn(|cx| {
                let mut bufs = [IoSliceMut::new(&mut buf)];
                inner.poll_recv(cx, &mut bufs, &mut meta)
            }) => {
                let Ok(n) = got else { continue };
                let now = Instant::now();
                for m in &meta[..n] {
                    let stride = m.stride.max(1);
                    for chunk in buf[..m.len].chunks(stride) {
                        if let Some(at) = shaper.admit(now, chunk.len(), Draws::random()) {
                            queue.push(at, m.addr, Bytes::copy_from_slice(chunk), m.dst_ip);
                        }
                    }
                }
            }
            _ = sleep_until(due) => {
                while let Some(h) = queue.pop_due(Instant::now()) {
                    if deliver.send(h).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let now = Instant::now();
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let mut shaper = self.egress.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in transmit.contents.chunks(seg) {
            if let Some(due) = shaper.admit(now, chunk.len(), Draws::random()) {
                // A full hold queue drops, like a full router buffer.
                let _ = self.to_egress.try_send((
                    due,
                    transmit.destination,
                    Bytes::copy_from_slice(chunk),
                ));
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let held = match rx.poll_recv(cx) {
                Poll::Ready(Some(h)) => h,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::other("impairment link stopped")))
                }
                Poll::Pending => break,
            };
            let len = held.data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&held.data[..len]);
            meta[n] = RecvMeta {
                addr: held.peer,
                len,
                stride: len,
                ecn: None,
                dst_ip: held.meta_dst,
            };
            n += 1;
        }
        if n == 0 {
            Poll::Pending
        } else {
            Poll::Ready(Ok(n))
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Sends never block: the link model queues or drops instead.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: Draws = Draws {
        loss: 0.99,
        jitter: 0.5,
    };

    #[test]
    fn parses_a_full_spec() {
        let i: Impairment = "rtt=50ms,jitter=5ms,loss=5%,rate=2mbit,queue=100ms"
            .parse()
            .unwrap();
        assert_eq!(i.delay, Duration::from_millis(25));
        assert_eq!(i.jitter, Duration::from_millis(5));
        assert!((i.loss - 0.05).abs() < 1e-9);
        assert_eq!(i.rate_bps, Some(2_000_000));
        assert_eq!(i.queue, Duration::from_millis(100));
        let again: Impairment = i.to_string().parse().unwrap();
        assert_eq!(again, i);
    }

    #[test]
    fn rejects_nonsense_with_a_clear_error() {
        for bad in [
            "rtt",
            "rtt=fast",
            "loss=150%",
            "rate=1bit",
            "colour=blue",
            "delay=99s",
        ] {
            let e = bad.parse::<Impairment>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("expected e.g."), "{e}");
        }
    }

    #[test]
    fn delay_without_rate_is_constant() {
        let imp = Impairment {
            delay: Duration::from_millis(25),
            ..Impairment::default()
        };
        let mut s = Shaper::new(imp);
        let t = Instant::now();
        assert_eq!(s.admit(t, 1200, KEEP), Some(t + Duration::from_millis(25)));
        assert_eq!(
            s.admit(
                t,
                1200,
                Draws {
                    loss: 0.0,
                    jitter: 0.5
                }
            ),
            Some(t + Duration::from_millis(25)),
            "no loss configured"
        );
    }

    #[test]
    fn loss_drops_the_configured_share() {
        let imp = Impairment {
            loss: 0.05,
            ..Impairment::default()
        };
        let mut s = Shaper::new(imp);
        let t = Instant::now();
        let lost = (0..10_000)
            .filter(|i| {
                let d = Draws {
                    loss: *i as f64 / 10_000.0,
                    jitter: 0.5,
                };
                s.admit(t, 100, d).is_none()
            })
            .count();
        assert_eq!(lost, 500);
    }

    #[test]
    fn rate_serializes_and_tail_drops() {
        // 1 Mbit/s: a 1250-byte datagram takes 10 ms; a 50 ms buffer holds five.
        let imp = Impairment {
            rate_bps: Some(1_000_000),
            queue: Duration::from_millis(50),
            ..Impairment::default()
        };
        let mut s = Shaper::new(imp);
        let t = Instant::now();
        let outs: Vec<_> = (0..8).map(|_| s.admit(t, 1250, KEEP)).collect();
        for (i, o) in outs.iter().take(6).enumerate() {
            assert_eq!(*o, Some(t + Duration::from_millis(10 * (i as u64 + 1))));
        }
        assert_eq!(outs[6], None, "buffer full");
        // Once drained, the link takes datagrams again.
        let later = t + Duration::from_millis(100);
        assert_eq!(
            s.admit(later, 1250, KEEP),
            Some(later + Duration::from_millis(10))
        );
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let imp = Impairment {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            ..Impairment::default()
        };
        let mut s = Shaper::new(imp);
        let t = Instant::now();
        let lo = s
            .admit(
                t,
                1,
                Draws {
                    loss: 1.0,
                    jitter: 0.0,
                },
            )
            .unwrap();
        let hi = s
            .admit(
                t,
                1,
                Draws {
                    loss: 1.0,
                    jitter: 1.0,
                },
            )
            .unwrap();
        assert_eq!(lo, t + Duration::from_millis(15));
        assert_eq!(hi, t + Duration::from_millis(25));
    }
}
