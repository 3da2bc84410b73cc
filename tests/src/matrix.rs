//! The NAT matrix: every combination of NATs from LAB.md, each run with the real
//! rendezvous, camera-agent and viewer binaries inside a fresh [`Lab`], reporting the path
//! taken and the times a user notices.
//!
//! Used by the `nat-matrix` binary (prints a table, writes JSON) and by the e2e test that
//! runs the CI part of the matrix.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use peercam_certs::{Ca, Identity, LeafSpec, Role};
use serde::Serialize;

use crate::lab::{Lab, LabSpec, Nat, Side};
use crate::{binary, sample_path};

/// Which address family the peers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 sockets, rendezvous over IPv4.
    V4,
    /// Dual-stack sockets, rendezvous over IPv6.
    V6,
    /// Dual-stack sockets, rendezvous over IPv4: candidates of both families.
    Dual,
}

/// One case of the matrix.
#[derive(Debug, Clone)]
pub struct Case {
    /// The topology.
    pub spec: LabSpec,
    /// Address family.
    pub family: Family,
    /// The path the viewer must report.
    pub expect: &'static str,
}

/// What one case did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Camera side NAT.
    pub camera: String,
    /// Viewer side NAT.
    pub viewer: String,
    /// Packet loss in percent.
    pub loss: u8,
    /// Expected path.
    pub expected: String,
    /// Path the viewer reported.
    pub path: Option<String>,
    /// Viewer start to connected to the camera, ms.
    pub connect_ms: Option<f64>,
    /// Viewer start to first frame, ms.
    pub ttff_ms: Option<f64>,
    /// Frames received.
    pub frames: u64,
    /// Sockets and rendezvous family: v4, v6 or dual.
    pub family: String,
    /// The camera address the viewer used.
    pub remote: Option<String>,
    /// Whether the case passed.
    pub ok: bool,
    /// What went wrong.
    pub error: Option<String>,
}

fn name(n: Nat) -> &'static str {
    match n {
        Nat::Public => "public",
        Nat::FullCone => "full-cone",
        Nat::PortRestricted => "port-restricted",
        Nat::Symmetric => "symmetric",
        Nat::DoubleNat => "double-nat",
        Nat::Ipv6Firewall => "ipv6-firewall",
    }
}

/// A case between two sides, IPv4.
pub fn case(camera: Nat, viewer: Nat, loss: u8, expect: &'static str) -> Case {
    Case {
        spec: LabSpec {
            camera,
            viewer,
            same_lan: false,
            loss_percent: loss,
        },
        family: Family::V4,
        expect,
    }
}

/// Every case of LAB.md's matrix, with 5 % loss variants.
pub fn cases() -> Vec<Case> {
    use Nat::*;
    let mut v = vec![
        case(Public, PortRestricted, 0, "direct"),
        case(PortRestricted, PortRestricted, 0, "direct"),
        case(PortRestricted, Symmetric, 0, "relay"),
        case(Symmetric, PortRestricted, 0, "relay"),
        case(Symmetric, Symmetric, 0, "relay"),
        case(FullCone, Symmetric, 0, "direct"),
        case(Public, Symmetric, 0, "direct"),
        case(DoubleNat, PortRestricted, 0, "direct"),
        Case {
            spec: LabSpec {
                camera: PortRestricted,
                viewer: PortRestricted,
                same_lan: true,
                loss_percent: 0,
            },
            family: Family::V4,
            expect: "lan",
        },
        Case {
            family: Family::V6,
            ..case(Ipv6Firewall, Ipv6Firewall, 0, "direct")
        },
        Case {
            family: Family::Dual,
            ..case(Ipv6Firewall, Ipv6Firewall, 0, "direct")
        },
    ];
    let lossy: Vec<Case> = v
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.spec.loss_percent = 5;
            c
        })
        .collect();
    v.extend(lossy);
    v
}

/// Kills the child when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(mut cmd: std::process::Command) -> Result<(Proc, mpsc::Receiver<String>), String> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Keep draining even when nobody listens any more: a closed pipe would make
            // the child's next log line fail (and end it).
            let _ = tx.send(line);
        }
    });
    Ok((Proc(child), rx))
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Err(format!(
        "no {needle:?} within {within:?}; log: {}",
        seen.join(" | ")
    ))
}

