//! The real binaries, run as a user would: certs, rendezvous, camera-agent, viewer.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use peercam_tests::*;

/// Kills the child when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(bin: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary(bin)).args(args).output().expect("runs")
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Spawns a binary and returns it with a channel of its stderr lines.
fn spawn(bin: &str, args: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    let mut child = Command::new(binary(bin))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Keep draining even when nobody listens any more: a closed pipe would make
            // the child's next log line fail (and end it).
            let _ = tx.send(line);
        }
    });
    (Proc(child), rx)
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.contains(needle) {
                return;
            }
        }
    }
    panic!("no log line containing {needle:?} within {secs} s");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn binaries_stream_end_to_end_from_their_command_lines() {
    let dep = Deployment::new(None);
    let d = dep.dir.path();
    let inspect = run("certs", &["inspect", s(&dep.path("camera-cam-1.pem"))]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("role:        camera") && text.contains("id:          cam-1"),
        "{text}"
    );
    let (mut cam, _cam_log) = dep.start_camera(&["--status-socket", s(&dep.path("c.sock"))]);

    let out_file = d.join("out.h264");
    let viewer_args = |camera: &str| dep.viewer_args(camera);
    let mut args = viewer_args("cam-1");
    args.extend(["--frames", "30", "--json", "-o", s(&out_file)].map(String::from));
    let out = Command::new(binary("viewer"))
        .args(&args)
        .output()
        .expect("viewer runs");
    assert!(
        out.status.success(),
        "viewer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "--json keeps stderr quiet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    for key in [
        "frames",
        "bytes",
        "path",
        "ttff_ms",
        "latency_p50_ms",
        "latency_p99_ms",
        "gops_dropped",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}: {summary}");
    }
    assert_eq!(summary["frames"], 30);
    assert_eq!(ffprobe_frames(&out_file).expect("ffprobe"), 30);

    // On a terminal (no --json) the viewer says what it is doing.
    let mut args = viewer_args("cam-1");
    let mp4 = d.join("progress.mp4");
    args.extend(["--frames", "10", "-o", s(&out_file), "--record", s(&mp4)].map(String::from));
    let out = Command::new(binary("viewer"))
        .args(&args)
        .output()
        .expect("viewer runs");
    let said = String::from_utf8_lossy(&out.stderr);
    for step in [
        "asking the rendezvous at",
        "camera cam-1 found; connecting to",
        "connected to camera cam-1: direct",
        "waiting for the first keyframe",
        "first frame after",
        "writing to",
        "recording to",
    ] {
        assert!(said.contains(step), "progress lacks {step:?}: {said}");
    }

    // Annex B on stdout, piped into a real decoder: `viewer ... -o - | ffmpeg -f h264 -i -`.
    let mut args = viewer_args("cam-1");
    args.extend(["--frames", "40", "--quiet", "-o", "-"].map(String::from));
    let mut viewer = Command::new(binary("viewer"))
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("viewer runs");
    let decoder = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "h264",
            "-i",
            "-",
            "-f",
            "null",
            "-progress",
            "pipe:1",
            "-",
        ])
        .stdin(viewer.stdout.take().expect("stdout"))
        .output()
        .expect("ffmpeg runs (install ffmpeg)");
    assert!(viewer.wait().expect("viewer exits").success());
    let progress = String::from_utf8_lossy(&decoder.stdout);
    let decoded: u64 = progress
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("frame="))
        .and_then(|n| n.trim().parse().ok())
        .expect("ffmpeg reports decoded frames");
    assert_eq!(decoded, 40, "ffmpeg decoded {decoded} frames from the pipe");

    // The same into mpv: `viewer ... -o - | mpv -`, which writes the frames it decodes.
    let shots = d.join("mpv");
    let mut args = viewer_args("cam-1");
    args.extend(["--frames", "60", "--quiet", "-o", "-"].map(String::from));
    let mut viewer = Command::new(binary("viewer"))
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("viewer runs");
    let mpv = Command::new("mpv")
        .args([
            "--no-config",
            "--really-quiet",
            "--ao=null",
            "--vo=image",
            "--vo-image-format=png",
        ])
        .arg(format!("--vo-image-outdir={}", s(&shots)))
        .args(["--frames=10", "-"])
        .stdin(viewer.stdout.take().expect("stdout"))
        .output()
        .expect("mpv runs (install mpv)");
    let _ = viewer.wait();
    assert!(
        mpv.status.success(),
        "mpv failed: {}",
        String::from_utf8_lossy(&mpv.stderr)
    );
    let pictures = std::fs::read_dir(&shots).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        pictures, 10,
        "mpv decoded {pictures} pictures from the pipe"
    );

    // Unknown camera: exit status 2 and a sentence saying what to do.
    let out = Command::new(binary("viewer"))
        .args(viewer_args("cam-404"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("access list"));

    // Camera stopped with SIGTERM: it closes its connections, the viewer says offline.
    let pid = cam.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let _ = cam.0.wait();
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(binary("viewer"))
        .args(viewer_args("cam-1"))
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("cam-1 is offline"), "{err}");
}

