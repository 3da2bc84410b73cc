//! What the agent reports about itself: identity, certificate expiry, registration, the
//! viewers being served, and warnings in plain words.
//!
//! The agent's tasks update [`ViewerStats`]; [`crate::Handle::report`] assembles a
//! [`Report`]. Serving it (an admin socket) is the binary's business.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Days before expiry from which the certificate is reported as expiring.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
/// A clock difference to a viewer above this is reported.
pub const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(2);

/// Counters of one viewer connection, updated by its streaming task.
#[derive(Debug)]
pub(crate) struct ViewerStats {
    pub(crate) viewer: String,
    pub(crate) remote: String,
    pub(crate) path: &'static str,
    pub(crate) since: Instant,
    pub(crate) conn: quinn::Connection,
    pub(crate) frames: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Viewer clock minus camera clock, microseconds (from its pings).
    pub(crate) skew_us: AtomicI64,
}

impl ViewerStats {
    pub(crate) fn new(viewer: String, conn: quinn::Connection, path: &'static str) -> Arc<Self> {
        Arc::new(ViewerStats {
            viewer,
            remote: conn.remote_address().to_string(),
            path,
            since: Instant::now(),
            conn,
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            skew_us: AtomicI64::new(0),
        })
    }

    pub(crate) fn sent(&self, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn report(&self) -> ViewerReport {
        let secs = self.since.elapsed().as_secs_f64().max(0.001);
        ViewerReport {
            viewer: self.viewer.clone(),
            remote: self.remote.clone(),
            path: self.path.to_string(),
            rtt_ms: self.conn.rtt().as_secs_f64() * 1000.0,
            fps: self.frames.load(Ordering::Relaxed) as f64 / secs,
            bitrate_kbps: self.bytes.load(Ordering::Relaxed) as f64 * 8.0 / secs / 1000.0,
            connected_secs: secs.round() as u64,
            clock_skew_ms: self.skew_us.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }
}

/// One viewer in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewerReport {
    /// Viewer ID.
    pub viewer: String,
    /// Its address.
    pub remote: String,
    /// `lan`, `direct` or `relay`.
    pub path: String,
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Average frames per second sent.
    pub fps: f64,
    /// Average bitrate sent, kbit/s.
    pub bitrate_kbps: f64,
    /// Seconds connected.
    pub connected_secs: u64,
    /// Its clock minus ours, ms.
    pub clock_skew_ms: f64,
}

/// The agent's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Camera ID.
    pub camera: String,
    /// Certificate end of validity (RFC 3339).
    pub certificate_expires: String,
    /// Days until then.
    pub certificate_days_left: i64,
    /// Whether registered with a rendezvous now.
    pub registered: bool,
    /// Address the rendezvous sees.
    pub observed: Option<String>,
    /// Registrations since start.
    pub registrations: u64,
    /// Last registration error.
    pub last_error: Option<String>,
    /// Viewers connected now.
    pub viewers: Vec<ViewerReport>,
    /// Problems, in plain words.
    pub warnings: Vec<String>,
}

/// Builds the report from the parts the agent keeps.
pub(crate) fn report(
    camera: &str,
    not_after: i64,
    status: &crate::Status,
    viewers: Vec<ViewerReport>,
    unregistered_for: Option<Duration>,
) -> Report {
    let now = peercam_common::unix_micros() as i64 / 1_000_000;
    let days_left = (not_after - now).div_euclid(86_400);
    let mut warnings = Vec::new();
    if days_left < 0 {
        warnings.push(
            "the camera's certificate has expired: issue a new one with `certs sign-csr`".into(),
        );
    } else if days_left < EXPIRY_WARNING_DAYS {
        warnings.push(format!(
            "the camera's certificate expires in {days_left} days: issue a new one with `certs sign-csr`"
        ));
    }
    if let Some(d) = unregistered_for.filter(|d| *d > Duration::from_secs(10)) {
        let why = status.last_error.as_deref().unwrap_or("no answer");
        warnings.push(format!(
            "not registered for {} s ({why}): check that UDP to the rendezvous is allowed",
            d.as_secs()
        ));
    }
    for v in &viewers {
        if v.clock_skew_ms.abs() > CLOCK_SKEW_WARNING.as_secs_f64() * 1000.0 {
            warnings.push(format!(
                "this camera's clock differs from viewer {}'s by {:.1} s: check NTP (latency figures are off)",
                v.viewer,
                v.clock_skew_ms / 1000.0
            ));
        }
    }
    Report {
        camera: camera.to_string(),
        certificate_expires: peercam_certs::inspect::format_time(not_after),
        certificate_days_left: days_left,
        registered: status.registered.is_some(),
        observed: status.registered.map(|a| a.to_string()),
        registrations: status.registrations,
        last_error: status.last_error.clone(),
        viewers,
        warnings,
    }
}

impl Report {
    /// The report as lines for a terminal.
    pub fn human(&self) -> String {
        let mut s = format!(
            "camera {}\n  certificate:  expires {} ({} days)\n  registration: {}\n",
            self.camera,
            self.certificate_expires,
            self.certificate_days_left,
            match (&self.observed, &self.last_error) {
                (Some(o), _) => format!(
                    "registered, seen at {o} ({} registrations)",
                    self.registrations
                ),
                (None, Some(e)) => format!("NOT registered: {e}"),
                (None, None) => "not registered yet".into(),
            }
        );
        s += &format!("  viewers:      {}\n", self.viewers.len());
        for v in &self.viewers {
            s += &format!(
                "    {} via {} {}  rtt {:.1} ms  {:.0} kbit/s  {:.1} fps  for {} s\n",
                v.viewer, v.path, v.remote, v.rtt_ms, v.bitrate_kbps, v.fps, v.connected_secs
            );
        }
        for w in &self.warnings {
            s += &format!("  warning: {w}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer(skew_ms: f64) -> ViewerReport {
        ViewerReport {
            viewer: "alice".into(),
            remote: "198.18.0.12:4000".into(),
            path: "direct".into(),
            rtt_ms: 20.0,
            fps: 25.0,
            bitrate_kbps: 1000.0,
            connected_secs: 10,
            clock_skew_ms: skew_ms,
        }
    }

    #[test]
    fn warnings_in_plain_words() {
        let now = peercam_common::unix_micros() as i64 / 1_000_000;
        let unregistered = crate::Status {
            last_error: Some("198.18.0.1:7400 did not answer".into()),
            ..Default::default()
        };
        let r = report(
            "cam-1",
            now + 5 * 86_400 + 60,
            &unregistered,
            vec![viewer(4500.0)],
            Some(Duration::from_secs(30)),
        );
        let all = r.warnings.join("\n");
        assert!(all.contains("certificate expires in 5 days"), "{all}");
        assert!(
            all.contains("not registered for 30 s (198.18.0.1:7400 did not answer)"),
            "{all}"
        );
        assert!(
            all.contains("clock differs from viewer alice's by 4.5 s"),
            "{all}"
        );
        assert!(r.human().contains("NOT registered"));
        // A healthy agent has nothing to say.
        let ok = crate::Status {
            registered: Some("198.18.0.11:4000".parse().unwrap()),
            registrations: 1,
            ..Default::default()
        };
        let r = report("cam-1", now + 400 * 86_400, &ok, vec![viewer(3.0)], None);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let r = report("cam-1", now - 86_400, &ok, vec![], None);
        assert!(r.warnings[0].contains("has expired"));
    }
}