/// Writes a CA, a rendezvous certificate for the lab address, a camera and a viewer.
fn write_pki(dir: &Path) -> Result<(), String> {
    let (ca, _) = Ca::generate("lab CA", 2).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).map_err(|e| e.to_string())?;
    let issue = |role: Role, id: &str, ip: Option<std::net::IpAddr>| -> Result<(), String> {
        let mut spec = LeafSpec::new(Identity::new(role, id).map_err(|e| e.to_string())?);
        spec.ips.extend(ip);
        let issued = ca.issue(&spec).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(format!("{id}.pem")), issued.cert_pem)
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join(format!("{id}.key")), issued.key_pem).map_err(|e| e.to_string())
    };
    issue(Role::Rendezvous, "rdv", Some(Lab::RENDEZVOUS_IP.into()))?;
    issue(Role::Rendezvous, "rdv6", Some(Lab::RENDEZVOUS_IP6.into()))?;
    issue(Role::Camera, "cam-1", None)?;
    issue(Role::Viewer, "alice", None)
}

/// Runs one case: builds the lab, runs the three binaries in it, reads the viewer's
/// summary. Everything it started is gone when it returns.
pub fn run_case(case: &Case) -> Outcome {
    run_case_with(case, false)
}

/// Runs one case as a baseline: the camera sends no punch packets and the viewer does not
/// use the relay, i.e. a plain client dialling a server behind a NAT. `ok` then means "the
/// baseline connected", whatever the path.
pub fn run_baseline(case: &Case) -> Outcome {
    run_case_with(case, true)
}

fn run_case_with(case: &Case, baseline: bool) -> Outcome {
    let mut out = Outcome {
        camera: name(case.spec.camera).into(),
        viewer: if case.spec.same_lan {
            "same LAN".into()
        } else {
            name(case.spec.viewer).into()
        },
        loss: case.spec.loss_percent,
        expected: case.expect.into(),
        path: None,
        connect_ms: None,
        ttff_ms: None,
        frames: 0,
        family: format!("{:?}", case.family).to_lowercase(),
        remote: None,
        ok: false,
        error: None,
    };
    match run_inner(case, baseline, &mut out) {
        Ok(()) if baseline => out.ok = out.frames >= FRAMES,
        Ok(()) => {
            let v6_remote = out.remote.as_deref().is_some_and(|r| r.starts_with('['));
            let family_ok = case.family != Family::V6 || v6_remote;
            out.ok = out.path.as_deref() == Some(case.expect) && out.frames >= FRAMES && family_ok;
            if !out.ok {
                out.error = Some(format!(
                    "expected path {} and {FRAMES} frames{}, got {:?} and {} via {:?}",
                    case.expect,
                    if case.family == Family::V6 {
                        " over IPv6"
                    } else {
                        ""
                    },
                    out.path,
                    out.frames,
                    out.remote
                ));
            }
        }
        Err(e) => out.error = Some(e),
    }
    out
}

/// Frames each case must receive.
pub const FRAMES: u64 = 25;