#[test]
fn bad_config_names_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("camera.toml");
    std::fs::write(
        &cfg,
        "rendezvous = [\"127.0.0.1:7400\"]\nsorce = \"clip.h264\"\n",
    )
    .expect("write");
    let out = run("camera-agent", &["--config", s(&cfg)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("camera.toml") && err.contains("line 2") && err.contains("sorce"),
        "{err}"
    );
    let out = run(
        "certs",
        &[
            "issue",
            "--ca",
            "/nonexistent/ca.pem",
            "--role",
            "camera",
            "--id",
            "c",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("CA certificate")
            && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
}

#[test]
fn setup_from_init_to_watching_and_access_reload_without_restart() {
    let dep = Deployment::new(None);
    let (ca, ca_key) = (dep.path("ca.pem"), dep.path("ca.key"));
    let cam_dir = dep.path("camera");
    // On the camera: key, CSR and config template.
    let out = run(
        "camera-agent",
        &[
            "init",
            "--id",
            "cam-7",
            "--dir",
            s(&cam_dir),
            "--rendezvous",
            &dep.rdv_addr,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("certs sign-csr"));
    // On the CA: sign the CSR (the key never moved).
    let (csr, cert) = (cam_dir.join("camera.csr"), cam_dir.join("camera.pem"));
    let out = run(
        "certs",
        &[
            "sign-csr",
            "--ca",
            s(&ca),
            "--ca-key",
            s(&ca_key),
            "--csr",
            s(&csr),
            "--out",
            s(&cert),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(&ca, cam_dir.join("ca.pem")).expect("copy ca");
    // Fill in the template: the source; no viewer allowed yet.
    let toml = cam_dir.join("camera.toml");
    let text = std::fs::read_to_string(&toml).expect("config");
    let sample = sample_path();
    let text = text.replace(
        "source = \"stdin\"",
        &format!("source = \"{}\"", s(&sample)),
    );
    std::fs::write(&toml, &text).expect("write config");

    let socket = dep.path("c.sock");
    let (cam, cam_log) = spawn(
        "camera-agent",
        &[
            "--config",
            s(&toml),
            "--bind",
            "127.0.0.1:0",
            "--status-socket",
            s(&socket),
        ],
    );
    wait_for_line(&cam_log, "registered", 10);
    let watch = || {
        Command::new(binary("viewer"))
            .args(dep.viewer_args("cam-7"))
            .args(["--frames", "10", "--json"])
            .output()
            .expect("viewer runs")
    };
    assert_eq!(watch().status.code(), Some(2), "alice is not allowed yet");
    // The owner allows alice and sends SIGHUP: no restart.
    std::fs::write(&toml, text.replace("access = []", "access = [\"alice\"]"))
        .expect("write config");
    assert!(Command::new("kill")
        .args(["-HUP", &cam.0.id().to_string()])
        .status()
        .expect("kill")
        .success());
    wait_for_line(&cam_log, "access list sent to the rendezvous", 10);
    let out = watch();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["frames"], 10);
}

/// A deployment made with the real `certs` binary (CA, rendezvous rdv-1, camera cam-1,
/// viewer alice) and a running `rendezvous`, for the CLI tests that need a camera.
struct Deployment {
    dir: tempfile::TempDir,
    rdv_addr: String,
    _rdv: Proc,
    // Kept so the rendezvous' stderr stays open (a closed pipe would end it).
    _rdv_log: mpsc::Receiver<String>,
}

impl Deployment {
    /// `camera_days`: lifetime of the camera's certificate (default: certs' default).
    fn new(camera_days: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        assert!(run("certs", &["ca", "--out", s(d)]).status.success());
        let (ca, ca_key) = (d.join("ca.pem"), d.join("ca.key"));
        let camera_extra: Vec<&str> = camera_days.map(|n| vec!["--days", n]).unwrap_or_default();
        for (role, id, extra) in [
            ("rendezvous", "rdv-1", vec!["--ip", "127.0.0.1"]),
            ("camera", "cam-1", camera_extra),
            ("viewer", "alice", vec![]),
        ] {
            let mut args = vec![
                "issue",
                "--ca",
                s(&ca),
                "--ca-key",
                s(&ca_key),
                "--role",
                role,
                "--id",
                id,
                "--out",
                s(d),
            ];
            args.extend(extra);
            assert!(run("certs", &args).status.success());
        }
        let rdv_addr = format!("127.0.0.1:{}", free_udp_port());
        let (rdv, log) = spawn(
            "rendezvous",
            &[
                "--listen",
                &rdv_addr,
                "--ca",
                s(&ca),
                "--cert",
                s(&d.join("rendezvous-rdv-1.pem")),
                "--key",
                s(&d.join("rendezvous-rdv-1.key")),
            ],
        );
        wait_for_line(&log, "rendezvous listening", 10);
        Deployment {
            dir,
            rdv_addr,
            _rdv: rdv,
            _rdv_log: log,
        }
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// Starts camera-agent for cam-1 (allowing alice, streaming the sample clip) with
    /// `extra` flags, and waits until it is registered.
    fn start_camera(&self, extra: &[&str]) -> (Proc, mpsc::Receiver<String>) {
        let (ca, cert, key, sample) = (
            self.path("ca.pem"),
            self.path("camera-cam-1.pem"),
            self.path("camera-cam-1.key"),
            sample_path(),
        );
        let mut args = vec![
            "--rendezvous",
            &self.rdv_addr,
            "--ca",
            s(&ca),
            "--cert",
            s(&cert),
            "--key",
            s(&key),
        ];
        args.extend([
            "--allow",
            "alice",
            "--source",
            s(&sample),
            "--bind",
            "127.0.0.1:0",
        ]);
        args.extend(extra);
        let (cam, log) = spawn("camera-agent", &args);
        wait_for_line(&log, "registered", 10);
        (cam, log)
    }

    /// The viewer's connection settings as alice, and the camera to watch.
    fn viewer_args(&self, camera: &str) -> Vec<String> {
        let mut args = vec!["--rendezvous".to_string(), self.rdv_addr.clone()];
        for (flag, file) in [
            ("--ca", "ca.pem"),
            ("--cert", "viewer-alice.pem"),
            ("--key", "viewer-alice.key"),
        ] {
            args.extend([flag.to_string(), s(&self.path(file)).to_string()]);
        }
        args.extend(["--bind", "127.0.0.1:0", camera].map(String::from));
        args
    }

    /// A viewer command for alice watching cam-1, quiet, with `extra` flags.
    fn viewer(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(binary("viewer"));
        c.args(self.viewer_args("cam-1"))
            .arg("--quiet")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }
}

#[test]
fn camera_status_shows_registration_viewers_and_warnings() {
    let dep = Deployment::new(Some("10"));
    let socket = dep.path("camera.sock");
    // No agent yet: a clear sentence.
    let out = run("camera-agent", &["status", "--socket", s(&socket)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is camera-agent running"));

    let (_cam, _log) = dep.start_camera(&["--status-socket", s(&socket)]);
    // The log line comes first; the status socket may lag it by a moment under load.
    let mut out = run("camera-agent", &["status", "--socket", s(&socket)]);
    for _ in 0..50 {
        if String::from_utf8_lossy(&out.stdout).contains("registered, seen at") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        out = run("camera-agent", &["status", "--socket", s(&socket)]);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("camera cam-1") && text.contains("registered, seen at 127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains("warning: the camera's certificate expires in "),
        "{text}"
    );
    assert!(text.contains("viewers:      0"), "{text}");

    let mut viewer = dep.viewer(&["--duration", "4"]).spawn().expect("viewer");
    std::thread::sleep(Duration::from_millis(2000));
    let out = run(
        "camera-agent",
        &["status", "--socket", s(&socket), "--json"],
    );
    let _ = viewer.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    let viewers = report["viewers"].as_array().expect("viewers");
    assert_eq!(viewers.len(), 1, "{report}");
    assert_eq!(viewers[0]["viewer"], "alice");
    assert_eq!(viewers[0]["path"], "direct");
    assert!(viewers[0]["fps"].as_f64().expect("fps") > 10.0, "{report}");
    assert!(
        viewers[0]["bitrate_kbps"].as_f64().expect("bitrate") > 100.0,
        "{report}"
    );
    assert_eq!(report["registered"], true);
}

/// Frames ffprobe decodes from a container file.
fn ffprobe_mp4_frames(path: &Path) -> u64 {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe rejects {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a frame count")
}

#[test]
fn recording_survives_kill_9_and_rotates_into_segments() {
    let dep = Deployment::new(None);
    let socket = dep.path("c.sock");
    let (_cam, _log) = dep.start_camera(&["--status-socket", s(&socket)]);
    let viewer = |extra: &[&str]| dep.viewer(extra);
    let d = dep.dir.path();
    // A clean recording has every frame, with the stream's frame rate.
    let clean = d.join("clean.mp4");
    assert!(viewer(&["--frames", "60", "--record", s(&clean)])
        .status()
        .expect("runs")
        .success());
    assert_eq!(ffprobe_mp4_frames(&clean), 60);
    // kill -9 in the middle: the file still plays up to its last complete GOP.
    let crashed = d.join("crashed.mp4");
    let mut child = viewer(&["--record", s(&crashed)]).spawn().expect("viewer");
    std::thread::sleep(Duration::from_millis(3500));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let frames = ffprobe_mp4_frames(&crashed);
    assert!(
        frames >= 50,
        "only {frames} frames survived 3.5 s of recording"
    );
    assert_eq!(frames % 25, 0, "whole GOPs only: {frames}");
    let decode = Command::new("ffmpeg")
        .args(["-v", "error", "-i", s(&crashed), "-f", "null", "-"])
        .output()
        .expect("ffmpeg");
    assert!(
        decode.status.success() && decode.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&decode.stderr)
    );
    // Rotation: a new file every second.
    let rotated = d.join("seg.mp4");
    assert!(
        viewer(&["--frames", "100", "--record", s(&rotated), "--segment", "1"])
            .status()
            .expect("runs")
            .success()
    );
    let mut total = 0;
    for i in 0..3 {
        total += ffprobe_mp4_frames(&d.join(format!("seg-{i:03}.mp4")));
    }
    assert!(total >= 75, "segments hold {total} frames");
}

#[test]
fn rendezvous_sigterm_closes_with_a_code_and_cameras_come_back() {
    let mut dep = Deployment::new(None);
    let (_cam, cam_log) = dep.start_camera(&["--status-socket", s(&dep.path("c.sock"))]);
    // SIGTERM: the rendezvous sends GoingAway, then closes every connection with its
    // shutdown code.
    let pid = dep._rdv.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let status = dep._rdv.0.wait().expect("rendezvous exits");
    assert!(status.success(), "rendezvous exit status {status}");
    // It told the camera first how long to spread its reconnect over.
    wait_for_line(&cam_log, "rendezvous going away", 10);
    // A new rendezvous on the same address: the camera registers again by itself.
    let (ca, cert, key) = (
        dep.path("ca.pem"),
        dep.path("rendezvous-rdv-1.pem"),
        dep.path("rendezvous-rdv-1.key"),
    );
    let (rdv, log) = spawn(
        "rendezvous",
        &[
            "--listen",
            &dep.rdv_addr,
            "--ca",
            s(&ca),
            "--cert",
            s(&cert),
            "--key",
            s(&key),
        ],
    );
    wait_for_line(&log, "rendezvous listening", 10);
    wait_for_line(&cam_log, "registered", 15);
    dep._rdv = rdv;
    dep._rdv_log = log;
    let out = dep.viewer(&["--frames", "5"]).output().expect("viewer");
    assert!(out.status.success());
}
