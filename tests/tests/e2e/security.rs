//! Attacks of the classes that broke the camera P2P SDKs, tried against the real
//! rendezvous, camera-agent and viewer. See SECURITY.md for the threat model.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peercam_certs::{Identity, Role};
use peercam_common::media::{self, FromCamera, ToCamera};
use peercam_common::rdv::{self, FromRendezvous, Refusal, ToRendezvous};
use peercam_common::tls::{self, Credentials, DenyList, Expect, Trust};
use peercam_common::{frame, quic, CameraId, SessionId, ViewerId};
use peercam_tests::*;
use peercam_viewer::ViewError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn endpoint() -> quinn::Endpoint {
    quic::bind_endpoint(any_port(), None)
        .expect("bind")
        .endpoint
}

/// Opens a rendezvous connection as `creds` (whatever its role) and its control stream.
async fn rdv_client(
    pki: &Pki,
    creds: &Credentials,
    rdv: SocketAddr,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let tls = tls::client_config(creds, &pki.trust(), Expect::Rendezvous, rdv::ALPN).expect("tls");
    let cfg = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
    let conn = within(
        5,
        "rdv handshake",
        endpoint()
            .connect_with(cfg, rdv, "127.0.0.1")
            .expect("dial"),
    )
    .await
    .expect("handshake");
    let (send, recv) = conn.open_bi().await.expect("stream");
    (conn, send, recv)
}

/// Dials the camera's media port as `creds` and says hello with `session`; returns the
/// first answer (or the close reason).
async fn hello_camera(
    pki: &Pki,
    creds: &Credentials,
    cam: SocketAddr,
    session: SessionId,
) -> Result<FromCamera, quinn::ConnectionError> {
    let expect = Expect::Exactly(Identity::new(Role::Camera, "cam-1").expect("id"));
    let tls = tls::client_config(creds, &pki.trust(), expect, media::ALPN).expect("tls");
    let cfg = quic::quic_client(tls, quic::media_transport(None)).expect("quic");
    let conn = within(
        5,
        "media handshake",
        endpoint().connect_with(cfg, cam, "camera").expect("dial"),
    )
    .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    frame::write(&mut send, &ToCamera::Hello { session })
        .await
        .expect("hello");
    match within(5, "camera answer", frame::read::<FromCamera, _>(&mut recv)).await {
        Ok(Some(answer)) => Ok(answer),
        _ => Err(within(5, "close", conn.closed()).await),
    }
}

fn is_access_denied(r: &Result<FromCamera, quinn::ConnectionError>) -> bool {
    matches!(r, Err(quinn::ConnectionError::ApplicationClosed(c))
        if c.error_code == quinn::VarInt::from_u32(media::close::ACCESS_DENIED))
}

/// A rendezvous whose key the attacker holds: a valid rendezvous certificate, and it
/// sends whatever the attacker wants.
fn evil_rendezvous(pki: &Pki) -> quinn::Endpoint {
    let creds = pki.creds(Role::Rendezvous, "evil-rdv");
    let tls = tls::server_config(
        &creds,
        &pki.trust(),
        &[Role::Camera, Role::Viewer],
        rdv::ALPN,
    )
    .expect("tls");
    let server = quic::quic_server(tls, quic::rendezvous_transport()).expect("quic");
    quinn::Endpoint::server(server, any_port()).expect("bind")
}