/// A lab with a rendezvous and a camera (cam-1, allowing alice) running in it, ready for
/// viewer commands. Everything stops when it is dropped.
pub struct Scene {
    /// The lab (dropped last: it owns the namespaces).
    pub lab: Lab,
    dir: tempfile::TempDir,
    rdv: String,
    any: &'static str,
    rdv_proc: Option<Proc>,
    cam_proc: Option<Proc>,
    logs: Vec<(&'static str, mpsc::Receiver<String>)>,
}

/// Options for a [`Scene`].
#[derive(Debug, Clone, Default)]
pub struct SceneOptions {
    /// Camera sends no punch packets.
    pub no_punch: bool,
    /// Rendezvous offers no relay.
    pub no_relay: bool,
}

impl Scene {
    /// Builds the lab and starts the rendezvous and the camera; waits for registration.
    pub fn start(case: &Case, opts: &SceneOptions) -> Result<Scene, String> {
        let lab = Lab::build(&case.spec).map_err(|e| format!("lab: {e}"))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        write_pki(dir.path())?;
        let (rdv, listen, rdv_id) = match case.family {
            Family::V4 => (
                SocketAddr::new(Lab::RENDEZVOUS_IP.into(), 7400),
                "198.18.0.1:7400",
                "rdv",
            ),
            Family::V6 => (
                SocketAddr::new(Lab::RENDEZVOUS_IP6.into(), 7400),
                "[::]:7400",
                "rdv6",
            ),
            Family::Dual => (
                SocketAddr::new(Lab::RENDEZVOUS_IP.into(), 7400),
                "[::]:7400",
                "rdv",
            ),
        };
        let any = if case.family == Family::V4 {
            "0.0.0.0"
        } else {
            "[::]"
        };
        let mut scene = Scene {
            lab,
            dir,
            rdv: rdv.to_string(),
            any,
            rdv_proc: None,
            cam_proc: None,
            logs: Vec::new(),
        };
        let base = scene.dir.path().to_path_buf();
        let p = |f: &str| base.join(f).display().to_string();
        let mut cmd = scene
            .lab
            .command(scene.lab.internet_ns(), binary("rendezvous"));
        cmd.args(["--listen", listen, "--ca", &p("ca.pem")]).args([
            "--cert",
            &p(&format!("{rdv_id}.pem")),
            "--key",
            &p(&format!("{rdv_id}.key")),
        ]);
        if opts.no_relay {
            cmd.arg("--no-relay");
        }
        let (rdv_proc, rdv_log) = spawn_logged(cmd)?;
        scene.rdv_proc = Some(rdv_proc);
        wait_line(&rdv_log, "rendezvous listening", Duration::from_secs(10))?;
        scene.logs.push(("rendezvous", rdv_log));
        let bind = format!("{any}:{}", scene.lab.fixed_port(Side::Camera).unwrap_or(0));
        let mut cmd = scene
            .lab
            .command(scene.lab.host_ns(Side::Camera), binary("camera-agent"));
        cmd.args([
            "--rendezvous",
            &scene.rdv,
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p("cam-1.pem"),
        ])
        .args([
            "--key",
            &p("cam-1.key"),
            "--allow",
            "alice",
            "--bind",
            &bind,
            "--source",
        ])
        .arg(sample_path());
        if opts.no_punch {
            cmd.arg("--no-punch");
        }
        let (cam_proc, cam_log) = spawn_logged(cmd)?;
        scene.cam_proc = Some(cam_proc);
        wait_line(&cam_log, "registered", Duration::from_secs(15))?;
        scene.logs.push(("camera", cam_log));
        Ok(scene)
    }

