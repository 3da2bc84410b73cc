//! The live window: the real `viewer --window` binary, on a virtual X display (Xvfb),
//! shows the camera's picture and says the path and the latency in its title; the end of
//! the watch closes it, and closing it ends the watch, the viewer exiting cleanly.
//!
//! Needs Xvfb, xwd (x11-apps), xwininfo (x11-utils) and python3 (to close the window as
//! a window manager would), which scripts/test.sh installs. Without them the tests are
//! skipped with a message, except under CI=true where they fail.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use peercam_certs::Role;
use peercam_tests::*;

/// Kills the child when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// An Xvfb server. Stopped with SIGTERM so that it removes its lock file and socket,
/// which SIGKILL would leave behind.
struct Xvfb(Option<Child>);

impl Drop for Xvfb {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(Proc(child));
    }
}

/// Starts Xvfb on a free display: numbers from 100 up (away from a desktop's), spread by
/// process id; a number in use makes Xvfb exit at once, and the next is tried.
fn start_xvfb() -> (Xvfb, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    for _ in 0..20 {
        let n = 100
            + std::process::id()
                .wrapping_mul(7)
                .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
                % 800;
        if Path::new(&format!("/tmp/.X{n}-lock")).exists() {
            continue;
        }
        let mut child = Command::new("Xvfb")
            .arg(format!(":{n}"))
            .args(["-displayfd", "1", "-screen", "0", "1024x768x24"])
            // Without -noreset the server resets whenever its last client leaves (each
            // xwininfo), refusing the viewer's connection if it comes in at that moment.
            .args(["-nolisten", "tcp", "-noreset"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb starts");
        let stdout = child.stdout.take().expect("stdout");
        let xvfb = Xvfb(Some(child));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        // Ready when it writes the number; an empty line when it exited.
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("Xvfb is ready or exits within 10 s");
        if line.trim() == n.to_string() {
            return (xvfb, format!(":{n}"));
        }
    }
    panic!("no free X display found for Xvfb")
}

/// Runs an X client with a time limit; its stdout.
fn x_tool(display: &str, tool: &str, args: &[&str]) -> Vec<u8> {
    let mut child = Command::new(tool)
        .args(args)
        .env("DISPLAY", display)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} runs: {e}"));
    // Read while it runs: a screenshot is larger than a pipe's buffer.
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let mut child = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "{tool} took more than 10 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().expect("reader");
    if status.success() {
        out
    } else {
        Vec::new()
    }
}

/// The viewer's top-level window: its id and title, from `xwininfo -root -tree`.
fn find_window(display: &str) -> Option<(String, String)> {
    let out = x_tool(display, "xwininfo", &["-root", "-tree"]);
    String::from_utf8_lossy(&out).lines().find_map(|line| {
        let line = line.trim();
        let (id, rest) = line.split_once(' ')?;
        let title = rest.strip_prefix('"')?.split("\": (").next()?;
        title
            .starts_with("peercam: cam-1")
            .then(|| (id.to_string(), title.to_string()))
    })
}

/// A screenshot as `(width, height, 0xRRGGBB pixels)`, parsed from xwd's XWD format
/// (ZPixmap, 24 or 32 bits per pixel, either byte order).
fn screenshot(display: &str, window: &str) -> Option<(usize, usize, Vec<u32>)> {
    let b = x_tool(display, "xwd", &["-silent", "-id", window]);
    let field = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            b.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    let header_size = field(0)? as usize;
    let (width, height) = (field(4)? as usize, field(5)? as usize);
    let lsb_first = field(7)? == 0;
    let bits_per_pixel = field(11)? as usize;
    let bytes_per_line = field(12)? as usize;
    let masks = [field(14)?, field(15)?, field(16)?];
    let colors = field(19)? as usize;
    assert!(
        bits_per_pixel == 32 || bits_per_pixel == 24,
        "xwd gave {bits_per_pixel} bits per pixel"
    );
    let data = b.get(header_size + colors * 12..)?;
    let step = bits_per_pixel / 8;
    let mut pixels = Vec::with_capacity(width * height);
    for y in 0..height {
        for x in 0..width {
            let at = y * bytes_per_line + x * step;
            let raw = data.get(at..at + step)?;
            let mut v = 0u32;
            for (k, byte) in raw.iter().enumerate() {
                let shift = if lsb_first { k } else { step - 1 - k } * 8;
                v |= u32::from(*byte) << shift;
            }
            let channel = |m: u32| (v & m) >> m.trailing_zeros();
            pixels.push(channel(masks[0]) << 16 | channel(masks[1]) << 8 | channel(masks[2]));
        }
    }
    Some((width, height, pixels))
}

/// How many pixels of each of the test pattern's bars: red, green, blue, yellow.
fn bar_colours(pixels: &[u32]) -> [usize; 4] {
    let mut n = [0; 4];
    for p in pixels {
        let (r, g, b) = (p >> 16 & 0xff, p >> 8 & 0xff, p & 0xff);
        let (hi, lo) = (|c| c > 180, |c| c < 80);
        let class = match (hi(r), hi(g), hi(b), lo(r), lo(g), lo(b)) {
            (true, _, _, _, true, true) => 0,
            (_, true, _, true, _, true) => 1,
            (_, _, true, true, true, _) => 2,
            (true, true, _, _, _, true) => 3,
            _ => continue,
        };
        n[class] += 1;
    }
    n
}

/// Asks the window to close as a window manager does (a `WM_DELETE_WINDOW` client
/// message), from Python's ctypes and Xlib, since Xvfb has no window manager.
const CLOSE_WINDOW_PY: &str = r#"
import ctypes, sys
x = ctypes.cdll.LoadLibrary("libX11.so.6")
x.XOpenDisplay.restype = ctypes.c_void_p
x.XInternAtom.restype = ctypes.c_ulong
x.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
x.XCloseDisplay.argtypes = [ctypes.c_void_p]
class ClientMessage(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("window", ctypes.c_ulong),
                ("message_type", ctypes.c_ulong), ("format", ctypes.c_int),
                ("data", ctypes.c_long * 5), ("pad", ctypes.c_long * 12)]
x.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long,
                         ctypes.POINTER(ClientMessage)]
