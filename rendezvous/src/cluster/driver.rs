//! The tasks of cluster mode: the subscription to this node's channel (reconnected with
//! backoff, pinged so a dead one is noticed) and the refresher (liveness key, presence
//! records, queued writes), which releases everything on shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use peercam_common::backoff::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{keys, Cluster, Write};

/// Longest wait between two subscription attempts: introductions for this node's cameras
/// fail ("offline") while it is not subscribed, so it retries often.
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);
/// How often a node probes Redis while it is unreachable.
const RECONNECT_PROBE: Duration = Duration::from_millis(250);

/// The tasks of cluster mode, to be run by the server until shutdown.
pub struct Driver {
    pub(super) cluster: Arc<Cluster>,
    pub(super) client: redis::Client,
    pub(super) writes: mpsc::Receiver<Write>,
}

impl Driver {
    /// Runs the subscriber and the refresher until `cancel`, then leaves the cluster.
    pub async fn run(mut self, cancel: CancellationToken) {
        let cluster = self.cluster.clone();
        let subscriber = subscribe_loop(cluster.clone(), self.client.clone(), cancel.clone());
        let refresher = async {
            let mut node_tick = tokio::time::interval(cluster.config.node_every());
            node_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut presence_tick = tokio::time::interval(cluster.config.presence_every());
            presence_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut probe = tokio::time::interval(RECONNECT_PROBE);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = node_tick.tick() => cluster.refresh_node().await,
                    _ = presence_tick.tick() => cluster.refresh_presence().await,
                    // While Redis is away, probe it often, so that the connection is back
                    // (and deferred claims are made) before a viewer needs it.
                    _ = probe.tick(), if !cluster.redis_up() => {
                        if cluster.ping().await {
                            cluster.refresh_all().await;
                        }
                    }
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
    let mut backoff = Backoff::new(Duration::from_millis(100), RESUBSCRIBE_MAX);
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
/// subscription connection every node-key period so a silently dead one is noticed.
async fn listen(cluster: &Cluster, pubsub: redis::aio::PubSub, cancel: &CancellationToken) -> bool {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(cluster.config.node_every());
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
