//! Running the rendezvous: the admin listener's metrics and health endpoints.

use peercam_certs::Role;
use peercam_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = within(5, "admin connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    within(5, "admin answer", s.read_to_string(&mut out))
        .await
        .expect("read");
    out
}

#[tokio::test]
async fn admin_listener_reports_metrics_and_health() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous_with(
        &pki,
        peercam_rendezvous::Limits {
            admin_listen: Some(any_tcp()),
            ..Default::default()
        },
    )
    .await;
    let admin = rdv.admin_addr().expect("admin listener");
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let mut ok = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    ok.max_frames = Some(3);
    watch(ok).await.expect("alice watches");
    let _ = watch(viewer_config(&pki, "mallory", rdv.local_addr(), "cam-1")).await;
    let _ = watch(viewer_config_with(
        &pki,
        Pki::new().creds(Role::Viewer, "eve"),
        rdv.local_addr(),
        "cam-1",
    ))
    .await;

    let metrics = get(admin, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    for line in [
        "peercam_cameras_registered 1",
        "peercam_registrations_total{outcome=\"ok\"} 1",
        "peercam_connects_total{outcome=\"ok\"} 1",
        "peercam_connects_total{outcome=\"unavailable\"} 1",
        "peercam_handshake_failures_total 1",
    ] {
        assert!(
            metrics.contains(&format!("{line}\n")),
            "missing {line:?} in:\n{metrics}"
        );
    }
    assert!(get(admin, "/livez").await.starts_with("HTTP/1.1 200"));
    assert!(get(admin, "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get(admin, "/nope").await.starts_with("HTTP/1.1 404"));
    cam.shutdown();
    rdv.shutdown();
}
