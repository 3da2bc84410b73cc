//! Test support for peercam's end-to-end tests: a fresh CA per test, and rendezvous,
//! cameras and viewers started in-process on 127.0.0.1 port 0, every wait bounded.
//!
//! Also starts a real Redis for cluster tests ([`cluster`]), locates the real binaries
//! (for CLI tests) and runs ffprobe on received video.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod lab;
pub mod live;
pub mod load;
pub mod matrix;
pub mod tcp_baseline;
pub mod tunlink;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peercam_camera_agent::SourceSpec;
use peercam_certs::{Ca, Identity, Issued, LeafSpec, Role};
use peercam_common::net::RendezvousAddr;
use peercam_common::tls::{Credentials, Trust};
use peercam_common::{CameraId, ViewerId};

/// The bundled sample clip: 100 frames, 640x360, 25 fps, an IDR every 25 frames.
pub const SAMPLE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../assets/sample.h264"
));

/// Path of the bundled sample clip.
pub fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/sample.h264")
}

/// Runs `fut`, failing the test if it takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs} s: {what}"),
    }
}

/// Sets up logging for a test once (RUST_LOG controls it; quiet by default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A fresh deployment CA with helpers to issue identities.
pub struct Pki {
    /// Where certificate files are written for the binaries.
    pub dir: tempfile::TempDir,
    /// The CA.
    pub ca: Ca,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A new CA.
    pub fn new() -> Self {
        let (ca, key) = Ca::generate("test CA", 30).expect("CA");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write ca");
        std::fs::write(dir.path().join("ca.key"), key).expect("write ca key");
        Pki { dir, ca }
    }

    /// Trust in this CA.
    pub fn trust(&self) -> Trust {
        Trust::from_pem(self.ca.cert_pem(), "test CA").expect("trust")
    }

    /// Issues a certificate from a spec.
    pub fn issue(&self, spec: &LeafSpec) -> Issued {
        self.ca.issue(spec).expect("issue")
    }

    /// A spec for `role`/`id` (rendezvous certificates get 127.0.0.1 and localhost).
    pub fn spec(role: Role, id: &str) -> LeafSpec {
        let mut spec = LeafSpec::new(Identity::new(role, id).expect("id"));
        if role == Role::Rendezvous {
            spec.ips = vec!["127.0.0.1".parse().expect("ip"), "::1".parse().expect("ip")];
            spec.dns_names = vec!["localhost".into()];
        }
        spec
    }

    /// Credentials for `role`/`id`.
    pub fn creds(&self, role: Role, id: &str) -> Credentials {
        creds_from(&self.issue(&Self::spec(role, id)), role)
    }

    /// Writes a fresh certificate and key for `role`/`id` to files; returns their paths.
    pub fn files(&self, role: Role, id: &str) -> (PathBuf, PathBuf) {
        let issued = self.issue(&Self::spec(role, id));
        let cert = self.dir.path().join(format!("{role}-{id}.pem"));
        let key = self.dir.path().join(format!("{role}-{id}.key"));
        std::fs::write(&cert, issued.cert_pem).expect("write cert");
        std::fs::write(&key, issued.key_pem).expect("write key");
        (cert, key)
    }

