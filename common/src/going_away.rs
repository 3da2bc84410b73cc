//! Reconnect spreading on a rendezvous shutdown: how long a rendezvous asks its cameras
//! to spread their reconnects over, and when one camera reconnects within that window.
//!
//! On shutdown the rendezvous sends each camera `FromRendezvous::GoingAway
//! { reconnect_within_ms }` before closing with `close::SHUTDOWN`, so that a restart does
//! not bring every camera back within the same second (`BENCHMARKS.md`, restart). Both
//! sides' decisions live here, with no I/O, no clock and the random draw passed in; the
//! rendezvous and camera-agent only execute them.

use std::time::Duration;

/// Default registrations per second a rendezvous asks its cameras not to exceed when they
/// come back: a sixth of the ~3,300/s peak measured on 2 shared vCPUs with the load
/// generator on the same cores. The cameras that draw a delay shorter than the restart
/// itself (1–4.5 s measured) pile up and arrive at once when the new process answers:
/// at 2,000/s 40–96 registrations of 10,000 timed out, at 1,000/s 0 to 4,030 depending on
/// how long the restart took, at 500/s none (`BENCHMARKS.md`).
pub const DEFAULT_REGISTRATION_RATE: f64 = 500.0;
/// Shortest window announced: a small fleet reconnects as fast as the camera's backoff
/// base (0–0.5 s) would anyway.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);
/// Longest window announced, and longest a camera accepts: an announced window is a
/// peer's input, so a broken or hostile rendezvous cannot park cameras for hours.
pub const MAX_WINDOW: Duration = Duration::from_secs(120);

/// How a rendezvous sizes the window it announces: its fleet divided by the registration
/// rate it sustains, within `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Registrations per second the rendezvous (or its replacement) sustains.
    pub rate: f64,
    /// Shortest window.
    pub min: Duration,
    /// Longest window.
    pub max: Duration,
}

impl Default for Spread {
    fn default() -> Self {
        Spread {
            rate: DEFAULT_REGISTRATION_RATE,
            min: MIN_WINDOW,
            max: MAX_WINDOW,
        }
    }
}

impl Spread {
    /// The window to announce to `cameras` registered cameras: `cameras / rate` seconds,
    /// clamped to `[min, max]`. A rate that is not a positive number gives `max`.
    pub fn window(&self, cameras: usize) -> Duration {
        let max = self.max.max(self.min);
        let secs = cameras as f64 / self.rate;
        if !(secs.is_finite() && secs >= 0.0) {
            return max;
        }
        Duration::try_from_secs_f64(secs)
            .unwrap_or(max)
            .clamp(self.min.min(max), max)
    }
}

/// The window announced in milliseconds, as sent in `GoingAway` (saturating).
pub fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

/// The window a camera accepts from `GoingAway { reconnect_within_ms }`: as announced, at
/// most [`MAX_WINDOW`].
pub fn accepted_window(reconnect_within_ms: u64) -> Duration {
    Duration::from_millis(reconnect_within_ms).min(MAX_WINDOW)
}

/// A camera's delay before its first reconnect after `GoingAway { reconnect_within_ms }`:
/// uniform in the [`accepted_window`] given `unit`, a random number in `[0, 1)`.
pub fn first_reconnect_delay(reconnect_within_ms: u64, unit: f64) -> Duration {
    let window = accepted_window(reconnect_within_ms);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    window.mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_fleet_over_rate() {
        let s = Spread::default();
        assert_eq!(s.window(10_000), Duration::from_secs(20));
        assert_eq!(s.window(3_000), Duration::from_secs(6));
        let fast = Spread {
            rate: 2000.0,
            ..Spread::default()
        };
        assert_eq!(fast.window(10_000), Duration::from_secs(5));
    }

    #[test]
    fn window_is_clamped() {
        let s = Spread::default();
        assert_eq!(s.window(0), MIN_WINDOW);
        assert_eq!(s.window(1), MIN_WINDOW);
        assert_eq!(s.window(249), MIN_WINDOW);
        assert_eq!(s.window(251), Duration::from_millis(502));
        assert_eq!(s.window(10_000_000), MAX_WINDOW);
        for rate in [0.0, -3.0, f64::NAN] {
            let bad = Spread {
                rate,
                ..Spread::default()
            };
            assert_eq!(bad.window(10), MAX_WINDOW, "rate {rate}");
        }
        let tiny = Spread {
            rate: f64::MIN_POSITIVE,
            ..Spread::default()
        };
        assert_eq!(tiny.window(usize::MAX), MAX_WINDOW);
        // min above max: no panic in clamp, the larger bound wins.
        let inverted = Spread {
            rate: 1.0,
            min: Duration::from_secs(10),
            max: Duration::from_secs(2),
        };
        assert_eq!(inverted.window(1), Duration::from_secs(10));
        assert_eq!(window_ms(Duration::from_millis(4321)), 4321);
    }

    #[test]
    fn camera_delay_is_uniform_within_window() {
        assert_eq!(first_reconnect_delay(5000, 0.0), Duration::ZERO);
        assert_eq!(
            first_reconnect_delay(5000, 0.5),
            Duration::from_millis(2500)
        );
        assert_eq!(
            first_reconnect_delay(5000, 0.999_999).as_millis(),
            4999,
            "just under the window"
        );
        assert_eq!(first_reconnect_delay(5000, 7.0), Duration::from_secs(5));
        assert_eq!(first_reconnect_delay(5000, f64::NAN), Duration::ZERO);
        assert_eq!(first_reconnect_delay(0, 0.9), Duration::ZERO);
    }

    #[test]
    fn camera_caps_an_announced_window() {
        assert_eq!(first_reconnect_delay(u64::MAX, 1.0), MAX_WINDOW);
        assert_eq!(first_reconnect_delay(3_600_000, 0.5), MAX_WINDOW / 2);
        assert_eq!(accepted_window(u64::MAX), MAX_WINDOW);
        assert_eq!(accepted_window(4321), Duration::from_millis(4321));
    }
}
