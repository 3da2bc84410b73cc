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
    let watched = watch(ok).await.expect("alice watches");
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
    // The viewer reports its path once connected; the report may trail the video.
    let counted = format!("peercam_paths_total{{path=\"{}\"}} 1\n", watched.path);
    let metrics = within(5, "path report counted", async {
        loop {
            let m = get(admin, "/metrics").await;
            if m.contains(&counted) {
                return m;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(path_total(&metrics), 1, "{metrics}");
    assert!(get(admin, "/livez").await.starts_with("HTTP/1.1 200"));
    assert!(get(admin, "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get(admin, "/nope").await.starts_with("HTTP/1.1 404"));
    cam.shutdown();
    rdv.shutdown();
}

fn path_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("peercam_paths_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A raw viewer connection to the rendezvous speaking the protocol directly.
async fn rdv_session(
    pki: &Pki,
    viewer: &str,
    rdv: std::net::SocketAddr,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    use peercam_common::tls::{client_config, Expect};
    use peercam_common::{quic, rdv as proto};
    let tls = client_config(
        &pki.creds(Role::Viewer, viewer),
        &pki.trust(),
        Expect::Rendezvous,
        proto::ALPN,
    )
    .expect("tls");
    let config = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
    let ep = quinn::Endpoint::client(any_port()).expect("endpoint");
    let conn = within(5, "viewer handshake", async {
        ep.connect_with(config, rdv, "127.0.0.1")
            .expect("dial")
            .await
            .expect("handshake")
    })
    .await;
    let (send, recv) = conn.open_bi().await.expect("stream");
    (conn, send, recv)
}

#[tokio::test]
async fn path_reports_count_once_and_only_for_sessions_brokered_for_that_viewer() {
    use peercam_common::frame;
    use peercam_common::rdv::{FromRendezvous, PathKind, ToRendezvous};
    use peercam_common::{CameraId, SessionId};
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
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice", "bob"]).await;

    let (_alice, mut send, mut recv) = rdv_session(&pki, "alice", rdv.local_addr()).await;
    let ask = ToRendezvous::Connect {
        camera: CameraId::new("cam-1").unwrap(),
        local_addrs: vec![],
    };
    frame::write(&mut send, &ask).await.unwrap();
    let reply = within(5, "introduction", frame::read(&mut recv)).await;
    let Ok(Some(FromRendezvous::PeerReady { session, .. })) = reply else {
        panic!("expected PeerReady, got {reply:?}");
    };
    // Bob reports alice's session, and a session nobody brokered: neither counts.
    let (_bob, mut bob_send, _bob_recv) = rdv_session(&pki, "bob", rdv.local_addr()).await;
    for s in [session, SessionId([42; 16])] {
        let forged = ToRendezvous::Report {
            session: s,
            path: PathKind::Relay,
        };
        frame::write(&mut bob_send, &forged).await.unwrap();
    }
    // Alice reports her session twice: it counts once.
    for _ in 0..2 {
        let report = ToRendezvous::Report {
            session,
            path: PathKind::Lan,
        };
        frame::write(&mut send, &report).await.unwrap();
    }
    // A Connect after the reports proves they were all read before we look.
    for stream in [&mut send, &mut bob_send] {
        frame::write(stream, &ask).await.unwrap();
    }
    let after = within(
        5,
        "second introduction",
        frame::read::<FromRendezvous, _>(&mut recv),
    )
    .await;
    assert!(
        matches!(after, Ok(Some(FromRendezvous::PeerReady { .. }))),
        "{after:?}"
    );
    let metrics = within(5, "bob's connect answered", async {
        loop {
            let m = get(admin, "/metrics").await;
            if m.contains("peercam_connects_total{outcome=\"ok\"} 3\n") {
                return m;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        metrics.contains("peercam_paths_total{path=\"lan\"} 1\n"),
        "{metrics}"
    );
    assert_eq!(path_total(&metrics), 1, "{metrics}");
    cam.shutdown();
    rdv.shutdown();
}
