//! The admin listener: Prometheus `/metrics`, `/livez`, `/readyz` on a separate TCP port
//! (keep it on a private address).
//!
//! Three fixed GET endpoints with no keep-alive, no bodies and a bounded request head do
//! not justify an HTTP stack dependency in the rendezvous, so the responder is a few lines
//! here; anything else gets 404.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use peercam_common::rdv::PathKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters the server updates.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Cameras registered.
    pub registrations_ok: AtomicU64,
    /// Registrations refused because another key holds the ID.
    pub registrations_id_taken: AtomicU64,
    /// Handshakes that failed (bad or foreign certificates, wrong ALPN, timeouts).
    pub handshake_failures: AtomicU64,
    /// Connect requests answered with a peer.
    pub connects_ok: AtomicU64,
    /// Connect requests refused as unknown or not allowed.
    pub connects_unavailable: AtomicU64,
    /// Connect requests for an offline camera.
    pub connects_offline: AtomicU64,
    /// Connect requests the camera did not answer in time.
    pub connects_timeout: AtomicU64,
    /// Connect requests refused by the rate limit.
    pub connects_rate_limited: AtomicU64,
    /// Paths viewers reported for brokered sessions, in [`PathKind::ALL`] order.
    pub paths: [AtomicU64; 3],
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of reports of `kind`.
    pub fn path(&self, kind: PathKind) -> &AtomicU64 {
        let i = PathKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.paths[i]
    }
}

/// Values read at scrape time from the rest of the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Cameras online now.
    pub cameras: usize,
    /// Relay sessions active now.
    pub relay_active: usize,
    /// Relay sessions so far.
    pub relay_sessions: u64,
    /// Bytes relayed by finished sessions.
    pub relay_bytes: u64,
}

/// Renders the Prometheus text exposition format.
pub fn render(m: &Metrics, g: Gauges) -> String {
    let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(&str, u64)]| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(s, "{name}{labels} {value}");
        }
    };
    metric(
        "peercam_cameras_registered",
        "gauge",
        "Cameras registered now.",
        &[("", g.cameras as u64)],
    );
    metric(
        "peercam_registrations_total",
        "counter",
        "Camera registrations by outcome.",
        &[
            ("{outcome=\"ok\"}", v(&m.registrations_ok)),
            ("{outcome=\"id_taken\"}", v(&m.registrations_id_taken)),
        ],
    );
    metric(
        "peercam_connects_total",
        "counter",
        "Viewer connect requests by outcome.",
        &[
            ("{outcome=\"ok\"}", v(&m.connects_ok)),
            ("{outcome=\"unavailable\"}", v(&m.connects_unavailable)),
            ("{outcome=\"offline\"}", v(&m.connects_offline)),
            ("{outcome=\"timeout\"}", v(&m.connects_timeout)),
            ("{outcome=\"rate_limited\"}", v(&m.connects_rate_limited)),
        ],
    );
    let labels = PathKind::ALL.map(|k| format!("{{path=\"{}\"}}", k.as_str()));
    let paths: Vec<(&str, u64)> = PathKind::ALL
        .iter()
        .zip(&labels)
        .map(|(k, l)| (l.as_str(), v(m.path(*k))))
        .collect();
    metric(
        "peercam_paths_total",
        "counter",
        "Connections viewers reported for brokered sessions, by path.",
        &paths,
    );
    metric(
        "peercam_handshake_failures_total",
        "counter",
        "QUIC/TLS handshakes that failed or timed out.",
        &[("", v(&m.handshake_failures))],
    );
    metric(
        "peercam_relay_sessions_active",
        "gauge",
        "Relay sessions active now.",
        &[("", g.relay_active as u64)],
    );
    metric(
        "peercam_relay_sessions_total",
        "counter",
        "Relay sessions allocated.",
        &[("", g.relay_sessions)],
    );
    metric(
        "peercam_relay_bytes_total",
        "counter",
        "Bytes forwarded by finished relay sessions.",
        &[("", g.relay_bytes)],
    );
    s
}

/// Serves the admin endpoints until `cancel`. `scrape` produces the metrics text and
/// `ready` says whether the rendezvous accepts connections.
pub async fn serve(
    listener: TcpListener,
    scrape: impl Fn() -> String + Send + Sync + 'static,
    ready: impl Fn() -> bool + Send + Sync + 'static,
    cancel: CancellationToken,
) {
    let scrape = std::sync::Arc::new(scrape);
    let ready = std::sync::Arc::new(ready);
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (scrape, ready) = (scrape.clone(), ready.clone());
                tasks.spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &*scrape, &*ready)).await;
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
}

async fn answer(
    mut stream: TcpStream,
    scrape: &(dyn Fn() -> String + Send + Sync),
    ready: &(dyn Fn() -> bool + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, kind) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", scrape(), "text/plain; version=0.0.4"),
        ("GET", "/livez") => ("200 OK", "ok\n".to_string(), "text/plain"),
        ("GET", "/readyz") if ready() => ("200 OK", "ready\n".to_string(), "text/plain"),
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "shutting down\n".to_string(),
            "text/plain",
        ),
        ("GET", _) => (
            "404 Not Found",
            "try /metrics, /livez or /readyz\n".to_string(),
            "text/plain",
        ),
        _ => (
            "405 Method Not Allowed",
            "GET only\n".to_string(),
            "text/plain",
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        Metrics::inc(&m.connects_ok);
        Metrics::inc(&m.connects_ok);
        Metrics::inc(m.path(PathKind::Relay));
        let text = render(
            &m,
            Gauges {
                cameras: 3,
                ..Default::default()
            },
        );
        assert!(text.contains("peercam_cameras_registered 3\n"), "{text}");
        assert!(
            text.contains("peercam_connects_total{outcome=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE peercam_connects_total counter"),
            "{text}"
        );
        for line in [
            "peercam_paths_total{path=\"relay\"} 1\n",
            "peercam_paths_total{path=\"direct\"} 0\n",
            "peercam_paths_total{path=\"lan\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
