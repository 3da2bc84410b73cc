//! One source, many viewers: the current GOP cache and the live broadcast.
//!
//! The source publishes frames; each viewer subscribes and gets, atomically, the frames of
//! the current GOP so far (so it starts at once from the last keyframe) plus a receiver for
//! every later frame. The broadcast is bounded: a viewer that falls behind loses frames
//! (and skips to the next keyframe) instead of holding memory or slowing anyone else.

use std::sync::{Arc, Mutex, MutexGuard};

use peercam_common::media::{Frame, StreamInfo};
use tokio::sync::{broadcast, watch};

/// Frames buffered per viewer before it counts as lagging: about 5 s at 25 fps, 2 s at
/// 60 fps, more than the latency budget. The broadcast keeps this many frames alive whether
/// or not anyone watches (512 held ~10 MB of a 4 Mbit/s stream), so it stays near what a
/// viewer within the budget can use. A power of two: tokio rounds up to one anyway.
pub const BROADCAST_DEPTH: usize = 128;
/// Most frames kept in the GOP cache (a source with a keyframe interval longer than this
/// cannot give late viewers an instant start, but memory stays bounded).
pub const MAX_CACHED_FRAMES: usize = 600;
/// Most bytes kept in the GOP cache.
pub const MAX_CACHED_BYTES: usize = 64 * 1024 * 1024;

/// A frame with the GOP it belongs to.
#[derive(Debug, Clone)]
pub struct Published {
    /// GOP sequence number.
    pub gop: u64,
    /// The frame.
    pub frame: Arc<Frame>,
}

#[derive(Debug, Default)]
struct Cache {
    gop: u64,
    frames: Vec<Arc<Frame>>,
    bytes: usize,
    truncated: bool,
}

/// The fan-out point between the source and the viewers.
#[derive(Debug)]
pub struct Fanout {
    cache: Mutex<Cache>,
    tx: broadcast::Sender<Published>,
    info: watch::Sender<Option<StreamInfo>>,
}

/// What a new viewer starts with.
#[derive(Debug)]
pub struct Subscription {
    /// GOP of the cached frames.
    pub gop: u64,
    /// The current GOP's frames so far, from its keyframe (empty before the first one).
    pub cached: Vec<Arc<Frame>>,
    /// Every frame published after `cached`.
    pub live: broadcast::Receiver<Published>,
}

impl Default for Fanout {
    fn default() -> Self {
        Self::new()
    }
}

impl Fanout {
    /// An empty fan-out.
    pub fn new() -> Self {
        Fanout {
            cache: Mutex::default(),
            tx: broadcast::channel(BROADCAST_DEPTH).0,
            info: watch::channel(None).0,
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the codec parameters viewers receive first.
    pub fn set_info(&self, info: StreamInfo) {
        self.info.send_if_modified(|cur| {
            let changed = cur.as_ref() != Some(&info);
            *cur = Some(info);
            changed
        });
    }

    /// Waits until stream parameters are known.
    pub async fn info(&self) -> Option<StreamInfo> {
        let mut rx = self.info.subscribe();
        let got = rx.wait_for(|i| i.is_some()).await.ok()?;
        got.clone()
    }

    /// Publishes a frame. Frames before the first keyframe are dropped: nobody could
    /// decode them.
    pub fn publish(&self, frame: Frame) {
        let frame = Arc::new(frame);
        let mut cache = self.cache();
        if frame.keyframe {
            cache.gop += 1;
            cache.frames.clear();
            cache.bytes = 0;
            cache.truncated = false;
        } else if cache.gop == 0 {
            return;
        }
        if !cache.truncated {
            if cache.frames.len() < MAX_CACHED_FRAMES
                && cache.bytes + frame.data.len() <= MAX_CACHED_BYTES
            {
                cache.bytes += frame.data.len();
                cache.frames.push(frame.clone());
            } else {
                // A cache with a hole would hand out undecodable frames: stop caching.
                cache.truncated = true;
                cache.frames.clear();
                cache.bytes = 0;
            }
        }
        let gop = cache.gop;
        // Sending under the lock keeps cache and broadcast in one order for subscribers.
        let _ = self.tx.send(Published { gop, frame });
    }

    /// Subscribes a new viewer.
    pub fn subscribe(&self) -> Subscription {
        let cache = self.cache();
        Subscription {
            gop: cache.gop,
            cached: cache.frames.clone(),
            live: self.tx.subscribe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(n: u64, key: bool) -> Frame {
        Frame {
            pts: n,
            capture_us: n,
            keyframe: key,
            data: Bytes::from(vec![n as u8; 10]),
        }
    }

    #[test]
    fn late_viewer_starts_at_the_last_keyframe_without_gaps() {
        let f = Fanout::new();
        f.publish(frame(0, false)); // before any keyframe: dropped
        f.publish(frame(1, true));
        f.publish(frame(2, false));
        f.publish(frame(3, true));
        f.publish(frame(4, false));
        let mut sub = f.subscribe();
        assert_eq!(sub.gop, 2);
        let cached: Vec<u64> = sub.cached.iter().map(|f| f.pts).collect();
        assert_eq!(cached, [3, 4]);
        f.publish(frame(5, false));
        let next = sub.live.try_recv().expect("live frame");
        assert_eq!((next.gop, next.frame.pts), (2, 5));
    }

    #[test]
    fn slow_viewer_lags_instead_of_growing_memory() {
        let f = Fanout::new();
        let mut sub = f.subscribe();
        for n in 0..(BROADCAST_DEPTH as u64 + 10) {
            f.publish(frame(n, n % 25 == 0));
        }
        assert!(matches!(
            sub.live.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }
}