    /// The log lines of the rendezvous and the camera so far (for failure reports).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (who, rx) in &self.logs {
            while let Ok(line) = rx.try_recv() {
                out += &format!("{who}: {line}\n");
            }
        }
        out
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }

    /// A `viewer` command for alice, in the viewer's namespace, with `args` before the
    /// connection settings (so subcommands work).
    pub fn viewer(&self, args: &[&str]) -> std::process::Command {
        self.viewer_to(args, &self.rdv)
    }

    /// Like [`Scene::viewer`], dialling the rendezvous at `rdv`.
    pub fn viewer_to(&self, args: &[&str], rdv: &str) -> std::process::Command {
        let bind = format!(
            "{}:{}",
            self.any,
            self.lab.fixed_port(Side::Viewer).unwrap_or(0)
        );
        let mut cmd = self
            .lab
            .command(self.lab.host_ns(Side::Viewer), binary("viewer"));
        cmd.env(
            "RUST_LOG",
            std::env::var("VIEWER_LOG").unwrap_or_else(|_| "error".into()),
        )
        .args(args)
        .args(["--rendezvous", rdv, "--ca", &self.path("ca.pem")])
        .args([
            "--cert",
            &self.path("alice.pem"),
            "--key",
            &self.path("alice.key"),
            "--bind",
            &bind,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }

    /// Runs `camera-agent` with `args` and the camera's identity, in the camera's
    /// namespace (for its subcommands, e.g. netcheck), with a bound.
    pub fn run_camera_tool(&self, args: &[&str]) -> Result<std::process::Output, String> {
        let mut cmd = self
            .lab
            .command(self.lab.host_ns(Side::Camera), binary("camera-agent"));
        cmd.args(args)
            .args(["--rendezvous", &self.rdv, "--ca", &self.path("ca.pem")])
            .args([
                "--cert",
                &self.path("cam-1.pem"),
                "--key",
                &self.path("cam-1.key"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start camera-agent: {e}"))?;
        wait_output(child, Duration::from_secs(30))
    }

    /// Runs a viewer command with a bound.
    pub fn run_viewer(&self, args: &[&str]) -> Result<std::process::Output, String> {
        let child = self
            .viewer(args)
            .spawn()
            .map_err(|e| format!("cannot start the viewer: {e}"))?;
        wait_output(child, Duration::from_secs(40))
    }

    /// Stops the camera (SIGTERM, so it unregisters at once).
    pub fn stop_camera(&mut self) {
        if let Some(mut cam) = self.cam_proc.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &cam.0.id().to_string()])
                .status();
            let _ = cam.0.wait();
        }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        self.cam_proc.take();
        self.rdv_proc.take();
    }
}

fn run_inner(case: &Case, baseline: bool, out: &mut Outcome) -> Result<(), String> {
    let opts = SceneOptions {
        no_punch: baseline,
        no_relay: false,
    };
    let scene = Scene::start(case, &opts)?;
    let frames = FRAMES.to_string();
    let mut args = vec![
        "cam-1",
        "--json",
        "--frames",
        &frames,
        "--connect-timeout",
        "5",
    ];
    if baseline {
        args.extend(["--relay", "never"]);
    }
    let output = scene.run_viewer(&args)?;
    if !output.status.success() {
        return Err(format!(
            "viewer failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("viewer printed no JSON summary: {e}"))?;
    out.path = v["path"].as_str().map(String::from);
    out.connect_ms = v["connect_ms"].as_f64();
    out.ttff_ms = v["ttff_ms"].as_f64();
    out.frames = v["frames"].as_u64().unwrap_or(0);
    out.remote = v["remote"].as_str().map(String::from);
    Ok(())
}

/// Waits for a child with a bound; kills it when the bound passes.
fn wait_output(child: Child, limit: Duration) -> Result<std::process::Output, String> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            Err(format!("viewer did not finish within {limit:?}"))
        }
    }
}

/// Formats outcomes as a text table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = format!(
        "{:<16} {:<16} {:>5} {:<5} {:<8} {:<8} {:>11} {:>9} {:>4}\n",
        "camera NAT", "viewer NAT", "loss", "ip", "expect", "path", "connect ms", "ttff ms", "ok"
    );
    let f = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    for o in outcomes {
        s += &format!(
            "{:<16} {:<16} {:>4}% {:<5} {:<8} {:<8} {:>11} {:>9} {:>4}\n",
            o.camera,
            o.viewer,
            o.loss,
            o.family,
            o.expected,
            o.path.as_deref().unwrap_or("-"),
            f(o.connect_ms),
            f(o.ttff_ms),
            if o.ok { "ok" } else { "FAIL" }
        );
        if let Some(e) = &o.error {
            s += &format!("    error: {e}\n");
        }
    }
    s
}

/// Formats baseline outcomes: did a plain dial connect, and how.
pub fn baseline_table(outcomes: &[Outcome]) -> String {
    let mut s = format!(
        "{:<16} {:<16} {:>5} {:<5} {:<10} {:>11}\n",
        "camera NAT", "viewer NAT", "loss", "ip", "connected", "connect ms"
    );
    for o in outcomes {
        s += &format!(
            "{:<16} {:<16} {:>4}% {:<5} {:<10} {:>11}\n",
            o.camera,
            o.viewer,
            o.loss,
            o.family,
            if o.ok {
                o.path.as_deref().unwrap_or("yes")
            } else {
                "no"
            },
            o.connect_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    s
}
