//! The registry: which cameras are online, with which key, reachable where, visible to
//! whom. Pure logic: no sockets, no tasks, time passed in.
//!
//! Rules it enforces:
//! - a camera ID is held by one key; a registration with another key is refused while the
//!   holder is online and for a pin period after it left (no last-writer-wins);
//! - the same key registering again (a reconnect) replaces the old connection;
//! - a lookup answers "unavailable" alike for unknown and forbidden cameras, and "offline"
//!   only to viewers the camera's last access list allowed;
//! - each viewer's lookups are rate-limited by a token bucket.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peercam_certs::Fingerprint;
use peercam_common::rdv::Refusal;
use peercam_common::{CameraId, ViewerId};

/// Identifies one QUIC connection inside the rendezvous.
pub type ConnId = u64;

/// Tunables of the registry.
#[derive(Debug, Clone)]
pub struct RegistryLimits {
    /// How long a camera ID stays pinned to its key after the camera disconnects.
    pub pin: Duration,
    /// How long an offline camera is remembered (for "offline" answers).
    pub remember: Duration,
    /// Lookups a viewer may make in a burst.
    pub lookup_burst: f64,
    /// Lookups per second a viewer may sustain.
    pub lookup_rate: f64,
    /// Most cameras remembered (online or offline).
    pub max_cameras: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            pin: Duration::from_secs(600),
            remember: Duration::from_secs(24 * 3600),
            lookup_burst: 20.0,
            lookup_rate: 2.0,
            max_cameras: 1_000_000,
        }
    }
}

/// A registered camera.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    /// Its connection.
    pub conn: ConnId,
    /// Its address as seen by the rendezvous.
    pub observed: SocketAddr,
    /// Its host candidates.
    pub local: Vec<SocketAddr>,
}

#[derive(Debug)]
struct Entry {
    key: Fingerprint,
    access: HashSet<ViewerId>,
    online: Option<Online>,
    last_seen: Instant,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Another key holds this ID.
    #[error("camera ID is held by another key")]
    IdTaken,
    /// The registry is full.
    #[error("registry full")]
    Full,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The registry of cameras and the viewers' rate limits.
#[derive(Debug)]
pub struct Registry {
    limits: RegistryLimits,
    cameras: HashMap<CameraId, Entry>,
    buckets: HashMap<ViewerId, Bucket>,
}

impl Registry {
    /// An empty registry.
    pub fn new(limits: RegistryLimits) -> Self {
        Registry {
            limits,
            cameras: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// Registers `camera` on connection `online.conn`. Returns the connection it replaced
    /// (same key, reconnect), which the caller should close.
    pub fn register(
        &mut self,
        now: Instant,
        camera: &CameraId,
        key: Fingerprint,
        access: HashSet<ViewerId>,
        online: Online,
    ) -> Result<Option<ConnId>, RegisterError> {
        if let Some(entry) = self.cameras.get_mut(camera) {
            let pinned = entry.online.is_some() || now < entry.last_seen + self.limits.pin;
            if entry.key != key && pinned {
                return Err(RegisterError::IdTaken);
            }
            let replaced = entry.online.take().map(|o| o.conn);
            *entry = Entry {
                key,
                access,
                online: Some(online),
                last_seen: now,
            };
            return Ok(replaced.filter(|c| Some(*c) != entry.online.as_ref().map(|o| o.conn)));
        }
        if self.cameras.len() >= self.limits.max_cameras {
            self.forget_stale(now);
            if self.cameras.len() >= self.limits.max_cameras {
                return Err(RegisterError::Full);
            }
        }
        self.cameras.insert(
            camera.clone(),
            Entry {
                key,
                access,
                online: Some(online),
                last_seen: now,
            },
        );
        Ok(None)
    }

    /// Replaces the access list of a camera registered on `conn`.
    pub fn set_access(&mut self, camera: &CameraId, conn: ConnId, access: HashSet<ViewerId>) {
        if let Some(e) = self.cameras.get_mut(camera) {
            if e.online.as_ref().is_some_and(|o| o.conn == conn) {
                e.access = access;
            }
        }
    }

    /// Marks the camera offline if `conn` is still its connection.
    pub fn unregister(&mut self, now: Instant, camera: &CameraId, conn: ConnId) {
        if let Some(e) = self.cameras.get_mut(camera) {
            if e.online.as_ref().is_some_and(|o| o.conn == conn) {
                e.online = None;
                e.last_seen = now;
            }
        }
    }

    /// Finds `camera` for `viewer`, applying the access list and the rate limit.
    pub fn lookup(
        &mut self,
        now: Instant,
        viewer: &ViewerId,
        camera: &CameraId,
    ) -> Result<Online, Refusal> {
        self.take_token(now, viewer)?;
        let Some(entry) = self.cameras.get(camera) else {
            return Err(Refusal::Unavailable);
        };
        if !entry.access.contains(viewer) {
            return Err(Refusal::Unavailable);
        }
        match &entry.online {
            Some(online) => Ok(online.clone()),
            None if now < entry.last_seen + self.limits.remember => Err(Refusal::Offline {
                last_seen_secs: now.saturating_duration_since(entry.last_seen).as_secs(),
            }),
            None => Err(Refusal::Unavailable),
        }
    }

    /// The camera's connection, if it is online (no access check, no rate limit: for
    /// introductions another cluster node already checked).
    pub fn online(&self, camera: &CameraId) -> Option<&Online> {
        self.cameras.get(camera)?.online.as_ref()
    }

    /// Whether `viewer` may view `camera` according to the registered access list.
    pub fn allowed(&self, viewer: &ViewerId, camera: &CameraId) -> bool {
        self.cameras
            .get(camera)
            .is_some_and(|e| e.access.contains(viewer))
    }

    /// Number of cameras online now.
    pub fn online_count(&self) -> usize {
        self.cameras.values().filter(|e| e.online.is_some()).count()
    }

    fn take_token(&mut self, now: Instant, viewer: &ViewerId) -> Result<(), Refusal> {
        let (burst, rate) = (self.limits.lookup_burst, self.limits.lookup_rate);
        if self.buckets.len() > 100_000 {
            // Full buckets carry no information: drop them to bound memory.
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = self.buckets.entry(viewer.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            let wait = (1.0 - b.tokens) / rate;
            return Err(Refusal::RateLimited {
                retry_after_ms: (wait * 1000.0).ceil() as u64,
            });
        }
        b.tokens -= 1.0;
        Ok(())
    }

    fn forget_stale(&mut self, now: Instant) {
        let remember = self.limits.remember.max(self.limits.pin);
        self.cameras
            .retain(|_, e| e.online.is_some() || now < e.last_seen + remember);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam(s: &str) -> CameraId {
        CameraId::new(s).expect("id")
    }
    fn viewer(s: &str) -> ViewerId {
        ViewerId::new(s).expect("id")
    }
    fn online(conn: ConnId) -> Online {
        Online {
            conn,
            observed: "198.18.0.5:4000".parse().expect("addr"),
            local: vec![],
        }
    }
    fn key(b: u8) -> Fingerprint {
        Fingerprint([b; 32])
    }
    fn acl(v: &[&str]) -> HashSet<ViewerId> {
        v.iter().map(|s| viewer(s)).collect()
    }

    #[test]
    fn second_key_never_displaces_the_first() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryLimits::default());
        r.register(t0, &cam("c"), key(1), acl(&["v"]), online(1))
            .expect("first");
        assert_eq!(
            r.register(t0, &cam("c"), key(2), acl(&["evil"]), online(2)),
            Err(RegisterError::IdTaken)
        );
        assert_eq!(
            r.lookup(t0, &viewer("v"), &cam("c")).expect("found").conn,
            1
        );
        // Still pinned shortly after the genuine camera left.
        r.unregister(t0, &cam("c"), 1);
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            r.register(t1, &cam("c"), key(2), acl(&[]), online(3)),
            Err(RegisterError::IdTaken)
        );
        // The genuine key comes back fine.
        assert_eq!(
            r.register(t1, &cam("c"), key(1), acl(&["v"]), online(4)),
            Ok(None)
        );
    }

    #[test]
    fn same_key_reconnect_replaces_old_connection() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryLimits::default());
        r.register(t0, &cam("c"), key(1), acl(&["v"]), online(1))
            .expect("first");
        assert_eq!(
            r.register(t0, &cam("c"), key(1), acl(&["v"]), online(2)),
            Ok(Some(1))
        );
        // The stale connection going away does not take the new one offline.
        r.unregister(t0, &cam("c"), 1);
        assert_eq!(
            r.lookup(t0, &viewer("v"), &cam("c")).expect("online").conn,
            2
        );
    }