d = x.XOpenDisplay(None)
if not d:
    sys.exit("cannot open the display")
w = int(sys.argv[1], 16)
e = ClientMessage(type=33, window=w, format=32,
                  message_type=x.XInternAtom(d, b"WM_PROTOCOLS", 0))
e.data[0] = x.XInternAtom(d, b"WM_DELETE_WINDOW", 0)
x.XSendEvent(d, w, 0, 0, ctypes.byref(e))
x.XCloseDisplay(d)
"#;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A virtual display, a rendezvous and camera cam-1 (in-process, allowing alice), and
/// alice's certificate files for the real viewer.
struct Lab {
    // Dropped in this order: the camera and rendezvous, their runtime, then the display.
    cam: peercam_camera_agent::Handle,
    rdv: peercam_rendezvous::Handle,
    _runtime: tokio::runtime::Runtime,
    pki: Pki,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    display: String,
    _xvfb: Xvfb,
}

impl Lab {
    /// `None` (after saying so) when the X tools are missing outside CI.
    fn start() -> Option<Lab> {
        let missing: Vec<&str> = ["Xvfb", "xwd", "xwininfo", "python3"]
            .into_iter()
            .filter(|t| !on_path(t))
            .collect();
        if !missing.is_empty() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run the window tests, but {missing:?} are missing: scripts/test.sh installs them"
            );
            eprintln!(
                "SKIPPED window test: {missing:?} not installed (apt-get install xvfb x11-apps x11-utils, or run scripts/test.sh)"
            );
            return None;
        }
        let (xvfb, display) = start_xvfb();
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let pki = Pki::new();
        let (rdv, cam) = runtime.block_on(async {
            let rdv = start_rendezvous(&pki, any_port()).await;
            let cam = start_camera(&pki, "cam-1", rdv.local_addr(), &["alice"]).await;
            (rdv, cam)
        });
        let (cert, key) = pki.files(Role::Viewer, "alice");
        Some(Lab {
            cam,
            rdv,
            _runtime: runtime,
            pki,
            cert,
            key,
            display,
            _xvfb: xvfb,
        })
    }

    /// The real viewer with `--window` on this display, plus `extra` arguments.
    fn viewer(&self, extra: &[&str]) -> Proc {
        let child = Command::new(binary("viewer"))
            .env("DISPLAY", &self.display)
            .args(["--rendezvous", &self.rdv.local_addr().to_string()])
            .args(["--ca", s(&self.pki.ca_path()), "--cert", s(&self.cert)])
            .args(["--key", s(&self.key), "--bind", "127.0.0.1:0", "cam-1"])
            .arg("--window")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("viewer runs");
        Proc(child)
    }

    /// Waits until the viewer's window has a title with a measured latency.
    fn wait_for_title(&self, viewer: &mut Proc, deadline: Instant) -> (String, String) {
        loop {
            if let Some((id, title)) = find_window(&self.display) {
                if title.ends_with(" ms") {
                    return (id, title);
                }
            }
            if let Some(status) = viewer.0.try_wait().expect("wait") {
                let mut stderr = String::new();
                if let Some(e) = viewer.0.stderr.as_mut() {
                    let _ = e.read_to_string(&mut stderr);
                }
                panic!("viewer exited ({status}) before showing a window with a latency: {stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "no viewer window titled with a latency; last seen: {:?}",
                find_window(&self.display)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(self) {
        self.cam.shutdown();
        self.rdv.shutdown();
    }
}

/// Waits for the viewer to exit by itself: its status, stdout and stderr.
fn exited(mut viewer: Proc, within: Duration) -> (std::process::ExitStatus, String, String) {
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = viewer.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "viewer still running after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    if let Some(o) = viewer.0.stdout.as_mut() {
        let _ = o.read_to_string(&mut stdout);
    }
    if let Some(e) = viewer.0.stderr.as_mut() {
        let _ = e.read_to_string(&mut stderr);
    }
    (status, stdout, stderr)
}

#[test]
fn window_shows_the_camera_picture_with_path_and_latency_in_its_title() {
    let Some(lab) = Lab::start() else { return };
    let out = lab.pki.dir.path().join("window.h264");
    let started = Instant::now();
    let mut viewer = lab.viewer(&["--duration", "8", "--quiet", "-o", s(&out)]);

    // The title names the path, then a measured latency once live frames arrive.
    let deadline = started + Duration::from_secs(7);
    let (id, title) = lab.wait_for_title(&mut viewer, deadline);
    assert!(
        title.starts_with("peercam: cam-1 | direct | latency "),
        "title: {title}"
    );
    let latency: u64 = title
        .trim_end_matches(" ms")
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("latency in {title:?}"));
    assert!(latency < 1500, "latency on loopback: {latency} ms");

    // The window shows the test pattern (its colour bars, at the stream's size), and it
    // is live: the burnt-in frame counter and the moving line change between two shots.
    let mut last = None;
    let mut first_shot: Option<Vec<u32>> = None;
    let live = loop {
        if let Some((w, h, pixels)) = screenshot(&lab.display, &id) {
            let bars = bar_colours(&pixels);
            if (w, h) == (640, 360) && bars.iter().all(|&n| n > pixels.len() / 20) {
                match &first_shot {
                    None => first_shot = Some(pixels),
                    Some(first) if *first != pixels => break true,
                    Some(_) => {}
                }
            }
            last = Some((w, h, bars));
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        live,
        "the window never showed the moving colour bars (showed them once: {}; last size and red/green/blue/yellow pixel counts: {last:?})",
        first_shot.is_some()
    );

    // The end of the watch (--duration) closes the window and the viewer exits cleanly,
    // and -o got the video too.
    let (status, _, stderr) = exited(viewer, Duration::from_secs(15));
    assert!(status.success(), "viewer failed ({status}): {stderr}");
    assert!(find_window(&lab.display).is_none(), "the window closed");
    let frames = ffprobe_frames(&out).expect("ffprobe reads the -o file");
    assert!(frames >= 100, "-o still gets the video: {frames} frames");
    lab.stop();
}

#[test]
fn closing_the_window_stops_the_viewer() {
    let Some(lab) = Lab::start() else { return };
    let mut viewer = lab.viewer(&["--json"]);
    let (id, _) = lab.wait_for_title(&mut viewer, Instant::now() + Duration::from_secs(7));
    let closed = Command::new("python3")
        .args(["-c", CLOSE_WINDOW_PY, &id])
        .env("DISPLAY", &lab.display)
        .status()
        .expect("python3 runs");
    assert!(closed.success(), "sending WM_DELETE_WINDOW failed");
    let (status, stdout, stderr) = exited(viewer, Duration::from_secs(5));
    assert!(status.success(), "viewer failed ({status}): {stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON line");
    assert_eq!(summary["ended"], "interrupted", "{summary}");
    assert!(summary["frames"].as_u64() > Some(0), "{summary}");
    lab.stop();
}
