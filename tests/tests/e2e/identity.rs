//! Certificates decide who is who: impersonation, foreign CAs, expiry and wrong roles are
//! refused, and a refused party never displaces a genuine one.

use std::time::Duration;

use peercam_certs::{Ca, Role};
use peercam_common::tls::Credentials;
use peercam_tests::*;
use peercam_viewer::ViewError;
use time::OffsetDateTime;

/// Starts a camera agent and waits until it reports an error (it must not register).
async fn camera_error(pki: &Pki, creds: Credentials, rdv: std::net::SocketAddr) -> String {
    let cam = peercam_camera_agent::start(camera_config(pki, creds, rdv, &["alice"]))
        .await
        .expect("agent starts");
    let mut status = cam.watch_status();
    let s = within(
        10,
        "camera reports an error",
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .expect("status")
    .clone();
    assert_eq!(s.registrations, 0, "must never have registered");
    cam.shutdown();
    s.last_error.unwrap_or_default()
}

#[tokio::test]
async fn second_key_for_a_registered_id_is_rejected_and_genuine_stays_reachable() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let genuine = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    // Same CA, same ID, another key: what a cloned or stolen provisioning would look like.
    let err = camera_error(&pki, pki.creds(Role::Camera, "cam-1"), rdv.local_addr()).await;
    assert!(err.contains("another key"), "{err}");
    let mut config = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    config.max_frames = Some(5);
    let summary = watch(config)
        .await
        .expect("the genuine camera is still reachable");
    assert_eq!(summary.remote, genuine.local_addr().to_string());
    assert_eq!(rdv.cameras_online(), 1);
    genuine.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn camera_with_certificate_from_another_ca_cannot_register() {
    init_tracing();
    let pki = Pki::new();
    let other = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let err = camera_error(&pki, other.creds(Role::Camera, "cam-1"), rdv.local_addr()).await;
    assert!(err.contains("handshake"), "{err}");
    assert_eq!(rdv.cameras_online(), 0);
    rdv.shutdown();
}

#[tokio::test]
async fn camera_refuses_a_rogue_rendezvous() {
    init_tracing();
    let pki = Pki::new();
    // A rendezvous whose certificate comes from another CA...
    let rogue = Pki::new();
    let rogue_rdv = start_rendezvous(&rogue, any_port()).await;
    let err = camera_error(
        &pki,
        pki.creds(Role::Camera, "cam-1"),
        rogue_rdv.local_addr(),
    )
    .await;
    assert!(err.contains("handshake"), "{err}");
    assert_eq!(rogue_rdv.cameras_online(), 0);
    rogue_rdv.shutdown();
    // ...or a server of our own CA that is not a rendezvous (a camera certificate).
    let fake = peercam_rendezvous::start(peercam_rendezvous::Config {
        listen: any_port(),
        credentials: pki.creds(Role::Camera, "evil"),
        trust: pki.trust(),
        limits: Default::default(),
    })
    .await
    .expect("starts");
    let err = camera_error(&pki, pki.creds(Role::Camera, "cam-2"), fake.local_addr()).await;
    assert!(err.contains("expected a rendezvous"), "{err}");
    fake.shutdown();
}

fn issue_with_validity(
    pki: &Pki,
    role: Role,
    id: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Credentials {
    let mut spec = Pki::spec(role, id);
    spec.not_before = Some(from);
    spec.not_after = Some(to);
    creds_from(&pki.issue(&spec), role)
}

#[tokio::test]
async fn expired_not_yet_valid_and_foreign_viewers_are_refused() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let expired = issue_with_validity(&pki, Role::Viewer, "alice", now - 10 * day, now - day);
    let future = issue_with_validity(&pki, Role::Viewer, "alice", now + day, now + 10 * day);
    let foreign = Pki::new().creds(Role::Viewer, "alice");
    for (what, creds) in [
        ("expired", expired),
        ("not yet valid", future),
        ("foreign", foreign),
    ] {
        let err = watch(viewer_config_with(&pki, creds, rdv.local_addr(), "cam-1"))
            .await
            .expect_err(what);
        assert!(matches!(err, ViewError::Rendezvous { .. }), "{what}: {err}");
    }
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn certificates_of_the_wrong_role_are_refused() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    // A viewer certificate cannot register as a camera.
    let viewer_cert = pki.issue(&Pki::spec(Role::Viewer, "cam-1"));
    let mut creds = creds_from(&viewer_cert, Role::Viewer);
    creds.identity.role = Role::Camera; // lie locally; the certificate still says viewer
    let cam = peercam_camera_agent::start(camera_config(&pki, creds, rdv.local_addr(), &["alice"]))
        .await
        .expect("agent starts");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(cam.status().registrations, 0);
    assert_eq!(rdv.cameras_online(), 0);
    cam.shutdown();
    // A rendezvous certificate cannot be used by a viewer (no client role).
    let rdv_cert = pki.issue(&Pki::spec(Role::Rendezvous, "alice"));
    let mut creds = creds_from(&rdv_cert, Role::Rendezvous);
    creds.identity.role = Role::Viewer;
    let err = watch(viewer_config_with(&pki, creds, rdv.local_addr(), "cam-1"))
        .await
        .expect_err("refused");
    assert!(matches!(err, ViewError::Rendezvous { .. }), "{err}");
    // A camera certificate cannot watch another camera.
    let genuine = start_camera(&pki, "cam-1", rdv.local_addr(), &["cam-2"]).await;
    let cam_cert = pki.issue(&Pki::spec(Role::Camera, "cam-2"));
    let creds = creds_from(&cam_cert, Role::Camera);
    let err = watch(viewer_config_with(&pki, creds, rdv.local_addr(), "cam-1"))
        .await
        .expect_err("refused");
    assert!(!matches!(err, ViewError::Setup(_)), "{err}");
    genuine.shutdown();
    rdv.shutdown();
}

#[test]
fn ca_files_with_a_mismatched_key_are_refused() {
    let (ca, _) = Ca::generate("a", 1).expect("ca");
    let (_, other_key) = Ca::generate("b", 1).expect("ca");
    assert!(Ca::from_pem(ca.cert_pem(), &other_key).is_err());
}
