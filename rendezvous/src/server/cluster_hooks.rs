//! The server's side of cluster mode: claiming an ID at registration, introducing a
//! viewer to a camera on another node, and serving what other nodes ask of this one
//! (forwarded introductions, evictions). The Redis side lives in [`crate::cluster`]; the
//! rules for local cameras stay in the parent module, reused here.

use std::net::SocketAddr;
use std::sync::Arc;

use peercam_common::net::canonical;
use peercam_common::rdv::{FromRendezvous, Refusal, RelayOffer};
use peercam_common::{CameraId, SessionId, ViewerId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, Instrument};

use super::{allocate_relay, ask_camera, close_conn, lock, Answer, Shared};
use crate::admin::Metrics;
use crate::cluster::{self, Cluster, Inbound};
use crate::registry::{Online, RegisterError};

/// Cluster mode: claims the camera ID in Redis before the local registry decides, so that
/// another key never displaces the holder on any node.
pub(super) async fn cluster_claim(
    cluster: &Cluster,
    camera: &CameraId,
    key: peercam_certs::Fingerprint,
    online: &Online,
    access: &[ViewerId],
) -> Result<(), RegisterError> {
    let record = cluster.presence(online.conn, key, online.observed, &online.local, access);
    match cluster.claim(camera, record).await {
        cluster::Claim::Taken => Err(RegisterError::IdTaken),
        cluster::Claim::Claimed | cluster::Claim::Deferred => Ok(()),
    }
}

/// Cluster mode: introduces the viewer to a camera registered on another node, through
/// that node. `None` when no other node has the camera (the local answer stands).
pub(super) async fn remote_introduce(
    shared: &Shared,
    cluster: &Cluster,
    viewer_conn: &quinn::Connection,
    viewer: &ViewerId,
    camera: &CameraId,
    viewer_local: &[SocketAddr],
) -> Option<FromRendezvous> {
    let m = &shared.metrics;
    let refused = |reason| FromRendezvous::Refused { reason };
    let (presence, online) = match cluster.lookup(camera).await? {
        cluster::Found::Online(p) => (p, true),
        cluster::Found::Seen(p) => (p, false),
    };
    // As on one node: unknown and forbidden alike, "offline" only to allowed viewers.
    if !presence.allows(viewer) {
        Metrics::inc(&m.connects_unavailable);
        return Some(refused(Refusal::Unavailable));
    }
    if !online {
        Metrics::inc(&m.connects_offline);
        let last_seen_secs = presence.age_secs(cluster::now_ms());
        return Some(refused(Refusal::Offline { last_seen_secs }));
    }
    let relay = allocate_relay(shared, viewer_conn, presence.observed.ip()).await;
    let session = SessionId::random();
    let intro = cluster::Forwarded {
        session,
        from: cluster.node().clone(),
        camera: camera.clone(),
        viewer: viewer.clone(),
        viewer_observed: canonical(viewer_conn.remote_address()),
        viewer_local: viewer_local.to_vec(),
        viewer_rtt_us: viewer_conn.rtt().as_micros() as u64,
        relay: relay.map(|a| RelayOffer {
            addr: a.camera_side,
            token: a.token,
        }),
    };
    let reply = cluster.forward(&presence.node, intro, shared.limits.intro_timeout);
    let (counter, answer) = match reply.await {
        cluster::Reply::Accepted {
            camera_observed,
            camera_local,
            camera_rtt_us,
        } => {
            info!(%camera, %session, node = %presence.node, "introduced through another node");
            let ready = FromRendezvous::PeerReady {
                session,
                camera_observed,
                camera_local,
                camera_rtt_us,
                relay: relay.map(|a| a.viewer_side),
            };
            (&m.connects_ok, ready)
        }
        cluster::Reply::Declined => (&m.connects_unavailable, refused(Refusal::Unavailable)),
        cluster::Reply::Gone => {
            let last_seen_secs = presence.age_secs(cluster::now_ms());
            (
                &m.connects_offline,
                refused(Refusal::Offline { last_seen_secs }),
            )
        }
        cluster::Reply::Timeout => (&m.connects_timeout, refused(Refusal::Timeout)),
    };
    Metrics::inc(counter);
    Some(answer)
}

/// Cluster mode: delivers an introduction forwarded by another node to a camera here.
async fn answer_forwarded(shared: &Shared, f: &cluster::Forwarded) -> cluster::Reply {
    let online = {
        let registry = shared.registry();
        match registry.online(&f.camera) {
            Some(o) if registry.allowed(&f.viewer, &f.camera) => o.clone(),
            Some(_) => return cluster::Reply::Declined,
            None => return cluster::Reply::Gone,
        }
    };
    let link = lock(&shared.cameras)
        .get(&online.conn)
        .map(|l| (l.tx.clone(), l.conn.clone()));
    let Some((tx, camera_conn)) = link else {
        return cluster::Reply::Gone;
    };
    let intro = FromRendezvous::Introduce {
        session: f.session,
        viewer: f.viewer.clone(),
        viewer_observed: f.viewer_observed,
        viewer_local: f.viewer_local.clone(),
        viewer_rtt_us: f.viewer_rtt_us,
        relay: f.relay,
    };
    match ask_camera(shared, online.conn, &tx, f.session, intro).await {
        Some(Answer::Accepted(camera_local)) => cluster::Reply::Accepted {
            camera_observed: canonical(camera_conn.remote_address()),
            camera_local,
            camera_rtt_us: camera_conn.rtt().as_micros() as u64,
        },
        Some(Answer::Declined) => cluster::Reply::Declined,
        None => cluster::Reply::Timeout,
    }
}

/// Cluster mode: serves what the cluster asks of this node (forwarded introductions,
/// evictions) until `cancel`.
pub(super) async fn cluster_inbound(
    shared: Arc<Shared>,
    mut inbound: mpsc::Receiver<Inbound>,
    cancel: CancellationToken,
) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let mut tasks = JoinSet::new();
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            msg = inbound.recv() => msg,
        };
        match msg {
            None => break,
            Some(Inbound::Intro(f)) if tasks.len() < cluster::MAX_INBOUND => {
                let span =
                    info_span!("forwarded", camera = %f.camera, viewer = %f.viewer, from = %f.from);
                let (shared, cluster) = (shared.clone(), cluster.clone());
                tasks.spawn(
                    async move {
                        let reply = answer_forwarded(&shared, &f).await;
                        cluster.answer(&f.from, f.session, reply).await;
                    }
                    .instrument(span),
                );
            }
            Some(Inbound::Intro(f)) => {
                cluster
                    .answer(&f.from, f.session, cluster::Reply::Timeout)
                    .await;
            }
            Some(Inbound::Evict { conn, code, .. }) => {
                if let Some(link) = lock(&shared.cameras).get(&conn) {
                    close_conn(
                        &link.conn,
                        code,
                        "camera ID claimed elsewhere in the cluster",
                    );
                }
            }
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}
