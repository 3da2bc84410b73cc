//! The system heals itself: a rendezvous restart is followed by re-registration.

use peercam_tests::*;

#[tokio::test]
async fn camera_reregisters_after_rendezvous_restart_and_viewers_connect_again() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let addr = rdv.local_addr();
    let cam = start_camera(&pki, "cam-1", addr, &["alice"]).await;
    rdv.shutdown();
    rdv.join().await;
    // Same address, fresh process state: the camera must come back by itself.
    let rdv = start_rendezvous(&pki, addr).await;
    wait_registrations(&cam, 2).await;
    let mut config = viewer_config(&pki, "alice", addr, "cam-1");
    config.max_frames = Some(10);
    let summary = watch(config)
        .await
        .expect("viewer connects after the restart");
    assert_eq!(summary.frames, 10);
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn camera_fails_over_to_the_next_rendezvous_in_its_list() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    // The first rendezvous in the list does not answer (nothing listens there).
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    let mut config = camera_config(
        &pki,
        pki.creds(peercam_certs::Role::Camera, "cam-1"),
        dead_addr,
        &["alice"],
    );
    config.rendezvous.push(rdv_addr(rdv.local_addr()));
    let cam = peercam_camera_agent::start(config)
        .await
        .expect("camera starts");
    wait_registrations(&cam, 1).await;
    let mut viewer = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    viewer.max_frames = Some(5);
    assert_eq!(
        watch(viewer)
            .await
            .expect("reachable via the second rendezvous")
            .frames,
        5
    );
    drop(dead);
    cam.shutdown();
    rdv.shutdown();
}
