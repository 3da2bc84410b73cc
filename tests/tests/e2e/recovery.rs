//! The system heals itself: a rendezvous restart is followed by re-registration.

use std::time::{Duration, Instant};

use peercam_common::going_away::Spread;
use peercam_common::rdv::{self, Capabilities, FromRendezvous, ToRendezvous};
use peercam_common::tls::{self, Expect};
use peercam_common::{frame, quic};
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

/// A rendezvous shutting down tells its cameras how long to spread their reconnects over
/// (`GoingAway`); each camera draws a delay within that window, waits it, then registers
/// with the next process, instead of coming back within its 0–100 ms backoff. Four
/// cameras, so that one that did not wait is caught whatever the draws (all four drawing
/// under the ~0.3 s a restart takes here has a chance of 1 in 10,000).
#[tokio::test]
async fn camera_told_going_away_reconnects_within_the_announced_window() {
    init_tracing();
    let pki = Pki::new();
    let window = Duration::from_secs(3);
    let config = |listen| peercam_rendezvous::Config {
        listen,
        credentials: pki.creds(peercam_certs::Role::Rendezvous, "rdv"),
        trust: pki.trust(),
        limits: peercam_rendezvous::Limits {
            drain: Duration::from_millis(300),
            // Four cameras at 500/s is an 8 ms window: the minimum decides.
            reconnect_spread: Spread {
                min: window,
                ..Spread::default()
            },
            ..Default::default()
        },
    };
    let rdv = peercam_rendezvous::start(config(any_port()))
        .await
        .expect("rendezvous starts");
    let addr = rdv.local_addr();
    let mut cams = Vec::new();
    for i in 0..4 {
        cams.push(start_camera(&pki, &format!("cam-{i}"), addr, &["alice"]).await);
    }
    let t0 = Instant::now();
    rdv.shutdown();
    rdv.join().await;
    let rdv = peercam_rendezvous::start(config(addr))
        .await
        .expect("rendezvous starts again");
    let back = |cam: &peercam_camera_agent::Handle| {
        let mut status = cam.watch_status();
        async move {
            let told = within(5, "GoingAway acted on", async {
                let s = status.wait_for(|s| s.going_away.is_some()).await;
                s.expect("status channel open").going_away
            })
            .await
            .expect("waited for it");
            within(
                15,
                "registered again",
                status.wait_for(|s| s.registrations >= 2),
            )
            .await
            .expect("status channel open");
            (told, t0.elapsed())
        }
    };
    let all = tokio::join!(
        back(&cams[0]),
        back(&cams[1]),
        back(&cams[2]),
        back(&cams[3])
    );
    for (told, back) in [all.0, all.1, all.2, all.3] {
        assert_eq!(told.window, window, "the window the rendezvous announced");
        assert!(told.delay <= window, "{told:?}");
        assert!(
            back >= told.delay,
            "registered again after {back:?}, before the drawn delay {:?}",
            told.delay
        );
        assert!(
            back <= window + Duration::from_secs(2),
            "registered again only after {back:?}"
        );
    }
    for cam in cams {
        cam.shutdown();
    }
    rdv.shutdown();
}

/// Registers a raw camera `id` announcing agent `version`; returns its connection and
/// the stream's receive half after `Registered`.
async fn raw_camera(
    pki: &Pki,
    id: &str,
    version: u32,
    rdv: std::net::SocketAddr,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let creds = pki.creds(peercam_certs::Role::Camera, id);
    let tls = tls::client_config(&creds, &pki.trust(), Expect::Rendezvous, rdv::ALPN).expect("tls");
    let cfg = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
    let ep = quic::bind_endpoint(any_port(), None)
        .expect("bind")
        .endpoint;
    let dial = ep.connect_with(cfg, rdv, "127.0.0.1").expect("dial");
    let conn = within(5, "handshake", dial).await.expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let register = ToRendezvous::Register {
        local_addrs: vec![],
        access: vec![],
        caps: Capabilities {
            codecs: vec!["h264".into()],
            version,
        },
    };
    frame::write(&mut send, &register).await.expect("register");
    let answer = within(5, "Registered", frame::read::<FromRendezvous, _>(&mut recv)).await;
    assert!(
        matches!(answer, Ok(Some(FromRendezvous::Registered { .. }))),
        "{answer:?}"
    );
    (conn, send, recv)
}

/// The window is sized to the fleet (cameras / rate), and only cameras that announce a
/// version that knows `GoingAway` are sent it; an older one gets the `SHUTDOWN` close
/// alone, as before, rather than a message it would fail to decode.
#[tokio::test]
async fn going_away_is_sized_to_the_fleet_and_sent_only_to_cameras_that_know_it() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous_with(
        &pki,
        peercam_rendezvous::Limits {
            drain: Duration::from_millis(300),
            // Three cameras at 2 registrations/s: 1.5 s.
            reconnect_spread: Spread {
                rate: 2.0,
                min: Duration::ZERO,
                ..Spread::default()
            },
            ..Default::default()
        },
    )
    .await;
    let addr = rdv.local_addr();
    let (_new_conn, _s1, mut new_recv) =
        raw_camera(&pki, "cam-new", rdv::AGENT_VERSION, addr).await;
    let (_also_new, _s2, _r2) = raw_camera(&pki, "cam-new-2", rdv::GOING_AWAY_SINCE, addr).await;
    let (old_conn, _s3, mut old_recv) = raw_camera(&pki, "cam-old", 1, addr).await;
    rdv.shutdown();
    let told = within(
        5,
        "GoingAway",
        frame::read::<FromRendezvous, _>(&mut new_recv),
    )
    .await;
    assert!(
        matches!(
            told,
            Ok(Some(FromRendezvous::GoingAway {
                reconnect_within_ms: 1500
            }))
        ),
        "{told:?}"
    );
    let old = within(5, "close", frame::read::<FromRendezvous, _>(&mut old_recv)).await;
    assert!(old.is_err(), "a version-1 camera got a message: {old:?}");
    let shutdown = quinn::VarInt::from_u32(rdv::close::SHUTDOWN);
    assert!(
        matches!(
            old_conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == shutdown
        ),
        "{:?}",
        old_conn.close_reason()
    );
    within(5, "rendezvous stops", rdv.join()).await;
}