/// A QUIC server presenting `creds` as a camera; counts connections that complete.
fn fake_camera(
    pki: &Pki,
    creds: &Credentials,
) -> (quinn::Endpoint, Arc<std::sync::atomic::AtomicUsize>) {
    let tls = tls::server_config(creds, &pki.trust(), &[Role::Viewer], media::ALPN).expect("tls");
    let server = quic::quic_server(tls, quic::media_transport(None)).expect("quic");
    let ep = quinn::Endpoint::server(server, any_port()).expect("bind");
    let established = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (ep2, count) = (ep.clone(), established.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep2.accept().await {
            if let Ok(conn) = incoming.await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Anything the viewer would send (hello, session) would arrive here.
                if conn.accept_bi().await.is_ok() {
                    count.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    (ep, established)
}

// ---------------------------------------------------------------------------------------
// compromised rendezvous
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn compromised_rendezvous_cannot_send_the_viewer_to_an_impostor() {
    init_tracing();
    let pki = Pki::new();
    let evil = evil_rendezvous(&pki);
    // Impostors: a genuine certificate of another camera, and "cam-1" from another CA.
    let other_ca = Pki::new();
    for impostor in [
        pki.creds(Role::Camera, "cam-evil"),
        other_ca.creds(Role::Camera, "cam-1"),
    ] {
        let (fake, established) = fake_camera(
            if impostor.identity.id == "cam-1" {
                &other_ca
            } else {
                &pki
            },
            &impostor,
        );
        let fake_addr = fake.local_addr().expect("addr");
        let evil2 = evil.clone();
        let liar = tokio::spawn(async move {
            let conn = evil2
                .accept()
                .await
                .expect("viewer")
                .await
                .expect("handshake");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let _ask: Option<ToRendezvous> = frame::read(&mut recv).await.expect("connect");
            let lie = FromRendezvous::PeerReady {
                session: SessionId::random(),
                camera_observed: fake_addr,
                camera_local: vec![],
                camera_rtt_us: 500,
                relay: None,
            };
            frame::write(&mut send, &lie).await.expect("lie");
            conn
        });
        let err = watch(viewer_config(
            &pki,
            "alice",
            evil.local_addr().expect("addr"),
            "cam-1",
        ))
        .await
        .expect_err("the viewer must refuse the impostor");
        assert!(
            matches!(
                err,
                ViewError::WrongPeer { .. } | ViewError::Unreachable { .. }
            ),
            "{err}"
        );
        let _ = liar.await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The handshake never completed on the impostor's side, so it got nothing:
        // no session, no hello, no request.
        assert_eq!(established.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn compromised_rendezvous_cannot_make_the_camera_serve_an_attacker_or_flood_an_address() {
    init_tracing();
    let pki = Pki::new();
    let evil = evil_rendezvous(&pki);
    let evil_addr = evil.local_addr().expect("addr");
    // The victim address the attacker wants packets sent to.
    let victim = UdpSocket::bind("127.0.0.1:0").expect("bind");
    victim
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let victim_addr = victim.local_addr().expect("addr");

    let cam = peercam_camera_agent::start(camera_config(
        &pki,
        pki.creds(Role::Camera, "cam-1"),
        evil_addr,
        &["alice"],
    ))
    .await
    .expect("camera starts");
    let conn = within(10, "camera registers", evil.accept())
        .await
        .expect("camera")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
    let _register: Option<ToRendezvous> = frame::read(&mut recv).await.expect("register");
    let registered = FromRendezvous::Registered {
        observed: cam.local_addr(),
    };
    frame::write(&mut send, &registered)
        .await
        .expect("registered");

    // 1. An introduction for alice, pointing at the victim.
    let session = SessionId::random();
    let intro = |session| FromRendezvous::Introduce {
        session,
        viewer: ViewerId::new("alice").expect("id"),
        viewer_observed: victim_addr,
        viewer_local: vec![],
        viewer_rtt_us: 500,
        relay: None,
    };
    frame::write(&mut send, &intro(session))
        .await
        .expect("intro");
    let answer: Option<ToRendezvous> = within(5, "answer", frame::read(&mut recv))
        .await
        .expect("answer");
    assert!(
        matches!(answer, Some(ToRendezvous::Accept { .. })),
        "{answer:?}"
    );

    // 2. The attacker (a valid viewer, not on the list) presents alice's session: refused.
    let mallory = pki.creds(Role::Viewer, "mallory");
    assert!(is_access_denied(
        &hello_camera(&pki, &mallory, cam.local_addr(), session).await
    ));
    // 3. alice herself may use it once; a replay of the same session is refused.
    let alice = pki.creds(Role::Viewer, "alice");
    let first = hello_camera(&pki, &alice, cam.local_addr(), session).await;
    assert!(matches!(first, Ok(FromCamera::StreamInfo(_))), "{first:?}");
    assert!(is_access_denied(
        &hello_camera(&pki, &alice, cam.local_addr(), session).await
    ));
    // A session the camera never accepted is refused too.
    assert!(is_access_denied(
        &hello_camera(&pki, &alice, cam.local_addr(), SessionId::random()).await
    ));

    // 4. A flood of introductions cannot make the camera a packet cannon: count what
    // reaches the victim.
    let (mut packets, mut bytes) = (0usize, 0usize);
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = victim.recv_from(&mut buf) {
        packets += 1;
        bytes += n;
    }
    assert!(
        packets <= peercam_camera_agent::punch::MAX_PACKETS,
        "one introduction sent {packets} packets"
    );
    let flood = 200;
    let mut declined = 0;
    for _ in 0..flood {
        frame::write(&mut send, &intro(SessionId::random()))
            .await
            .expect("intro");
        if let Ok(Some(ToRendezvous::Decline { .. })) =
            frame::read::<ToRendezvous, _>(&mut recv).await
        {
            declined += 1;
        }
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        if let Ok((n, _)) = victim.recv_from(&mut buf) {
            packets += 1;
            bytes += n;
            assert!(n <= 21, "punch packets stay tiny ({n} bytes)");
        }
    }
    let accepted = flood - declined;
    assert!(
        declined > flood / 2,
        "only {declined} of {flood} introductions declined"
    );
    let bound = (accepted + 1) * peercam_camera_agent::punch::MAX_PACKETS;
    assert!(
        packets <= bound,
        "{packets} packets ({bytes} bytes) for {accepted} accepted introductions"
    );
    assert!(bytes < 5_000, "{bytes} bytes reached the victim");
    cam.shutdown();
}

// ---------------------------------------------------------------------------------------
// enumeration, downgrade, amplification, exhaustion, revocation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn probing_many_ids_learns_nothing_and_is_rate_limited() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let mallory = pki.creds(Role::Viewer, "mallory");
    let (_conn, mut send, mut recv) = rdv_client(&pki, &mallory, rdv.local_addr()).await;
    let mut answers = Vec::new();
    for i in 0..60 {
        // The real camera hides among made-up IDs.
        let camera = if i == 7 {
            "cam-1".to_string()
        } else {
            format!("cam-{}", 1000 + i)
        };
        let ask = ToRendezvous::Connect {
            camera: CameraId::new(&camera).expect("id"),
            local_addrs: vec![],
        };
        frame::write(&mut send, &ask).await.expect("ask");
        let reply: Option<FromRendezvous> = within(5, "reply", frame::read(&mut recv))
            .await
            .expect("reply");
        answers.push(reply.expect("reply"));
    }
    let unavailable = FromRendezvous::Refused {
        reason: Refusal::Unavailable,
    };
    assert_eq!(
        answers[7], unavailable,
        "the existing camera answers like the others"
    );
    let limited = answers
        .iter()
        .filter(|a| {
            matches!(
                a,
                FromRendezvous::Refused {
                    reason: Refusal::RateLimited { .. }
                }
            )
        })
        .count();
    assert!(
        limited >= 30,
        "only {limited} of 60 probes were rate-limited"
    );
    assert!(answers.iter().all(|a| *a == unavailable
        || matches!(
            a,
            FromRendezvous::Refused {
                reason: Refusal::RateLimited { .. }
            }
        )));
    // Others are not affected by mallory's probing.
    let mut ok = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    ok.max_frames = Some(3);
    assert_eq!(watch(ok).await.expect("alice still watches").frames, 3);
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn downgrades_are_refused_no_plaintext_mode_exists() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let alice = pki.creds(Role::Viewer, "alice");
    // Wrong ALPN: the media protocol against the rendezvous, and the reverse.
    for (addr, alpn, expect) in [
        (rdv.local_addr(), media::ALPN, Expect::Rendezvous),
        (
            cam.local_addr(),
            rdv::ALPN,
            Expect::Exactly(Identity::new(Role::Camera, "cam-1").expect("id")),
        ),
    ] {
        let tls = tls::client_config(&alice, &pki.trust(), expect, alpn).expect("tls");
        let cfg = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
        let r = within(
            5,
            "handshake",
            endpoint()
                .connect_with(cfg, addr, "127.0.0.1")
                .expect("dial"),
        )
        .await;
        assert!(r.is_err(), "wrong ALPN accepted at {addr}");
    }
    // No client certificate: refused by both.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).expect("pem"))
        .expect("root");
    let roots = Arc::new(roots);
    for (addr, alpn) in [
        (rdv.local_addr(), rdv::ALPN),
        (cam.local_addr(), media::ALPN),
    ] {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        let cfg = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
        let dialled = within(
            5,
            "handshake",
            endpoint()
                .connect_with(cfg, addr, "localhost")
                .expect("dial"),
        )
        .await;
        // In TLS 1.3 the client may finish first; the server then aborts with an alert.
        if let Ok(conn) = dialled {
            let reason = within(5, "server aborts", conn.closed()).await;
            assert!(
                matches!(reason, quinn::ConnectionError::ConnectionClosed(_)),
                "a client without certificate was kept at {addr}: {reason}"
            );
        }
    }
    cam.shutdown();
    rdv.shutdown();
}

/// Replays one genuine client Initial to the rendezvous from an address that never
/// answers; returns (bytes sent, bytes the rendezvous sent back within 3 s).
fn spoofed_initial(pki: &Pki, rdv: SocketAddr, ep: &quinn::Endpoint) -> (usize, usize) {
    // Capture a genuine QUIC Initial by letting a client dial a plain UDP socket.
    let spoofed = UdpSocket::bind("127.0.0.1:0").expect("bind");
    spoofed
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let creds = pki.creds(Role::Viewer, "alice");
    let tls = tls::client_config(&creds, &pki.trust(), Expect::Rendezvous, rdv::ALPN).expect("tls");
    let cfg = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
    let _connecting = ep
        .connect_with(cfg, spoofed.local_addr().expect("addr"), "127.0.0.1")
        .expect("dial");
    let mut initial = [0u8; 2048];
    let (n, _) = spoofed.recv_from(&mut initial).expect("an Initial");
    assert!(n >= 1200, "client Initials are padded to 1200 bytes");
    spoofed.send_to(&initial[..n], rdv).expect("send");
    let mut received = 0;
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok((m, from)) = spoofed.recv_from(&mut buf) {
            if from == rdv {
                received += m;
            }
        }
    }
    (n, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_bounds_what_it_sends_to_an_unvalidated_address() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let ep = endpoint();
    let (sent, back) = tokio::task::block_in_place(|| spoofed_initial(&pki, rdv.local_addr(), &ep));
    assert!(back > 0, "the rendezvous answered the Initial");
    // quinn finishes the datagram it started when budget is left (quinn issue #1082), so
    // its bound is three times what arrived plus at most one datagram.
    assert!(
        back <= 3 * sent + 1200,
        "amplification: sent {sent} bytes, got back {back}"
    );
    rdv.shutdown();
    // Under load (here: always), the rendezvous first asks for a Retry: the answer is
    // smaller than the request, there is nothing to amplify.
    let limits = peercam_rendezvous::Limits {
        retry_threshold: 0,
        ..Default::default()
    };
    let rdv = start_rendezvous_with(&pki, limits).await;
    let (sent, back) = tokio::task::block_in_place(|| spoofed_initial(&pki, rdv.local_addr(), &ep));
    assert!(
        back > 0 && back < sent,
        "with Retry: sent {sent} bytes, got back {back}"
    );
    // And a real client still gets through the Retry.
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let mut ok = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    ok.max_frames = Some(3);
    assert_eq!(watch(ok).await.expect("served after Retry").frames, 3);
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn malformed_oversized_and_idle_peers_are_cut_off_while_others_keep_working() {
    init_tracing();
    let pki = Pki::new();
    let limits = peercam_rendezvous::Limits {
        first_message_timeout: Duration::from_millis(800),
        frame_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let rdv = start_rendezvous_with(&pki, limits).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let mallory = pki.creds(Role::Viewer, "mallory");
    let closed_with = |e: quinn::ConnectionError, code: u32| matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(code));
    // An oversized frame: closed with a protocol error, at once.
    let (conn, mut send, _recv) = rdv_client(&pki, &mallory, rdv.local_addr()).await;
    send.write_all(&[0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    assert!(closed_with(
        within(5, "close", conn.closed()).await,
        rdv::close::PROTOCOL
    ));
    // Garbage CBOR.
    let (conn, mut send, _recv) = rdv_client(&pki, &mallory, rdv.local_addr()).await;
    send.write_all(&[0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef])
        .await
        .expect("write");
    assert!(closed_with(
        within(5, "close", conn.closed()).await,
        rdv::close::PROTOCOL
    ));
    // A slow frame: the prefix and a few bytes, then nothing: cut off.
    let (conn, mut send, _recv) = rdv_client(&pki, &mallory, rdv.local_addr()).await;
    send.write_all(&[0, 0, 0, 40, 0xa1]).await.expect("write");
    assert!(closed_with(
        within(5, "slow frame cut off", conn.closed()).await,
        rdv::close::PROTOCOL
    ));
    // A stream flood: a rendezvous connection allows two streams, no more.
    let (conn, mut send, mut recv) = rdv_client(&pki, &mallory, rdv.local_addr()).await;
    let ask = ToRendezvous::Connect {
        camera: CameraId::new("cam-9").expect("id"),
        local_addrs: vec![],
    };
    frame::write(&mut send, &ask).await.expect("ask");
    let _: Option<FromRendezvous> = within(5, "reply", frame::read(&mut recv))
        .await
        .expect("reply");
    let (mut second, _) = conn
        .open_bi()
        .await
        .expect("second stream is within the limit");
    second.write_all(&[0]).await.expect("write");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), conn.open_bi())
            .await
            .is_err(),
        "stream limit not enforced"
    );
    // A connection flood of peers that never say anything: all cut off after the
    // first-message timeout, and a real viewer is served in the middle of it.
    let mut flood = Vec::new();
    for _ in 0..100 {
        let tls =
            tls::client_config(&mallory, &pki.trust(), Expect::Rendezvous, rdv::ALPN).expect("tls");
        let cfg = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
        flood.push(
            endpoint()
                .connect_with(cfg, rdv.local_addr(), "127.0.0.1")
                .expect("dial"),
        );
    }
    let mut ok = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    ok.max_frames = Some(3);
    assert_eq!(watch(ok).await.expect("served during the flood").frames, 3);
    let mut cut = 0;
    for connecting in flood {
        if let Ok(conn) = connecting.await {
            if within(5, "idle peer cut off", conn.closed()).await
                != quinn::ConnectionError::TimedOut
            {
                cut += 1;
            }
        }
    }
    assert_eq!(
        cut, 100,
        "idle connections must be closed by the rendezvous"
    );
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn revoked_viewers_are_refused_by_rendezvous_and_camera() {
    init_tracing();
    let pki = Pki::new();
    let deny = DenyList::parse(&["viewer/mallory".to_string()], &[]).expect("deny list");
    let trust: Trust = pki.trust().with_deny_list(deny);
    let rdv = peercam_rendezvous::start(peercam_rendezvous::Config {
        listen: any_port(),
        credentials: pki.creds(Role::Rendezvous, "rdv"),
        trust: trust.clone(),
        limits: Default::default(),
    })
    .await
    .expect("starts");
    let mut config = camera_config(
        &pki,
        pki.creds(Role::Camera, "cam-1"),
        rdv.local_addr(),
        &["alice", "mallory"],
    );
    config.trust = trust;
    let cam = peercam_camera_agent::start(config).await.expect("starts");
    wait_registrations(&cam, 1).await;
    // mallory is on the camera's list, but revoked: the rendezvous refuses the handshake...
    let err = watch(viewer_config(&pki, "mallory", rdv.local_addr(), "cam-1"))
        .await
        .expect_err("revoked");
    assert!(matches!(err, ViewError::Rendezvous { .. }), "{err}");
    // ...and so does the camera when dialled directly.
    let r = hello_camera(
        &pki,
        &pki.creds(Role::Viewer, "mallory"),
        cam.local_addr(),
        SessionId::random(),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        !is_access_denied(&r),
        "refused in the handshake, before any application data"
    );
    cam.shutdown();
    rdv.shutdown();
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn rendezvous_memory_stays_bounded_under_a_connection_flood() {
    init_tracing();
    let pki = Pki::new();
    let (cert, key) = pki.files(Role::Rendezvous, "rdv");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(binary("rendezvous"))
        .args(["--listen", &listen, "--ca"])
        .arg(pki.ca_path())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("rendezvous starts");
    let addr: SocketAddr = listen.parse().expect("addr");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(child.id());
    // 300 authenticated connections, each sending a garbage frame or nothing at all.
    let mallory = pki.creds(Role::Viewer, "mallory");
    let tls =
        tls::client_config(&mallory, &pki.trust(), Expect::Rendezvous, rdv::ALPN).expect("tls");
    let cfg = quic::quic_client(tls, quic::rendezvous_transport()).expect("quic");
    let ep = endpoint();
    let mut conns = Vec::new();
    for i in 0..300 {
        let conn = within(
            10,
            "flood handshake",
            ep.connect_with(cfg.clone(), addr, "127.0.0.1")
                .expect("dial"),
        )
        .await
        .expect("handshake");
        if i % 2 == 0 {
            if let Ok((mut send, _)) = conn.open_bi().await {
                let _ = send.write_all(&[0, 0, 0xff, 0xff, 1, 2, 3]).await;
            }
        }
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("rendezvous RSS: {before} KiB idle, {during} KiB with 300 hostile connections");
    assert!(
        during < before + 64 * 1024,
        "RSS grew from {before} to {during} KiB"
    );
    assert!(during < 128 * 1024, "RSS {during} KiB");
}
