//! Video gets through intact, starts at a keyframe, and ffprobe decodes it.

use peercam_common::h264::split_access_units;
use peercam_tests::*;
use peercam_viewer::Sink;

#[tokio::test]
async fn video_arrives_frame_by_frame_identical_and_decodes() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let out = pki.dir.path().join("received.h264");
    let mut config = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    config.sink = Sink::File(out.clone());
    config.max_frames = Some(120);
    let summary = watch(config).await.expect("watching works");

    assert_eq!(summary.frames, 120);
    // On loopback the camera's host address is also the address the rendezvous observes.
    assert_eq!(summary.path, "direct");
    assert_eq!(summary.gops_dropped, 0);
    assert!(summary.ttff_ms.is_some());

    // Every received frame equals the camera's frame at the same position of the clip.
    let sent = split_access_units(SAMPLE).expect("sample parses");
    let got = split_access_units(&std::fs::read(&out).expect("output")).expect("output parses");
    assert_eq!(got.len(), 120);
    assert!(
        got[0].is_idr && got[0].has_parameter_sets,
        "starts decodable"
    );
    let start = sent
        .iter()
        .position(|au| au.data == got[0].data)
        .expect("first received frame is one of the clip's frames");
    for (i, au) in got.iter().enumerate() {
        assert!(
            au.data == sent[(start + i) % sent.len()].data,
            "frame {i} differs from what the camera sent"
        );
    }
    assert_eq!(ffprobe_frames(&out).expect("ffprobe decodes"), 120);
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn two_viewers_watch_one_camera_at_once() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice", "bob"]).await;
    let mut a = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    let mut b = viewer_config(&pki, "bob", rdv.local_addr(), "cam-1");
    a.max_frames = Some(40);
    b.max_frames = Some(40);
    let (ra, rb) = tokio::join!(watch(a), watch(b));
    assert_eq!(ra.expect("alice watches").frames, 40);
    assert_eq!(rb.expect("bob watches").frames, 40);
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn dual_stack_peers_connect_over_ipv6() {
    init_tracing();
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        panic!("this machine has no IPv6 loopback; the IPv6 tests need it");
    }
    let pki = Pki::new();
    // A dual-stack rendezvous, reached over IPv6.
    let rdv = start_rendezvous(&pki, "[::]:0".parse().expect("addr")).await;
    let rdv6: std::net::SocketAddr = format!("[::1]:{}", rdv.local_addr().port())
        .parse()
        .expect("addr");
    let mut cam_config = camera_config(
        &pki,
        pki.creds(peercam_certs::Role::Camera, "cam-1"),
        rdv6,
        &["alice"],
    );
    cam_config.bind = "[::1]:0".parse().expect("addr");
    cam_config.rendezvous[0].server_name = "::1".into();
    let cam = peercam_camera_agent::start(cam_config)
        .await
        .expect("camera starts");
    wait_registrations(&cam, 1).await;
    assert!(cam.status().registered.expect("registered").is_ipv6());
    let mut config = viewer_config(&pki, "alice", rdv6, "cam-1");
    config.rendezvous.server_name = "::1".into();
    config.bind = "[::]:0".parse().expect("addr");
    config.max_frames = Some(10);
    let summary = watch(config).await.expect("watches over IPv6");
    assert_eq!(summary.frames, 10);
    assert_eq!(summary.path, "direct");
    assert!(summary.remote.starts_with("[::1]"), "{}", summary.remote);
    cam.shutdown();
    rdv.shutdown();
}
