//! Video sources beyond files: a command's stdout (`exec:`), restarted when it exits.

use peercam_camera_agent::SourceSpec;
use peercam_certs::Role;
use peercam_tests::*;
use peercam_viewer::Sink;

#[tokio::test]
async fn exec_source_streams_ffmpeg_and_restarts_it_when_it_exits() {
    init_tracing();
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    // Each run of the command makes 20 frames and exits: 50 frames need the agent to
    // restart it twice, and a viewer to go on across the restarts.
    let command = "ffmpeg -v error -re -f lavfi -i testsrc2=size=320x240:rate=25 -frames:v 20 \
                   -c:v libx264 -preset ultrafast -g 10 -bf 0 -f h264 -";
    let mut config = camera_config(
        &pki,
        pki.creds(Role::Camera, "cam-1"),
        rdv.local_addr(),
        &["alice"],
    );
    config.source = SourceSpec::Exec(command.into());
    let cam = peercam_camera_agent::start(config)
        .await
        .expect("camera starts");
    wait_registrations(&cam, 1).await;
    let out = pki.dir.path().join("exec.h264");
    let mut viewer = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
    viewer.max_frames = Some(50);
    viewer.sink = Sink::File(out.clone());
    let summary = watch(viewer).await.expect("watching the command's video");
    assert_eq!(summary.frames, 50);
    assert_eq!(ffprobe_frames(&out).expect("decodes"), 50);
    cam.shutdown();
    rdv.shutdown();
}
