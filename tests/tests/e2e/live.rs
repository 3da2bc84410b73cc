//! Live video under impairment, with the real camera-agent binary and the user-space link
//! model: the model really adds delay; video stays live when the link carries a quarter of
//! the stream, while one ordered stream falls further and further behind; a viewer keeps
//! receiving through 5 % loss.

use std::path::PathBuf;

use peercam_common::h264::split_access_units;
use peercam_tests::live::{run_baseline, run_peercam, Baseline, Clip, Condition};
use peercam_tests::{binary, start_camera, start_rendezvous, viewer_config, within, Pki};

fn clip() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-clips");
    Clip::Hd4M
        .ensure(&dir)
        .expect("ffmpeg encodes the test clip")
}

fn condition(link: &str, secs: u64) -> Condition {
    Condition {
        name: "test".into(),
        link: link.into(),
        clip: Clip::Hd4M,
        secs,
        ttff_samples: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_model_adds_the_configured_round_trip() {
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, peercam_tests::any_port()).await;
    let _cam = start_camera(&pki, "cam-rtt", rdv.local_addr(), &["alice"]).await;
    let mut config = viewer_config(&pki, "alice", rdv.local_addr(), "cam-rtt");
    let plain = within(10, "probe", peercam_viewer::probe(&config))
        .await
        .expect("plain probe");
    config.impairment = Some("rtt=120ms".parse().unwrap());
    let slow = within(10, "probe", peercam_viewer::probe(&config))
        .await
        .expect("impaired probe");
    assert!(plain.rtt_ms < 60.0, "loopback RTT {} ms", plain.rtt_ms);
    assert!(
        (120.0..400.0).contains(&slow.rtt_ms),
        "RTT through the model {} ms, wanted about 120",
        slow.rtt_ms
    );
    assert!(
        slow.connect_ms > 3.0 * 120.0,
        "three round trips to connect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_stays_live_on_a_link_that_carries_half_of_it() {
    let clip = clip();
    let link = "rtt=50ms,rate=2000kbit,queue=200ms";
    // Long enough for queued video to fill the camera's 4 MiB send window if stale GOPs
    // were kept queued (they were, before the camera reset the streams viewers stop).
    let ours = within(
        90,
        "peercam",
        run_peercam(&condition(link, 24), &clip, &binary("camera-agent")),
    )
    .await;
    assert!(ours.error.is_none(), "{:?}", ours.error);
    let p99 = ours.latency_p99_ms.expect("frames arrived");
    let (first, last) = (ours.first10_p99_ms.unwrap(), ours.last10_p99_ms.unwrap());
    assert!(p99 < 1400.0, "peercam fell behind: latency p99 {p99} ms");
    assert!(
        last < first + 300.0,
        "delay grew: p99 {first} ms, then {last} ms"
    );
    assert!(ours.gops_skipped > 5, "stale GOPs were skipped");
    assert!(ours.delivered > 0.2, "delivered {}", ours.delivered);
    let theirs = within(
        60,
        "baseline",
        run_baseline(&condition(link, 10), &clip, Baseline::TcpLike),
    )
    .await;
    assert!(theirs.error.is_none(), "{:?}", theirs.error);
    let behind = theirs.latency_max_ms.expect("frames arrived");
    assert!(
        behind > 3000.0,
        "one ordered stream should fall behind: max {behind} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_keeps_receiving_through_five_percent_loss() {
    let clip = clip();
    let cond = condition("rtt=50ms,loss=5%", 8);
    let ours = within(
        40,
        "peercam",
        run_peercam(&cond, &clip, &binary("camera-agent")),
    )
    .await;
    assert!(ours.error.is_none(), "{:?}", ours.error);
    assert!(
        ours.delivered > 0.8,
        "delivered only {:.0} % of the frames",
        ours.delivered * 100.0
    );
    let p99 = ours.latency_p99_ms.expect("frames arrived");
    assert!(p99 < 1500.0, "p99 {p99} ms beyond the latency budget");
    assert!(ours.ttff_warm_ms.is_some() && ours.ttff_cold_ms.is_some());
}

/// Watches the bundled clip over a lossy link; returns the summary and received frames.
async fn watch_lossy(fec: bool) -> (peercam_viewer::Summary, Vec<Vec<u8>>) {
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, peercam_tests::any_port()).await;
    let mut config = peercam_tests::camera_config(
        &pki,
        pki.creds(peercam_certs::Role::Camera, "cam-1"),
        rdv.local_addr(),
        &["alice"],
    );
    config.fec = fec;
    let cam = peercam_camera_agent::start(config)
        .await
        .expect("camera starts");
    peercam_tests::wait_registrations(&cam, 1).await;
    let out = pki.dir.path().join("received.h264");
    let mut config = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    config.impairment = Some("rtt=40ms,loss=8%".parse().expect("spec"));
    config.sink = peercam_viewer::Sink::File(out.clone());
    config.max_frames = Some(250);
    let summary = within(60, "watching", peercam_tests::watch(config))
        .await
        .expect("watching works");
    let got = split_access_units(&std::fs::read(&out).expect("output"))
        .expect("output parses")
        .into_iter()
        .map(|au| au.data.to_vec())
        .collect();
    assert_eq!(
        peercam_tests::ffprobe_frames(&out).expect("ffprobe decodes"),
        summary.frames
    );
    cam.shutdown();
    rdv.shutdown();
    (summary, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_rebuilt_from_parity_are_the_frames_the_camera_sent() {
    let sent: Vec<Vec<u8>> = split_access_units(peercam_tests::SAMPLE)
        .expect("sample parses")
        .into_iter()
        .map(|au| au.data.to_vec())
        .collect();
    let (with, got) = watch_lossy(true).await;
    assert!(
        with.repaired > 0,
        "8 % loss and no frame rebuilt from parity: {with:?}"
    );
    for (i, frame) in got.iter().enumerate() {
        assert!(
            sent.contains(frame),
            "frame {i} is not one the camera sent (a bad rebuild)"
        );
    }
    // The same link without parity: nothing is rebuilt, so the count above is real.
    let (without, _) = watch_lossy(false).await;
    assert_eq!(without.repaired, 0);
}
