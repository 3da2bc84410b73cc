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

/// GStreamer's RTSP server (from Debian's packages) serving an x264 test pattern.
struct RtspServer(std::process::Child);

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_rtsp_server(port: u16, user: &str, password: &str) -> RtspServer {
    use std::io::BufRead;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("support/rtsp_server.py");
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg(script)
        .args([&port.to_string(), user, password])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs the GStreamer RTSP server (apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-ugly gstreamer1.0-plugins-good)");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(15))
        .unwrap_or_default();
    assert_eq!(line.trim(), "ready", "the RTSP server did not start");
    RtspServer(child)
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_source_with_credentials_streams_and_survives_a_server_restart() {
    init_tracing();
    let port = free_tcp_port();
    let server = start_rtsp_server(port, "admin", "s3cr@t");
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let mut config = camera_config(
        &pki,
        pki.creds(Role::Camera, "cam-1"),
        rdv.local_addr(),
        &["alice"],
    );
    config.source = SourceSpec::Rtsp(format!("rtsp://admin:s3cr%40t@127.0.0.1:{port}/test"));
    let cam = peercam_camera_agent::start(config)
        .await
        .expect("camera starts");
    wait_registrations(&cam, 1).await;
    let watch_30 = |file: &str| {
        let mut v = viewer_config(&pki, "alice", rdv.local_addr(), "cam-1");
        v.max_frames = Some(30);
        v.sink = Sink::File(pki.dir.path().join(file));
        v
    };
    let summary = watch(watch_30("rtsp-1.h264"))
        .await
        .expect("video from the RTSP server");
    assert_eq!(summary.frames, 30);
    assert_eq!(
        ffprobe_frames(&pki.dir.path().join("rtsp-1.h264")).expect("decodes"),
        30
    );
    // The camera's RTSP server restarts: the agent reconnects by itself.
    drop(server);
    let _server = start_rtsp_server(port, "admin", "s3cr@t");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let summary = watch(watch_30("rtsp-2.h264"))
        .await
        .expect("video after the RTSP server restarted");
    assert_eq!(summary.frames, 30);
    assert_eq!(
        ffprobe_frames(&pki.dir.path().join("rtsp-2.h264")).expect("decodes"),
        30
    );
    cam.shutdown();
    rdv.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_password_never_reaches_the_logs() {
    let port = free_tcp_port();
    let _server = start_rtsp_server(port, "admin", "hunter2-secret");
    let pki = Pki::new();
    let rdv = start_rendezvous(&pki, any_port()).await;
    let (cert, key) = pki.files(Role::Camera, "cam-1");
    let url = format!("rtsp://admin:hunter2-secret@127.0.0.1:{port}/test");
    let agent = std::process::Command::new(binary("camera-agent"))
        .args([
            "--rendezvous",
            &rdv.local_addr().to_string(),
            "--bind",
            "127.0.0.1:0",
            "--allow",
            "alice",
        ])
        .arg("--ca")
        .arg(pki.ca_path())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["--source", &url, "--status-socket"])
        .arg(pki.dir.path().join("s.sock"))
        .env("RUST_LOG", "trace")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let out = agent.wait_with_output().expect("output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("RTSP stream playing"),
        "the source did not play: {log}"
    );
    assert!(
        !log.contains("hunter2"),
        "the RTSP password appeared in the log"
    );
    rdv.shutdown();
}
