//! Cluster mode: several rendezvous nodes share presence and signalling through Redis, so a
//! camera registered on node A is reachable by a viewer connected to node B.
//!
//! Owns the Redis side: presence records of this node's cameras (claimed at registration,
//! refreshed before their TTL runs out, released on a clean unregister), the node's
//! liveness key, and the node's channel on which introductions for its cameras arrive and
//! answers to its own forwarded introductions come back. It does not own the QUIC side:
//! delivering a forwarded introduction to a local camera, closing evicted cameras and
//! answering viewers stay in `server`, which receives [`Inbound`] messages for them.
//!
//! Redis being unreachable never stops a node: local cameras stay reachable for local
//! viewers, errors are counted and logged once per outage, and registrations that could
//! not be claimed are claimed by the next refresh (and closed then if another key holds
//! the ID). What is in Redis is decoded as untrusted input ([`record`]).

mod driver;
pub mod record;
mod scripts;

pub use driver::Driver;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use peercam_common::config::redact_url;
use peercam_common::rdv::RelayOffer;
use peercam_common::{CameraId, SessionId, ViewerId};
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use record::{keys, VERSION};
pub use record::{NodeId, Presence, Reply, Signal};
use scripts::Scripts;

/// Forwarded introductions this node handles at once; more are answered `Timeout`.
pub const MAX_INBOUND: usize = 256;
/// Queued presence writes (releases, access list changes) before new ones are dropped
/// (the refresh and the TTL repair what a dropped write leaves).
const MAX_WRITES: usize = 1024;
/// Shortest refresh period, whatever the TTLs.
const MIN_PERIOD: Duration = Duration::from_millis(100);
/// Presence records refreshed concurrently.
const REFRESH_CONCURRENCY: usize = 32;

/// Cluster settings of one node.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379` (`rediss://` is not built in).
    pub redis: String,
    /// This node's name, unique in the cluster.
    pub node: NodeId,
    /// Lifetime of a camera's presence record without refresh (refreshed every third).
    pub presence_ttl: Duration,
    /// Lifetime of the node's liveness key without refresh.
    pub node_ttl: Duration,
    /// Longest wait for any one Redis command or connection.
    pub redis_timeout: Duration,
}

impl ClusterConfig {
    /// Settings for `node` on `redis`, with default TTLs (30 s presence, 15 s node).
    pub fn new(redis: impl Into<String>, node: NodeId) -> Self {
        ClusterConfig {
            redis: redis.into(),
            node,
            presence_ttl: Duration::from_secs(30),
            node_ttl: Duration::from_secs(15),
            redis_timeout: Duration::from_secs(1),
        }
    }

    /// How often presence records are rewritten: three times per TTL.
    fn presence_every(&self) -> Duration {
        (self.presence_ttl / 3).max(MIN_PERIOD)
    }

    /// How often the node key is rewritten and the subscription pinged.
    fn node_every(&self) -> Duration {
        (self.node_ttl / 3).max(MIN_PERIOD)
    }
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Redis URL is not valid.
    #[error("cluster.redis is not a usable Redis URL (expected redis://[:password@]host:port)")]
    Url(#[source] redis::RedisError),
}

/// Something the server has to do for the cluster.
#[derive(Debug)]
pub enum Inbound {
    /// Another node forwards a viewer's introduction to a camera connected here: deliver
    /// it and answer with [`Cluster::answer`].
    Intro(Forwarded),
    /// A local camera lost its claim (another key holds the ID, or a newer connection
    /// elsewhere): close its connection with `code`.
    Evict {
        /// The camera.
        camera: CameraId,
        /// Its connection here.
        conn: u64,
        /// Close code (`ID_TAKEN` or `REPLACED`).
        code: u32,
    },
}

/// An introduction forwarded by another node.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The introduction.
    pub session: SessionId,
    /// The viewer's node.
    pub from: NodeId,
    /// The camera asked for.
    pub camera: CameraId,
    /// The viewer.
    pub viewer: ViewerId,
    /// The viewer's address as its node observed it.
    pub viewer_observed: SocketAddr,
    /// The viewer's host candidates.
    pub viewer_local: Vec<SocketAddr>,
    /// Round-trip time viewer↔its node, microseconds.
    pub viewer_rtt_us: u64,
    /// A relay session on the viewer's node.
    pub relay: Option<RelayOffer>,
}

