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
