//! Who may watch: the access list is enforced by the rendezvous and by the camera, and
//! unknown and forbidden cameras answer alike.

use std::time::{Duration, Instant};

use peercam_certs::Role;
use peercam_common::media::{close, ToCamera, ALPN};
use peercam_common::tls::{self, Expect};
use peercam_common::{frame, quic, SessionId, ViewerId};
use peercam_tests::*;
use peercam_viewer::ViewError;

#[tokio::test]
async fn viewer_missing_from_access_list_is_refused_like_an_unknown_camera() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;

    let forbidden = watch(viewer_config(&pki, "mallory", rdv.local_addr(), "cam-1")).await;
    let unknown = watch(viewer_config(&pki, "mallory", rdv.local_addr(), "cam-404")).await;
    let (Err(f), Err(u)) = (forbidden, unknown) else {
        panic!("mallory must be refused")
    };
    assert!(matches!(f, ViewError::NotAllowed { .. }), "{f}");
    assert!(matches!(u, ViewError::NotAllowed { .. }), "{u}");
    // Same words, apart from the camera ID itself: nothing to tell them apart.
    assert_eq!(
        f.to_string().replace("cam-1", "X"),
        u.to_string().replace("cam-404", "X")
    );
    assert!(
        f.to_string().contains("access list"),
        "says what to do: {f}"
    );
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn access_list_changes_apply_without_restart() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let bob = || {
        let mut c = viewer_config(&pki, "bob", rdv.local_addr(), "cam-1");
        c.max_frames = Some(5);
        c
    };
    let err = watch(bob()).await.expect_err("bob is not allowed yet");
    assert!(matches!(err, ViewError::NotAllowed { .. }), "{err}");
    // The owner adds bob: the camera and the rendezvous both learn it, no restart.
    cam.set_access(vec![
        ViewerId::new("alice").expect("id"),
        ViewerId::new("bob").expect("id"),
    ]);
    let mut allowed = None;
    for _ in 0..20 {
        match watch(bob()).await {
            Ok(summary) => {
                allowed = Some(summary);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(allowed.expect("bob watches after being added").frames, 5);
    assert_eq!(cam.status().registrations, 1, "no re-registration needed");
    // And removed again.
    cam.set_access(vec![ViewerId::new("alice").expect("id")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = watch(bob()).await.expect_err("bob was removed");
    assert!(matches!(err, ViewError::NotAllowed { .. }), "{err}");
    cam.shutdown();
    rdv.shutdown();
}

/// Dials the camera directly, bypassing the rendezvous, as `viewer`; returns how the
/// camera closed the connection.
async fn dial_camera_directly(
    pki: &Pki,
    viewer: &str,
    cam: std::net::SocketAddr,
) -> quinn::ConnectionError {
    let creds = pki.creds(Role::Viewer, viewer);
    let expect = Expect::Exactly(peercam_certs::Identity::new(Role::Camera, "cam-1").expect("id"));
    let tls = tls::client_config(&creds, &pki.trust(), expect, ALPN).expect("tls");
    let cfg = quic::quic_client(tls, quic::media_transport(None)).expect("quic");
    let ep = quic::bind_endpoint(any_port(), None)
        .expect("bind")
        .endpoint;
    let conn = within(
        5,
        "dial",
        ep.connect_with(cfg, cam, "camera").expect("dial"),
    )
    .await
    .expect("handshake succeeds: the certificate itself is valid");
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    frame::write(
        &mut send,
        &ToCamera::Hello {
            session: SessionId::random(),
        },
    )
    .await
    .expect("hello");
    within(5, "camera closes", conn.closed()).await
}

#[tokio::test]
async fn camera_refuses_direct_dials_without_a_valid_introduction() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    for viewer in ["mallory", "alice"] {
        match dial_camera_directly(&pki, viewer, cam.local_addr()).await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code,
                    quinn::VarInt::from_u32(close::ACCESS_DENIED),
                    "{viewer}"
                );
            }
            other => panic!("{viewer}: expected access denied, got {other}"),
        }
    }
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn offline_camera_is_a_clear_error_within_seconds() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    cam.shutdown();
    cam.join().await;
    // The rendezvous learns at once (the camera closes its connection on shutdown).
    let deadline = Instant::now() + Duration::from_secs(5);
    while rdv.cameras_online() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let err = watch(viewer_config(&pki, "alice", rdv.local_addr(), "cam-1"))
        .await
        .expect_err("camera is offline");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, ViewError::Offline { .. }), "{err}");
    assert!(
        err.to_string().contains("cam-1 is offline (last seen"),
        "{err}"
    );
    // Someone not allowed learns nothing, not even that it was ever online.
    let err = watch(viewer_config(&pki, "mallory", rdv.local_addr(), "cam-1"))
        .await
        .expect_err("refused");
    assert!(matches!(err, ViewError::NotAllowed { .. }), "{err}");
    rdv.shutdown();
}
