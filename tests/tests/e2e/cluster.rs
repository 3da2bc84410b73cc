//! Cluster mode: rendezvous nodes sharing presence and introductions through a real Redis.
//! Every test starts its own `redis-server` (skipped with a message when it is not
//! installed, a failure under CI).

use std::time::{Duration, Instant};

use peercam_certs::Role;
use peercam_tests::cluster::{start_node, CrashableNode, RedisServer};
use peercam_tests::*;
use peercam_viewer::ViewError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn metrics(rdv: &peercam_rendezvous::Handle) -> String {
    admin_get(rdv, "/metrics").await
}

async fn admin_get(rdv: &peercam_rendezvous::Handle, path: &str) -> String {
    let addr = rdv.admin_addr().expect("admin listener");
    let mut s = within(5, "admin connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    within(5, "metrics", s.read_to_string(&mut out))
        .await
        .expect("read");
    out
}

async fn frames_via(pki: &Pki, rdv: std::net::SocketAddr, viewer: &str, camera: &str) -> u64 {
    let mut config = viewer_config(pki, viewer, rdv, camera);
    config.max_frames = Some(5);
    watch(config)
        .await
        .unwrap_or_else(|e| panic!("{viewer} watches {camera} via {rdv}: {e}"))
        .frames
}

#[tokio::test]
async fn camera_on_node_a_is_watched_through_node_b() {
    init_tracing();
    let Some(redis) = RedisServer::start_or_skip("camera_on_node_a_is_watched_through_node_b")
    else {
        return;
    };
    let pki = Pki::new();
    let a = start_node(&pki, &redis, "node-a").await;
    let b = start_node(&pki, &redis, "node-b").await;
    let cam = start_camera(&pki, "cam-1", a.local_addr(), &["alice"]).await;
    assert_eq!(b.cameras_online(), 0, "the camera is connected to A only");

    assert_eq!(frames_via(&pki, b.local_addr(), "alice", "cam-1").await, 5);

    let (ma, mb) = (metrics(&a).await, metrics(&b).await);
    assert!(
        mb.contains("peercam_cluster_forwarded_total{direction=\"out\"} 1\n"),
        "{mb}"
    );
    assert!(
        mb.contains("peercam_connects_total{outcome=\"ok\"} 1\n"),
        "{mb}"
    );
    assert!(
        ma.contains("peercam_cluster_forwarded_total{direction=\"in\"} 1\n"),
        "{ma}"
    );
    assert!(ma.contains("peercam_cluster_redis_up 1\n"), "{ma}");
    // A while later (several refresh and subscription-ping periods), still no Redis error.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for m in [metrics(&a).await, metrics(&b).await] {
        assert!(m.contains("peercam_cluster_redis_errors_total 0\n"), "{m}");
    }
    cam.shutdown();
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn unknown_and_forbidden_cameras_answer_alike_across_nodes() {
    init_tracing();
    let Some(redis) =
        RedisServer::start_or_skip("unknown_and_forbidden_cameras_answer_alike_across_nodes")
    else {
        return;
    };
    let pki = Pki::new();
    let a = start_node(&pki, &redis, "node-a").await;
    let b = start_node(&pki, &redis, "node-b").await;
    let cam = start_camera(&pki, "cam-1", a.local_addr(), &["alice"]).await;
    let forbidden = watch(viewer_config(&pki, "mallory", b.local_addr(), "cam-1")).await;
    let unknown = watch(viewer_config(&pki, "mallory", b.local_addr(), "cam-9")).await;
    assert!(
        matches!(forbidden, Err(ViewError::NotAllowed { .. })),
        "{forbidden:?}"
    );
    assert!(
        matches!(unknown, Err(ViewError::NotAllowed { .. })),
        "{unknown:?}"
    );
    let mb = metrics(&b).await;
    assert!(
        mb.contains("peercam_cluster_forwarded_total{direction=\"out\"} 0\n"),
        "a forbidden viewer is refused on its own node, the camera never hears of it: {mb}"
    );
    // Once the camera left: "offline" to alice, still "unknown or not allowed" to mallory.
    cam.shutdown();
    within(5, "cam-1 leaves the cluster", async {
        while redis.exists("peercam:cam:{cam-1}") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let offline = watch(viewer_config(&pki, "alice", b.local_addr(), "cam-1")).await;
    assert!(
        matches!(offline, Err(ViewError::Offline { .. })),
        "{offline:?}"
    );
    let forbidden = watch(viewer_config(&pki, "mallory", b.local_addr(), "cam-1")).await;
    assert!(
        matches!(forbidden, Err(ViewError::NotAllowed { .. })),
        "{forbidden:?}"
    );
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn second_key_for_an_id_held_on_another_node_is_refused() {
    init_tracing();
    let Some(redis) =
        RedisServer::start_or_skip("second_key_for_an_id_held_on_another_node_is_refused")
    else {
        return;
    };
    let pki = Pki::new();
    let a = start_node(&pki, &redis, "node-a").await;
    let b = start_node(&pki, &redis, "node-b").await;
    let genuine = start_camera(&pki, "cam-1", a.local_addr(), &["alice"]).await;
    // Same CA, same ID, another key (a cloned provisioning), on the other node.
    let config = camera_config(
        &pki,
        pki.creds(Role::Camera, "cam-1"),
        b.local_addr(),
        &["eve"],
    );
    let clone = peercam_camera_agent::start(config)
        .await
        .expect("agent starts");
    let mut status = clone.watch_status();
    let s = within(
        10,
        "the clone is refused",
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .expect("status")
    .clone();
    assert_eq!(s.registrations, 0, "the clone must never register");
    let err = s.last_error.unwrap_or_default();
    assert!(err.contains("another key"), "{err}");
    assert_eq!(b.cameras_online(), 0);
    // The holder was not displaced: alice still reaches it through either node.
    assert_eq!(frames_via(&pki, b.local_addr(), "alice", "cam-1").await, 5);
    assert_eq!(frames_via(&pki, a.local_addr(), "alice", "cam-1").await, 5);
    clone.shutdown();
    genuine.shutdown();
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn camera_fails_over_to_node_b_when_node_a_shuts_down() {
    init_tracing();
    let Some(redis) =
        RedisServer::start_or_skip("camera_fails_over_to_node_b_when_node_a_shuts_down")
    else {
        return;
    };
    let pki = Pki::new();
    let a = start_node(&pki, &redis, "node-a").await;
    let b = start_node(&pki, &redis, "node-b").await;
    let mut config = camera_config(
        &pki,
        pki.creds(Role::Camera, "cam-1"),
        a.local_addr(),
        &["alice"],
    );
    config.rendezvous.push(rdv_addr(b.local_addr()));
    let cam = peercam_camera_agent::start(config)
        .await
        .expect("camera starts");
    wait_registrations(&cam, 1).await;
    assert_eq!(a.cameras_online(), 1);
    assert_eq!(frames_via(&pki, b.local_addr(), "alice", "cam-1").await, 5);

    a.shutdown();
    a.join().await;
    wait_registrations(&cam, 2).await;
    assert_eq!(b.cameras_online(), 1, "the camera moved to B");
    assert_eq!(frames_via(&pki, b.local_addr(), "alice", "cam-1").await, 5);
    cam.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn presence_of_a_crashed_node_expires() {
    init_tracing();
    let Some(redis) = RedisServer::start_or_skip("presence_of_a_crashed_node_expires") else {
        return;
    };
    let pki = Pki::new();
    let mut a = CrashableNode::start(&pki, &redis, "node-a");
    let b = start_node(&pki, &redis, "node-b").await;
    let cam = start_camera(&pki, "cam-1", a.local_addr(), &["alice"]).await;
    let (presence, node_key) = ("peercam:cam:{cam-1}", "peercam:node:node-a");
    within(5, "node A's liveness key", async {
        while !redis.exists(node_key) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(redis.exists(presence), "cam-1 is present while A runs");

    a.crash();
    let crashed = Instant::now();
    // Before the TTL runs out, B already knows nobody listens for cam-1: "offline" at
    // once, not a wait for the introduction timeout.
    let early = watch(viewer_config(&pki, "alice", b.local_addr(), "cam-1")).await;
    assert!(matches!(early, Err(ViewError::Offline { .. })), "{early:?}");
    assert!(
        crashed.elapsed() < Duration::from_secs(1),
        "answered promptly"
    );
    assert!(redis.exists(presence), "nobody deleted it: the TTL must");

    within(5, "presence and node keys expire (TTL 2 s)", async {
        while redis.exists(presence) || redis.exists(node_key) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        crashed.elapsed() >= Duration::from_millis(500),
        "expired by TTL, not deleted"
    );
    // The ID stays pinned to its key: the owner record outlives the presence; and viewers
    // the camera allowed still learn it is offline, others that it is unknown.
    assert!(redis.exists("peercam:owner:{cam-1}"));
    let later = watch(viewer_config(&pki, "alice", b.local_addr(), "cam-1")).await;
    assert!(matches!(later, Err(ViewError::Offline { .. })), "{later:?}");
    let other = watch(viewer_config(&pki, "mallory", b.local_addr(), "cam-1")).await;
    assert!(
        matches!(other, Err(ViewError::NotAllowed { .. })),
        "{other:?}"
    );
    cam.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn nodes_keep_serving_local_cameras_while_redis_is_down_and_rejoin_after() {
    init_tracing();
    let Some(mut redis) = RedisServer::start_or_skip(
        "nodes_keep_serving_local_cameras_while_redis_is_down_and_rejoin_after",
    ) else {
        return;
    };
    let pki = Pki::new();
    let a = start_node(&pki, &redis, "node-a").await;
    let b = start_node(&pki, &redis, "node-b").await;
    let cam = start_camera(&pki, "cam-1", a.local_addr(), &["alice"]).await;

    redis.kill();
    // The camera's own node still introduces it; a new camera still registers.
    assert_eq!(frames_via(&pki, a.local_addr(), "alice", "cam-1").await, 5);
    let cam2 = start_camera(&pki, "cam-2", a.local_addr(), &["alice"]).await;
    assert_eq!(frames_via(&pki, a.local_addr(), "alice", "cam-2").await, 5);
    let ma = metrics(&a).await;
    assert!(ma.contains("peercam_cluster_redis_up 0\n"), "{ma}");
    assert!(
        !ma.contains("peercam_cluster_redis_errors_total 0\n"),
        "{ma}"
    );
    let ready = admin_get(&a, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "still serving: {ready}");

    // Redis comes back empty: the refresh puts both cameras back and both nodes listen
    // again (the subscriber reconnects with backoff, at most 2 s apart); then B reaches
    // the camera registered during the outage.
    redis.resume();
    within(
        10,
        "presence and subscriptions restored after the outage",
        async {
            while !(redis.exists("peercam:cam:{cam-1}")
                && redis.exists("peercam:cam:{cam-2}")
                && redis.subscribers("peercam:chan:node-a") == 1
                && redis.subscribers("peercam:chan:node-b") == 1)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    assert_eq!(frames_via(&pki, b.local_addr(), "alice", "cam-2").await, 5);
    cam.shutdown();
    cam2.shutdown();
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn cross_node_session_can_use_the_relay_of_the_viewers_node() {
    init_tracing();
    let Some(redis) =
        RedisServer::start_or_skip("cross_node_session_can_use_the_relay_of_the_viewers_node")
    else {
        return;
    };
    let pki = Pki::new();
    let a = start_node(&pki, &redis, "node-a").await;
    let b = start_node(&pki, &redis, "node-b").await;
    let cam = start_camera(&pki, "cam-1", a.local_addr(), &["alice"]).await;
    let mut config = viewer_config(&pki, "alice", b.local_addr(), "cam-1");
    config.relay = peercam_viewer::RelayMode::Only;
    config.max_frames = Some(10);
    let summary = watch(config).await.expect("relayed through node B");
    assert_eq!(summary.path, "relay");
    assert_eq!(summary.frames, 10);
    let (ma, mb) = (metrics(&a).await, metrics(&b).await);
    assert!(mb.contains("peercam_relay_sessions_total 1\n"), "{mb}");
    assert!(ma.contains("peercam_relay_sessions_total 0\n"), "{ma}");
    cam.shutdown();
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn a_camera_whose_id_was_claimed_by_another_key_is_closed_at_the_next_refresh() {
    init_tracing();
    let Some(redis) = RedisServer::start_or_skip(
        "a_camera_whose_id_was_claimed_by_another_key_is_closed_at_the_next_refresh",
    ) else {
        return;
    };
    let pki = Pki::new();
    let a = start_node(&pki, &redis, "node-a").await;
    let cam = start_camera(&pki, "cam-1", a.local_addr(), &["alice"]).await;
    // What Redis holds after another key claimed the ID while node A could not reach it.
    assert_eq!(
        redis.cli(&["SET", "peercam:owner:{cam-1}", &"ab".repeat(32)]),
        "OK"
    );
    let mut status = cam.watch_status();
    let s = within(
        5,
        "the camera is closed and refused",
        status.wait_for(|s| {
            s.registered.is_none()
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("another key"))
        }),
    )
    .await
    .expect("status")
    .clone();
    assert_eq!(s.registrations, 1);
    assert_eq!(a.cameras_online(), 0);
    cam.shutdown();
    a.shutdown();
}
