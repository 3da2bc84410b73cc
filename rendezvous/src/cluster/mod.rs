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

pub mod record;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use peercam_common::backoff::Backoff;
use peercam_common::rdv::{close, RelayOffer};
use peercam_common::{CameraId, SessionId, ViewerId};
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use record::{keys, VERSION};
pub use record::{NodeId, Presence, Reply, Signal};

/// Forwarded introductions this node handles at once; more are answered `Timeout`.
pub const MAX_INBOUND: usize = 256;
/// Queued presence writes (releases, access list changes) before new ones are dropped
/// (the refresh and the TTL repair what a dropped write leaves).
const MAX_WRITES: usize = 1024;
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

    fn refresh_every(&self) -> Duration {
        (self.presence_ttl.min(self.node_ttl) / 3).max(Duration::from_millis(100))
    }
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Redis URL is not valid.
    #[error("bad Redis URL in the cluster settings: {0}")]
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
    up: AtomicBool,
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
    redis: ConnectionManager,
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

/// The tasks of cluster mode, to be run by the server until shutdown.
pub struct Driver {
    cluster: Arc<Cluster>,
    client: redis::Client,
    writes: mpsc::Receiver<Write>,
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

/// The URL without a password, for logs.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

/// Claims the ID (fails if another key holds it) and writes the presence record.
/// KEYS: presence, owner. ARGV: owner tag, record, presence TTL ms, key hex, owner TTL ms.
const CLAIM: &str = r"
local o = redis.call('GET', KEYS[2])
if o and o ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
return 1
";

/// Like CLAIM, but only while this connection still holds the record (or nobody does):
/// 1 refreshed, 0 another connection holds it, -1 another key holds the ID.
const REFRESH: &str = r"
local o = redis.call('GET', KEYS[2])
if o and o ~= ARGV[4] then return -1 end
local cur = redis.call('HGET', KEYS[1], 'owner')
if cur and cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
return 1
";

/// Deletes the record if this connection holds it; keeps the ID pinned for the pin time.
/// KEYS: presence, owner. ARGV: owner tag, key hex, pin ms.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return 1
";

impl Cluster {
    /// Prepares cluster mode (no connection yet: Redis may be down at start). `pin` is how
    /// long a camera ID stays held by its key after the camera left (the registry's pin).
    pub fn start(
        config: ClusterConfig,
        pin: Duration,
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
            url: redacted(&config.redis),
            config,
            pin,
            redis,
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
        self.stats.up.load(Ordering::Relaxed)
    }

    fn redis_ok(&self) {
        if !self.stats.up.swap(true, Ordering::Relaxed) {
            info!(redis = %self.url, node = %self.config.node, "cluster: Redis reachable");
        }
    }

    fn redis_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        if self.stats.up.swap(false, Ordering::Relaxed) {
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

    async fn run_script(
        &self,
        what: &str,
        script: &str,
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
        let script = redis::Script::new(script);
        let mut inv = script.key(keys::presence(camera));
        inv.key(keys::owner(camera))
            .arg(tag)
            .arg(bytes)
            .arg(ms(self.config.presence_ttl))
            .arg(record.key.to_string())
            .arg(ms(self.pin + self.config.presence_ttl));
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
        let outcome = match self.run_script("claim", CLAIM, camera, &record).await {
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

    /// The presence record of `camera` on another node, if any (errors: none).
    pub async fn lookup(&self, camera: &CameraId) -> Option<Presence> {
        let mut conn = self.redis.clone();
        let key = keys::presence(camera);
        let raw: Option<Vec<u8>> = self
            .call("lookup", redis::AsyncCommands::hget(&mut conn, key, "rec"))
            .await?;
        let record = match Presence::decode(&raw?) {
            Ok(r) => r,
            Err(e) => {
                self.stats.bad_values.fetch_add(1, Ordering::Relaxed);
                warn!(%camera, error = %e, "cluster: ignoring a bad presence record");
                return None;
            }
        };
        (record.node != self.config.node).then_some(record)
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
        match self.run_script("refresh", REFRESH, &camera, &record).await {
            Some(-1) => {
                warn!(%camera, "cluster: another key holds this camera ID; closing the camera");
                self.evict(&camera, conn, close::ID_TAKEN);
            }
            Some(0) => {
                info!(%camera, "cluster: the camera registered again elsewhere; closing this connection");
                self.evict(&camera, conn, close::REPLACED);
            }
            _ => {}
        }
    }

    async fn release_now(&self, camera: &CameraId, conn: u64, key_hex: Option<String>) {
        let tag = keys::owner_tag(&self.config.node, conn);
        let script = redis::Script::new(RELEASE);
        let mut inv = script.key(keys::presence(camera));
        inv.key(keys::owner(camera))
            .arg(tag)
            .arg(key_hex.unwrap_or_default())
            .arg(ms(self.pin));
        let mut c = self.redis.clone();
        let _: Option<i64> = self.call("release", inv.invoke_async(&mut c)).await;
    }

    async fn refresh_all(&self) {
        let mut c = self.redis.clone();
        let set = redis::AsyncCommands::pset_ex::<_, _, ()>(
            &mut c,
            keys::node(&self.config.node),
            now_ms(),
            ms(self.config.node_ttl),
        );
        let _ = self.call("node key", set).await;
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

impl Driver {
    /// Runs the subscriber and the refresher until `cancel`, then leaves the cluster.
    pub async fn run(mut self, cancel: CancellationToken) {
        let cluster = self.cluster.clone();
        let subscriber = subscribe_loop(cluster.clone(), self.client.clone(), cancel.clone());
        let refresher = async {
            let mut tick = tokio::time::interval(cluster.config.refresh_every());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => cluster.refresh_all().await,
                    Some(write) = self.writes.recv() => match write {
                        Write::Release { camera, conn, key } => {
                            cluster.release_now(&camera, conn, key).await
                        }
                        Write::Refresh { camera } => cluster.refresh_one(camera).await,
                    },
                }
            }
            cluster.leave().await;
        };
        tokio::join!(subscriber, refresher);
    }
}

async fn subscribe_loop(cluster: Arc<Cluster>, client: redis::Client, cancel: CancellationToken) {
    let channel = keys::channel(&cluster.config.node);
    let limit = cluster.config.redis_timeout;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let subscribed = tokio::time::timeout(limit, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(pubsub)) => {
                backoff.reset();
                cluster.redis_ok();
                info!(%channel, "cluster: listening for forwarded introductions");
                if listen(&cluster, pubsub, &cancel).await {
                    return;
                }
            }
            Ok(Err(e)) => cluster.redis_failed("subscribe", &e),
            Err(_) => cluster.redis_failed("subscribe", &"timed out"),
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Receives signals until the connection fails (false) or `cancel` (true). Pings the
/// subscription connection every refresh period so a silently dead one is noticed.
async fn listen(cluster: &Cluster, pubsub: redis::aio::PubSub, cancel: &CancellationToken) -> bool {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(cluster.config.refresh_every());
    ping.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return true,
            msg = stream.next() => match msg {
                Some(msg) => cluster.on_message(msg.get_payload_bytes()),
                None => {
                    cluster.redis_failed("subscription", &"connection closed");
                    return false;
                }
            },
            _ = ping.tick() => {
                let pong = tokio::time::timeout(cluster.config.redis_timeout, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    cluster.redis_failed("subscription", &"ping failed");
                    return false;
                }
            }
        }
    }
}