/// What Redis knows of a camera that is not connected to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Connected to another node.
    Online(Presence),
    /// Connected nowhere; this was its last record (its `at_ms` is when it was last seen).
    Seen(Presence),
}

/// Result of a claim at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The ID is ours in the whole cluster.
    Claimed,
    /// Another key holds the ID somewhere in the cluster.
    Taken,
    /// Redis did not answer: accepted locally, claimed by the next refresh.
    Deferred,
}

const UP: u8 = 1;
const DOWN: u8 = 2;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Introductions this node forwarded to another node.
    pub forwarded_out: AtomicU64,
    /// Introductions other nodes forwarded to this one.
    pub forwarded_in: AtomicU64,
    /// Forwarded introductions whose node had no listener (it is gone).
    pub forward_no_node: AtomicU64,
    /// Redis commands or connections that failed or timed out.
    pub redis_errors: AtomicU64,
    /// Values read from Redis that were rejected (oversized, malformed).
    pub bad_values: AtomicU64,
    /// Redis state: [`UP`], [`DOWN`], or 0 before the first exchange.
    state: AtomicU8,
}

struct Local {
    conn: u64,
    record: Presence,
}

enum Write {
    Release {
        camera: CameraId,
        conn: u64,
        key: Option<String>,
    },
    Refresh {
        camera: CameraId,
    },
}