    #[test]
    fn unknown_and_forbidden_answer_alike_offline_only_to_allowed() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryLimits::default());
        r.register(t0, &cam("c"), key(1), acl(&["v"]), online(1))
            .expect("first");
        let forbidden = r.lookup(t0, &viewer("x"), &cam("c")).unwrap_err();
        let unknown = r.lookup(t0, &viewer("x"), &cam("nope")).unwrap_err();
        assert_eq!(forbidden, Refusal::Unavailable);
        assert_eq!(forbidden, unknown);
        r.unregister(t0, &cam("c"), 1);
        let t1 = t0 + Duration::from_secs(180);
        assert_eq!(
            r.lookup(t1, &viewer("v"), &cam("c")),
            Err(Refusal::Offline {
                last_seen_secs: 180
            })
        );
        assert_eq!(
            r.lookup(t1, &viewer("x"), &cam("c")),
            Err(Refusal::Unavailable)
        );
    }

    #[test]
    fn lookups_are_rate_limited_per_viewer() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryLimits {
            lookup_burst: 3.0,
            lookup_rate: 1.0,
            ..RegistryLimits::default()
        });
        for _ in 0..3 {
            assert_eq!(
                r.lookup(t0, &viewer("x"), &cam("a")),
                Err(Refusal::Unavailable)
            );
        }
        assert!(matches!(
            r.lookup(t0, &viewer("x"), &cam("a")),
            Err(Refusal::RateLimited {
                retry_after_ms: 1000
            })
        ));
        // Another viewer is not affected; time refills the bucket.
        assert_eq!(
            r.lookup(t0, &viewer("y"), &cam("a")),
            Err(Refusal::Unavailable)
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            r.lookup(t1, &viewer("x"), &cam("a")),
            Err(Refusal::Unavailable)
        );
    }
}
