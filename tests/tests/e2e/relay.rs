//! The relay: when asked (or when no direct path works) video flows through it, and what
//! it forwards is ciphertext only.

use std::process::{Command, Stdio};
use std::time::Duration;

use peercam_common::h264::{nal_units, split_access_units};
use peercam_tests::*;
use peercam_viewer::{RelayMode, Sink};

/// Byte strings of the clip that must never appear on the wire: the SPS, the PPS and
/// slices of several frames.
fn secrets() -> Vec<Vec<u8>> {
    let aus = split_access_units(SAMPLE).expect("sample");
    let mut out: Vec<Vec<u8>> = nal_units(&aus[0].data)
        .filter(|n| n.len() >= 4)
        .take(2)
        .map(|n| n.to_vec())
        .collect();
    for au in aus.iter().step_by(7) {
        let data = &au.data;
        let mid = data.len() / 2;
        out.push(data[mid..(mid + 24).min(data.len())].to_vec());
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn relayed_video_arrives_and_the_relay_sees_only_ciphertext() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let pcap = dir.path().join("relay.pcap");
    let Ok(mut capture) = Command::new("tcpdump")
        .args(["-i", "lo", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("udp")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        panic!("tcpdump is required for this test: apt-get install tcpdump (scripts/test.sh does)");
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // let tcpdump attach

    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let out = dir.path().join("received.h264");
    let mut config = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    config.relay = RelayMode::Only;
    config.max_frames = Some(60);
    config.sink = Sink::File(out.clone());
    let summary = watch(config)
        .await
        .expect("watching through the relay works");
    assert_eq!(summary.path, "relay");
    assert_eq!(summary.frames, 60);
    assert_eq!(ffprobe_frames(&out).expect("decodes"), 60);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("kill")
        .args(["-INT", &capture.id().to_string()])
        .status();
    let _ = capture.wait();
    cam.shutdown();
    rdv.shutdown();

    let captured = std::fs::read(&pcap).expect("capture file");
    // The capture really holds the relayed stream (both legs), so finding nothing means
    // something: at least twice the video bytes crossed loopback.
    assert!(
        captured.len() as u64 > 2 * summary.bytes,
        "capture too small: {} bytes for {} video bytes",
        captured.len(),
        summary.bytes
    );
    let received = std::fs::read(&out).expect("output");
    for secret in secrets() {
        assert!(
            contains(&received, &secret) || contains(SAMPLE, &secret),
            "self-check"
        );
        assert!(
            !contains(&captured, &secret),
            "plaintext video bytes seen on the wire"
        );
    }
}

#[tokio::test]
async fn relay_caps_bytes_per_session() {
    init_tracing();
    let pki = Pki::new();
    let mut limits = peercam_rendezvous::Limits::default();
    limits
        .relay
        .as_mut()
        .expect("relay on by default")
        .max_bytes = 150_000;
    let rdv = start_rendezvous_with(&pki, limits).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let mut config = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    config.relay = RelayMode::Only;
    config.duration = Some(Duration::from_secs(15));
    let summary = watch(config).await.expect("connects through the relay");
    assert_eq!(summary.path, "relay");
    assert!(
        summary.bytes < 150_000,
        "relay forwarded past its cap: {}",
        summary.bytes
    );
    assert!(
        summary.ended.contains("lost") || summary.ended.contains("timed out"),
        "{}",
        summary.ended
    );
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test]
async fn repeated_probes_through_the_relay() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
    let mut config = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    config.relay = RelayMode::Only;
    for i in 0..3 {
        let p = within(10, "probe", peercam_viewer::probe(&config)).await;
        let p = p.unwrap_or_else(|e| panic!("probe {i}: {e}"));
        assert_eq!(p.path, "relay");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cam.shutdown();
    rdv.shutdown();
}