/// One node's view of the cluster (shared by the server's tasks).
pub struct Cluster {
    config: ClusterConfig,
    pin: Duration,
    remember: Duration,
    redis: ConnectionManager,
    scripts: Scripts,
    url: String,
    local: Mutex<HashMap<CameraId, Local>>,
    waiting: Mutex<HashMap<SessionId, oneshot::Sender<Reply>>>,
    writes: mpsc::Sender<Write>,
    inbound: mpsc::Sender<Inbound>,
    /// Counters.
    pub stats: ClusterStats,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.config.node)
            .field("redis", &self.url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wall-clock time in Unix milliseconds (what presence records carry).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl Cluster {
    /// Prepares cluster mode (no connection yet: Redis may be down at start); the server
    /// runs the returned [`Driver`] and serves the [`Inbound`] receiver. `pin` is how long
    /// a camera ID stays held by its key after the camera left (the registry's pin),
    /// `remember` how long it is answered as "offline" (the registry's memory).
    pub fn new(
        config: ClusterConfig,
        pin: Duration,
        remember: Duration,
    ) -> Result<(Arc<Cluster>, Driver, mpsc::Receiver<Inbound>), ClusterError> {
        let client = redis::Client::open(config.redis.as_str()).map_err(ClusterError::Url)?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.redis_timeout))
            .set_response_timeout(Some(config.redis_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(ClusterError::Url)?;
        let (writes, writes_rx) = mpsc::channel(MAX_WRITES);
        let (inbound, inbound_rx) = mpsc::channel(MAX_INBOUND);
        let cluster = Arc::new(Cluster {
            url: redact_url(&config.redis),
            config,
            pin,
            remember,
            redis,
            scripts: Scripts::new(),
            local: Mutex::default(),
            waiting: Mutex::default(),
            writes,
            inbound,
            stats: ClusterStats::default(),
        });
        let driver = Driver {
            cluster: cluster.clone(),
            client,
            writes: writes_rx,
        };
        Ok((cluster, driver, inbound_rx))
    }

    /// This node's ID.
    pub fn node(&self) -> &NodeId {
        &self.config.node
    }

    /// Whether the last Redis exchange worked.
    pub fn redis_up(&self) -> bool {
        self.stats.state.load(Ordering::Relaxed) == UP
    }

    fn redis_ok(&self) {
        if self.stats.state.swap(UP, Ordering::Relaxed) != UP {
            info!(redis = %self.url, node = %self.config.node, "cluster: Redis reachable");
        }
    }

    fn redis_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        if self.stats.state.swap(DOWN, Ordering::Relaxed) != DOWN {
            warn!(redis = %self.url, %error, what,
                "cluster: Redis unreachable; serving local cameras only until it is back");
        } else {
            debug!(redis = %self.url, %error, what, "cluster: Redis still unreachable");
        }
    }

    /// Runs one Redis command under the timeout, counting failures.
    async fn call<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.config.redis_timeout, cmd).await {
            Ok(Ok(v)) => {
                self.redis_ok();
                Some(v)
            }
            Ok(Err(e)) => {
                self.redis_failed(what, &e);
                None
            }
            Err(_) => {
                self.redis_failed(what, &"timed out");
                None
            }
        }
    }

    /// Pings Redis through the command connection (which reconnects after a failure).
    async fn ping(&self) -> bool {
        let mut c = self.redis.clone();
        let cmd = redis::cmd("PING");
        self.call("ping", cmd.query_async::<String>(&mut c))
            .await
            .is_some()
    }

    async fn run_script(
        &self,
        what: &str,
        script: &redis::Script,
        camera: &CameraId,
        record: &Presence,
    ) -> Option<i64> {
        let tag = keys::owner_tag(&self.config.node, record.conn);
        let bytes = match record.encode() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cluster: presence record not written");
                return None;
            }
        };
        let mut inv = script.key(keys::presence(camera));
        inv.key(keys::owner(camera))
            .key(keys::seen(camera))
            .arg(tag)
            .arg(bytes)
            .arg(ms(self.config.presence_ttl))
            .arg(record.key.to_string())
            .arg(ms(self.pin + self.config.presence_ttl))
            .arg(ms(self.remember));
        let mut conn = self.redis.clone();
        self.call(what, inv.invoke_async(&mut conn)).await
    }

    /// A presence record for a camera registering on connection `conn` of this node.
    pub fn presence(
        &self,
        conn: u64,
        key: peercam_certs::Fingerprint,
        observed: SocketAddr,
        local: &[SocketAddr],
        access: &[ViewerId],
    ) -> Presence {
        Presence {
            v: VERSION,
            node: self.config.node.clone(),
            conn,
            key,
            observed,
            local: local.to_vec(),
            access: access.to_vec(),
            at_ms: now_ms(),
        }
    }

    /// Claims `camera` for the registration described by `record` (whose `node` must be
    /// this node) and starts refreshing it.
    pub async fn claim(&self, camera: &CameraId, record: Presence) -> Claim {
        let outcome = match self
            .run_script("claim", &self.scripts.claim, camera, &record)
            .await
        {
            Some(1) => Claim::Claimed,
            Some(_) => return Claim::Taken,
            None => Claim::Deferred,
        };
        let conn = record.conn;
        lock(&self.local).insert(camera.clone(), Local { conn, record });
        outcome
    }

    /// The camera on `conn` left: delete its record (if still its own) and stop refreshing.
    pub fn release(&self, camera: &CameraId, conn: u64) {
        let mut local = lock(&self.local);
        let key = match local.get(camera) {
            Some(l) if l.conn == conn => local.remove(camera).map(|l| l.record.key.to_string()),
            _ => None,
        };
        drop(local);
        let write = Write::Release {
            camera: camera.clone(),
            conn,
            key,
        };
        if self.writes.try_send(write).is_err() {
            debug!(%camera, "cluster: write queue full; the record will expire instead");
        }
    }

    /// The camera on `conn` changed its access list.
    pub fn set_access(&self, camera: &CameraId, conn: u64, access: Vec<ViewerId>) {
        let mut local = lock(&self.local);
        match local.get_mut(camera) {
            Some(l) if l.conn == conn => l.record.access = access,
            _ => return,
        }
        drop(local);
        let _ = self.writes.try_send(Write::Refresh {
            camera: camera.clone(),
        });
    }

    /// What Redis knows of `camera` (errors and bad values: nothing): online on another
    /// node, or its last record if it is online nowhere.
    pub async fn lookup(&self, camera: &CameraId) -> Option<Found> {
        let mut conn = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.hget(keys::presence(camera), "rec")
            .get(keys::seen(camera));
        let (online, seen): (Option<Vec<u8>>, Option<Vec<u8>>) =
            self.call("lookup", pipe.query_async(&mut conn)).await?;
        if let Some(raw) = online {
            let record = self.decode(camera, &raw)?;
            return (record.node != self.config.node).then_some(Found::Online(record));
        }
        Some(Found::Seen(self.decode(camera, &seen?)?))
    }

    fn decode(&self, camera: &CameraId, raw: &[u8]) -> Option<Presence> {
        match Presence::decode(raw) {
            Ok(r) => Some(r),
            Err(e) => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                warn!(%camera, error = %e, "cluster: ignoring a bad presence record");
                None
            }
        }
    }

    /// Forwards an introduction to the node in `to` and waits (at most `timeout`) for the
    /// camera's answer. `Reply::Gone` when that node is not listening any more.
    pub async fn forward(&self, to: &NodeId, intro: Forwarded, timeout: Duration) -> Reply {
        let session = intro.session;
        let signal = Signal::Intro {
            v: VERSION,
            session,
            from: self.config.node.clone(),
            camera: intro.camera,
            viewer: intro.viewer,
            viewer_observed: intro.viewer_observed,
            viewer_local: intro.viewer_local,
            viewer_rtt_us: intro.viewer_rtt_us,
            relay: intro.relay,
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(session, tx);
        let reply = async {
            let listeners = self.publish(to, &signal).await?;
            if listeners == 0 {
                self.stats.forward_no_node.fetch_add(1, Ordering::Relaxed);
                return Some(Reply::Gone);
            }
            self.stats.forwarded_out.fetch_add(1, Ordering::Relaxed);
            tokio::time::timeout(timeout, rx).await.ok()?.ok()
        }
        .await;
        lock(&self.waiting).remove(&session);
        reply.unwrap_or(Reply::Timeout)
    }

    /// Sends the answer to a forwarded introduction back to its node.
    pub async fn answer(&self, to: &NodeId, session: SessionId, reply: Reply) {
        let signal = Signal::Answer {
            v: VERSION,
            session,
            reply,
        };
        let _ = self.publish(to, &signal).await;
    }

    async fn publish(&self, to: &NodeId, signal: &Signal) -> Option<i64> {
        let bytes = match signal.encode() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cluster: signal not sent");
                return None;
            }
        };
        let mut conn = self.redis.clone();
        let publish = redis::AsyncCommands::publish(&mut conn, keys::channel(to), bytes);
        self.call("publish", publish).await
    }

    /// A message from this node's channel.
    fn on_message(&self, payload: &[u8]) {
        let signal = match Signal::decode(payload) {
            Ok(s) => s,
            Err(e) => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "cluster: ignoring a bad signal");
                return;
            }
        };
        match signal {
            Signal::Answer { session, reply, .. } => {
                if let Some(tx) = lock(&self.waiting).remove(&session) {
                    let _ = tx.send(reply);
                }
            }
            Signal::Intro {
                session,
                from,
                camera,
                viewer,
                viewer_observed,
                viewer_local,
                viewer_rtt_us,
                relay,
                ..
            } => {
                self.stats.forwarded_in.fetch_add(1, Ordering::Relaxed);
                let f = Forwarded {
                    session,
                    from,
                    camera,
                    viewer,
                    viewer_observed,
                    viewer_local,
                    viewer_rtt_us,
                    relay,
                };
                if self.inbound.try_send(Inbound::Intro(f)).is_err() {
                    debug!("cluster: too many forwarded introductions; dropping one");
                }
            }
        }
    }

    /// Prometheus text for the cluster counters.
    pub fn render_metrics(&self) -> String {
        let s = &self.stats;
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "# HELP peercam_cluster_redis_up Whether the last Redis exchange worked.\n\
             # TYPE peercam_cluster_redis_up gauge\n\
             peercam_cluster_redis_up {}\n\
             # HELP peercam_cluster_redis_errors_total Redis commands or connections that failed or timed out.\n\
             # TYPE peercam_cluster_redis_errors_total counter\n\
             peercam_cluster_redis_errors_total {}\n\
             # HELP peercam_cluster_forwarded_total Introductions forwarded between nodes.\n\
             # TYPE peercam_cluster_forwarded_total counter\n\
             peercam_cluster_forwarded_total{{direction=\"out\"}} {}\n\
             peercam_cluster_forwarded_total{{direction=\"in\"}} {}\n\
             peercam_cluster_forwarded_total{{direction=\"no_node\"}} {}\n\
             # HELP peercam_cluster_bad_values_total Values read from Redis that were rejected.\n\
             # TYPE peercam_cluster_bad_values_total counter\n\
             peercam_cluster_bad_values_total {}\n\
             # HELP peercam_cluster_local_cameras Cameras this node keeps present in Redis.\n\
             # TYPE peercam_cluster_local_cameras gauge\n\
             peercam_cluster_local_cameras {}\n",
            u8::from(self.redis_up()),
            v(&s.redis_errors),
            v(&s.forwarded_out),
            v(&s.forwarded_in),
            v(&s.forward_no_node),
            v(&s.bad_values),
            lock(&self.local).len(),
        )
    }

    fn evict(&self, camera: &CameraId, conn: u64, code: u32) {
        let mut local = lock(&self.local);
        if local.get(camera).is_some_and(|l| l.conn == conn) {
            local.remove(camera);
        }
        drop(local);
        let _ = self.inbound.try_send(Inbound::Evict {
            camera: camera.clone(),
            conn,
            code,
        });
    }

    async fn refresh_one(&self, camera: CameraId) {
        let record = match lock(&self.local).get_mut(&camera) {
            Some(l) => {
                l.record.at_ms = now_ms();
                l.record.clone()
            }
            None => return,
        };
        let conn = record.conn;
        let answer = self.run_script("refresh", &self.scripts.refresh, &camera, &record);
        if let Some(code) = answer.await.and_then(scripts::refresh_verdict) {
            warn!(%camera, code, "cluster: the camera ID is held elsewhere now; closing this connection");
            self.evict(&camera, conn, code);
        }
    }

    async fn release_now(&self, camera: &CameraId, conn: u64, key_hex: Option<String>) {
        let tag = keys::owner_tag(&self.config.node, conn);
        let mut inv = self.scripts.release.key(keys::presence(camera));
        inv.key(keys::owner(camera))
            .arg(tag)
            .arg(key_hex.unwrap_or_default())
            .arg(ms(self.pin));
        let mut c = self.redis.clone();
        let _: Option<i64> = self.call("release", inv.invoke_async(&mut c)).await;
    }

    async fn refresh_all(&self) {
        self.refresh_node().await;
        self.refresh_presence().await;
    }

    async fn refresh_node(&self) {
        let mut c = self.redis.clone();
        let set = redis::AsyncCommands::pset_ex::<_, _, ()>(
            &mut c,
            keys::node(&self.config.node),
            now_ms(),
            ms(self.config.node_ttl),
        );
        let _ = self.call("node key", set).await;
    }

    async fn refresh_presence(&self) {
        let cameras: Vec<CameraId> = lock(&self.local).keys().cloned().collect();
        futures_util::stream::iter(cameras)
            .for_each_concurrent(REFRESH_CONCURRENCY, |camera| self.refresh_one(camera))
            .await;
    }

    /// On shutdown: release every local camera and the node key, within the timeout.
    async fn leave(&self) {
        let records: Vec<(CameraId, u64, String)> = lock(&self.local)
            .drain()
            .map(|(c, l)| (c, l.conn, l.record.key.to_string()))
            .collect();
        let all = async {
            for (camera, conn, key) in &records {
                self.release_now(camera, *conn, Some(key.clone())).await;
            }
            let mut c = self.redis.clone();
            let del = redis::AsyncCommands::del::<_, ()>(&mut c, keys::node(&self.config.node));
            let _ = self.call("node key", del).await;
        };
        let _ = tokio::time::timeout(self.config.redis_timeout * 2, all).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_url_is_refused_at_start_without_redis() {
        let node = NodeId::new("a").unwrap();
        let err = Cluster::new(
            ClusterConfig::new("http://h:1", node.clone()),
            Duration::ZERO,
            Duration::ZERO,
        )
        .err()
        .expect("refused");
        assert!(err.to_string().contains("cluster.redis"), "{err}");
        // A good URL needs no reachable server to start (nothing listens on port 1).
        assert!(Cluster::new(
            ClusterConfig::new("redis://127.0.0.1:1", node),
            Duration::ZERO,
            Duration::ZERO,
        )
        .is_ok());
    }

    #[test]
    fn passwords_never_reach_the_logs() {
        let shown = redact_url("redis://:s3cret@10.0.0.5:6379/0");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("10.0.0.5:6379"), "{shown}");
        assert_eq!(redact_url("not a url"), "(unparsable URL)");
    }

    #[test]
    fn refreshes_run_three_times_per_ttl() {
        let mut c = ClusterConfig::new("redis://h", NodeId::new("a").unwrap());
        assert_eq!(c.presence_every(), Duration::from_secs(10));
        assert_eq!(c.node_every(), Duration::from_secs(5));
        c.presence_ttl = Duration::from_millis(150);
        assert_eq!(c.presence_every(), Duration::from_millis(100), "floor");
    }
}