    /// Path of the CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

/// Credentials from issued PEM (role checked).
pub fn creds_from(issued: &Issued, role: Role) -> Credentials {
    Credentials::from_pem(&issued.cert_pem, &issued.key_pem, role, "test").expect("credentials")
}

/// Starts a rendezvous on `addr` (use port 0 for any).
pub async fn start_rendezvous(pki: &Pki, addr: SocketAddr) -> peercam_rendezvous::Handle {
    let config = peercam_rendezvous::Config {
        listen: addr,
        credentials: pki.creds(Role::Rendezvous, "rdv"),
        trust: pki.trust(),
        limits: peercam_rendezvous::Limits {
            intro_timeout: Duration::from_secs(2),
            drain: Duration::from_millis(300),
            ..Default::default()
        },
    };
    peercam_rendezvous::start(config)
        .await
        .expect("rendezvous starts")
}

/// Starts a rendezvous on any loopback port with `limits` as given.
pub async fn start_rendezvous_with(
    pki: &Pki,
    limits: peercam_rendezvous::Limits,
) -> peercam_rendezvous::Handle {
    let config = peercam_rendezvous::Config {
        listen: any_port(),
        credentials: pki.creds(Role::Rendezvous, "rdv"),
        trust: pki.trust(),
        limits,
    };
    peercam_rendezvous::start(config)
        .await
        .expect("rendezvous starts")
}

/// Loopback on any port.
pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Loopback TCP on any port.
pub fn any_tcp() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// The address a camera or viewer dials to reach `rdv`.
pub fn rdv_addr(addr: SocketAddr) -> RendezvousAddr {
    RendezvousAddr {
        addr,
        server_name: "127.0.0.1".into(),
    }
}

/// A camera configuration streaming the looped sample clip, bound to loopback, with fast
/// reconnects.
pub fn camera_config(
    pki: &Pki,
    creds: Credentials,
    rdv: SocketAddr,
    allow: &[&str],
) -> peercam_camera_agent::Config {
    let source = SourceSpec::File {
        path: sample_path(),
        looped: true,
        fps: None,
    };
    let mut config =
        peercam_camera_agent::Config::new(creds, pki.trust(), vec![rdv_addr(rdv)], source);
    config.bind = any_port();
    config.access = allow
        .iter()
        .map(|v| ViewerId::new(v).expect("id"))
        .collect();
    config.backoff_base = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(800);
    config
}

/// Starts a camera `id` allowing `allow`, and waits until it is registered.
pub async fn start_camera(
    pki: &Pki,
    id: &str,
    rdv: SocketAddr,
    allow: &[&str],
) -> peercam_camera_agent::Handle {
    let config = camera_config(pki, pki.creds(Role::Camera, id), rdv, allow);
    let cam = peercam_camera_agent::start(config)
        .await
        .expect("camera starts");
    wait_registrations(&cam, 1).await;
    cam
}

/// Waits until the camera has registered `n` times in all.
pub async fn wait_registrations(cam: &peercam_camera_agent::Handle, n: u64) {
    let mut status = cam.watch_status();
    within(
        15,
        "camera registration",
        status.wait_for(|s| s.registered.is_some() && s.registrations >= n),
    )
    .await
    .expect("status channel open");
}

/// A viewer configuration for `viewer` watching `camera`, on loopback.
pub fn viewer_config(
    pki: &Pki,
    viewer: &str,
    rdv: SocketAddr,
    camera: &str,
) -> peercam_viewer::Config {
    viewer_config_with(pki, pki.creds(Role::Viewer, viewer), rdv, camera)
}

/// A viewer configuration with given credentials.
pub fn viewer_config_with(
    pki: &Pki,
    creds: Credentials,
    rdv: SocketAddr,
    camera: &str,
) -> peercam_viewer::Config {
    let mut config = peercam_viewer::Config::new(
        creds,
        pki.trust(),
        rdv_addr(rdv),
        CameraId::new(camera).expect("id"),
    );
    config.bind = any_port();
    config.connect_timeout = Duration::from_secs(3);
    config
}

/// Watches with a bound on the whole session.
pub async fn watch(
    config: peercam_viewer::Config,
) -> Result<peercam_viewer::Summary, peercam_viewer::ViewError> {
    within(
        30,
        "viewer session",
        peercam_viewer::watch(config, tokio_util::sync::CancellationToken::new()),
    )
    .await
}

/// Number of frames ffprobe decodes from an Annex B file, or an error message.
pub fn ffprobe_frames(path: &Path) -> Result<u64, String> {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-f",
            "h264",
            "-count_frames",
            "-select_streams",
            "v:0",
        ])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run ffprobe (install ffmpeg): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("ffprobe output: {e}"))
}

/// Path of a workspace binary built by `cargo build --bins` (the test command builds them
/// first). Panics with the fix if it is missing.
pub fn binary(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps, other binaries in target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let dirs = exe.ancestors().skip(1).take(2);
    for dir in dirs {
        let path = dir.join(name);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "binary {name} not found next to {}: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        exe.display()
    )
}
