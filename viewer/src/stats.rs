//! What the viewer measures and reports: frames, bytes, time to first frame, frame
//! latency (with the camera's clock offset estimated over the connection), GOPs dropped.
//! Pure: times are passed in.

use std::time::Duration;

use serde::Serialize;

/// Most latency samples kept (about an hour at 25 fps); later ones are sampled.
const MAX_SAMPLES: usize = 100_000;

/// Clock offset estimate from ping/pong exchanges: keeps the one with the smallest RTT,
/// whose midpoint assumption is the most accurate.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClockOffset {
    best: Option<(u64, i64)>, // (rtt_us, camera - viewer in us)
}

impl ClockOffset {
    /// Adds a probe: sent at `t0` and answered at `t1` (viewer clock), stamped `tc` by the
    /// camera. All in microseconds since the Unix epoch.
    pub fn add(&mut self, t0: u64, tc: u64, t1: u64) {
        if t1 < t0 {
            return;
        }
        let rtt = t1 - t0;
        let offset = tc as i64 - (t0 as i64 + (rtt / 2) as i64);
        if self.best.is_none_or(|(r, _)| rtt < r) {
            self.best = Some((rtt, offset));
        }
    }

    /// Camera clock minus viewer clock, in microseconds (0 before any probe).
    pub fn offset_us(&self) -> i64 {
        self.best.map(|(_, o)| o).unwrap_or(0)
    }

    /// The RTT of the best probe.
    pub fn rtt(&self) -> Option<Duration> {
        self.best.map(|(r, _)| Duration::from_micros(r))
    }
}

/// Running statistics of one viewing session.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames written to the sink.
    pub frames: u64,
    /// Payload bytes written.
    pub bytes: u64,
    /// GOPs lost: reset by the camera, abandoned here, or skipped (sequence gaps).
    pub gops_dropped: u64,
    /// Frames (blocks of large frames) rebuilt from the camera's parity datagrams.
    pub repaired: u64,
    /// Time from start to the first decodable frame.
    pub ttff: Option<Duration>,
    /// Time from start to the connection to the camera.
    pub connected: Option<Duration>,
    // receive time minus capture time, raw clocks (viewer - camera), per live frame
    deltas: Vec<i64>,
    seen_live: u64,
}

impl Stats {
    /// Records a frame written: `recv_us` on the viewer's clock, `capture_us` on the
    /// camera's. Cached frames (sent from the GOP cache) do not count towards latency.
    pub fn frame(&mut self, bytes: usize, recv_us: u64, capture_us: u64, cached: bool) {
        self.frames += 1;
        self.bytes += bytes as u64;
        if cached {
            return;
        }
        self.seen_live += 1;
        let delta = recv_us as i64 - capture_us as i64;
        if self.deltas.len() < MAX_SAMPLES {
            self.deltas.push(delta);
        } else {
            // Reservoir sampling keeps the percentiles representative.
            let slot =
                (self.seen_live.wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.seen_live) as usize;
            if let Some(s) = self.deltas.get_mut(slot) {
                *s = delta;
            }
        }
    }

    /// Frame latency percentile `q` (0..=1) in milliseconds, given the clock offset.
    pub fn latency_ms(&self, q: f64, offset: &ClockOffset) -> Option<f64> {
        if self.deltas.is_empty() {
            return None;
        }
        let mut v: Vec<i64> = self.deltas.iter().map(|d| d + offset.offset_us()).collect();
        v.sort_unstable();
        let idx = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(v[idx].max(0) as f64 / 1000.0)
    }

    /// Latency of the most recent live frame, in milliseconds.
    pub fn last_latency_ms(&self, offset: &ClockOffset) -> Option<f64> {
        self.deltas
            .last()
            .map(|d| (d + offset.offset_us()).max(0) as f64 / 1000.0)
    }
}

/// The JSON summary printed at exit with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The camera watched.
    pub camera: String,
    /// `lan`, `direct` or `relay`.
    pub path: String,
    /// The camera's address used.
    pub remote: String,
    /// Frames received and written.
    pub frames: u64,
    /// Video bytes received and written.
    pub bytes: u64,
    /// Start to first decodable frame, ms.
    pub ttff_ms: Option<f64>,
    /// Start to connected to the camera, ms.
    pub connect_ms: Option<f64>,
    /// Frame latency (capture to received) median, ms.
    pub latency_p50_ms: Option<f64>,
    /// Frame latency 99th percentile, ms.
    pub latency_p99_ms: Option<f64>,
    /// Largest frame latency, ms.
    pub latency_max_ms: Option<f64>,
    /// GOPs lost.
    pub gops_dropped: u64,
    /// Frames (blocks of large frames) rebuilt from parity instead of waiting for a
    /// retransmission.
    pub repaired: u64,
    /// Round-trip time to the camera, ms.
    pub rtt_ms: f64,
    /// Camera clock minus viewer clock, ms.
    pub clock_offset_ms: f64,
    /// Seconds from start to end.
    pub duration_s: f64,
    /// Why the session ended.
    pub ended: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_uses_the_fastest_probe() {
        let mut c = ClockOffset::default();
        // camera is 5 s ahead; a slow asymmetric probe, then a fast one
        c.add(1_000_000, 6_090_000, 1_100_000);
        c.add(2_000_000, 7_000_500, 2_001_000);
        assert_eq!(c.offset_us(), 5_000_000);
        assert_eq!(c.rtt(), Some(Duration::from_micros(1000)));
    }

    #[test]
    fn latency_percentiles_correct_for_offset_and_skip_cached() {
        let mut s = Stats::default();
        let mut c = ClockOffset::default();
        c.add(0, 10_000_000, 0); // camera 10 s ahead, zero rtt
        for i in 0..100u64 {
            // captured at camera time T, received 20..119 ms later on the viewer clock
            let capture = 10_000_000 + i * 40_000;
            let recv = capture - 10_000_000 + 20_000 + i * 1000;
            s.frame(100, recv, capture, false);
        }
        s.frame(100, 0, 0, true);
        assert_eq!(s.frames, 101);
        assert_eq!(s.latency_ms(0.5, &c), Some(70.0));
        assert_eq!(s.latency_ms(0.99, &c), Some(118.0));
        assert_eq!(s.latency_ms(1.0, &c), Some(119.0));
    }
}
