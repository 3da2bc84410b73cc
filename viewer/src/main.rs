//! `viewer`: watch a peercam camera from anywhere.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use peercam_common::CameraId;
use peercam_viewer::config::FileConfig;
use peercam_viewer::{RelayMode, Sink, Summary, ViewError};
use tokio_util::sync::CancellationToken;

/// peercam viewer: finds a camera through the rendezvous, connects to it directly and
/// end-to-end encrypted, and writes its H.264 video (Annex B) to a file or stdout.
///
/// Example: viewer --rendezvous rdv.example.com:7400 --ca ca.pem --cert viewer-alice.pem
/// --key viewer-alice.key cam-7 -o - | ffplay -f h264 -
#[derive(Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The camera's ID.
    #[arg(required = true)]
    camera: Option<CameraId>,
    /// TOML config file (settings below override it).
    #[arg(long, short, env = "PEERCAM_VIEWER_CONFIG")]
    config: Option<PathBuf>,
    /// Rendezvous server host:port.
    #[arg(long, env = "PEERCAM_RENDEZVOUS")]
    rendezvous: Option<String>,
    /// Deployment CA certificate.
    #[arg(long, env = "PEERCAM_CA")]
    ca: Option<PathBuf>,
    /// This viewer's certificate.
    #[arg(long, env = "PEERCAM_CERT")]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "PEERCAM_KEY")]
    key: Option<PathBuf>,
    /// Write Annex B H.264 here (`-` for stdout).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Also record to a fragmented MP4 file (playable up to its last GOP even if the
    /// viewer is killed).
    #[arg(long)]
    record: Option<PathBuf>,
    /// With --record: start a new file (NAME-000.mp4, NAME-001.mp4, ...) every SECS.
    #[arg(long, value_name = "SECS")]
    segment: Option<u64>,
    /// Stop after this many frames.
    #[arg(long)]
    frames: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Print one JSON summary line on stdout at exit, and no progress.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Local UDP address [default: 0.0.0.0:0].
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
    /// Relay use: auto (direct preferred), never, or only.
    #[arg(long, default_value = "auto", value_parser = ["auto", "never", "only"])]
    relay: String,
    /// Seconds allowed for reaching the rendezvous and the camera.
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    /// Show the video in a desktop window (its title shows the path and the latency);
    /// closing the window stops the viewer. Combines with -o and --record.
    #[arg(long)]
    window: bool,
    /// For tests and benchmarks: impair this viewer's UDP traffic in both directions,
    /// e.g. `rtt=50ms,jitter=5ms,loss=5%,rate=2mbit,queue=200ms`.
    #[arg(long, value_name = "SPEC")]
    impair: Option<peercam_common::impair::Impairment>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Check what this network allows: UDP, public address, whether the NAT is symmetric,
    /// IPv6, RTT to the rendezvous, and a verdict. Exit status 4 when UDP gets no answer.
    Netcheck {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Probe the path to a camera: one line per probe, stopping once direct. Exit status:
    /// 0 direct (or LAN), 6 relay only, 4 unreachable, 2 not allowed, 3 offline.
    Ping {
        /// The camera's ID.
        camera: CameraId,
        /// Most probes.
        #[arg(long, short = 'c', default_value_t = 5)]
        count: u32,
        /// One JSON line per probe, and a final verdict line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

impl Common {
    fn file_config(self) -> Result<FileConfig, (u8, String)> {
        let mut file = match &self.config {
            Some(path) => FileConfig::load(path).map_err(|e| (1, format!("{e:#}")))?,
            None => FileConfig::default(),
        };
        file.rendezvous = self.rendezvous.or(file.rendezvous);
        file.ca = self.ca.or(file.ca);
        file.cert = self.cert.or(file.cert);
        file.key = self.key.or(file.key);
        file.bind = self.bind.or(file.bind);
        Ok(file)
    }
}

/// Settings shared by every subcommand.
#[derive(clap::Args)]
struct Common {
    /// TOML config file.
    #[arg(long, short = 'C', env = "PEERCAM_VIEWER_CONFIG")]
    config: Option<PathBuf>,
    /// Rendezvous server host:port.
    #[arg(long, env = "PEERCAM_RENDEZVOUS")]
    rendezvous: Option<String>,
    /// Deployment CA certificate.
    #[arg(long, env = "PEERCAM_CA")]
    ca: Option<PathBuf>,
    /// This viewer's certificate.
    #[arg(long, env = "PEERCAM_CERT")]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "PEERCAM_KEY")]
    key: Option<PathBuf>,
    /// Local UDP address [default: 0.0.0.0:0].
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Netcheck { json, common }) = cli.command {
        return match netcheck(json, common) {
            Ok(code) => code,
            Err((code, msg)) => {
                eprintln!("viewer: {msg}");
                ExitCode::from(code)
            }
        };
    }
    if let Some(Command::Ping {
        camera,
        count,
        json,
        common,
    }) = cli.command
    {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
            )
            .with_writer(std::io::stderr)
            .init();
        return match ping(camera, count, json, common) {
            Ok(code) => code,
            Err((code, msg)) => {
                eprintln!("viewer: {msg}");
                ExitCode::from(code)
            }
        };
    }
    // On a terminal the viewer says what it is doing; with --json or --quiet only errors.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if cli.json || cli.quiet {
            "error"
        } else {
            // winit warns about what a bare X server lacks (XSETTINGS, screen size).
            "warn,progress=info,winit=error"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .with_level(false)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err((code, msg)) => {
            eprintln!("viewer: {msg}");
            ExitCode::from(code)
        }
    }
}

fn secs(what: &str, s: f64) -> Result<Duration, (u8, String)> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| (1, format!("--{what} must be a positive number of seconds")))
}

fn run(cli: Cli) -> Result<ExitCode, (u8, String)> {
    #[cfg(not(feature = "window"))]
    if cli.window {
        return Err((1, NO_WINDOW.into()));
    }
    let mut file = match &cli.config {
        Some(path) => FileConfig::load(path).map_err(|e| (1, format!("{e:#}")))?,
        None => FileConfig::default(),
    };
    file.rendezvous = cli.rendezvous.or(file.rendezvous);
    file.ca = cli.ca.or(file.ca);
    file.cert = cli.cert.or(file.cert);
    file.key = cli.key.or(file.key);
    file.bind = cli.bind.or(file.bind);
    let camera = cli
        .camera
        .ok_or((1, "which camera? pass its ID".to_string()))?;
    let mut config = file.resolve(camera).map_err(|e| (1, format!("{e:#}")))?;
    config.sink = match cli.output.as_deref() {
        None => Sink::Discard,
        Some(p) if p.as_os_str() == "-" => Sink::Stdout,
        Some(p) => Sink::File(p.to_path_buf()),
    };
    if cli.json && config.sink == Sink::Stdout {
        return Err((
            1,
            "--json and -o - both use stdout: write the video to a file instead".into(),
        ));
    }
    config.relay = match cli.relay.as_str() {
        "never" => RelayMode::Never,
        "only" => RelayMode::Only,
        _ => RelayMode::Auto,
    };
    config.max_frames = cli.frames;
    config.record = cli.record;
    config.record_segment_secs = cli.segment;
    config.duration = cli.duration.map(|d| secs("duration", d)).transpose()?;
    config.connect_timeout = secs("connect-timeout", cli.connect_timeout)?;
    config.progress = !cli.json && !cli.quiet;
    config.impairment = cli.impair;
    let summary = if cli.window {
        watch_in_window(config)?
    } else {
        watch(config, CancellationToken::new())?
    };
    let summary = summary.map_err(|e| (e.exit_code(), e.to_string()))?;
    if cli.json {
        let line = serde_json::to_string(&summary).map_err(|e| (1, e.to_string()))?;
        println!("{line}");
    } else if !cli.quiet {
        eprintln!(
            "viewer: {} frames, {} bytes over {} ({}), first frame after {} ms; {}",
            summary.frames,
            summary.bytes,
            summary.path,
            summary.remote,
            summary
                .ttff_ms
                .map(|t| format!("{t:.0}"))
                .unwrap_or_else(|| "-".into()),
            summary.ended
        );
    }
    let ok = !summary.ended.starts_with("connection lost")
        && !summary.ended.starts_with("output closed");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Watches on a new runtime until done, `cancel` or Ctrl-C.
fn watch(
    config: peercam_viewer::Config,
    cancel: CancellationToken,
) -> Result<Result<Summary, ViewError>, (u8, String)> {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| (1, format!("cannot start the async runtime: {e}")))?;
    Ok(runtime.block_on(async {
        let on_signal = cancel.clone();
        let signals = tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            on_signal.cancel();
        });
        let result = peercam_viewer::watch(config, cancel).await;
        signals.abort();
        result
    }))
}

/// `--window`: the window's event loop runs on this (main) thread, as winit requires; the
/// watch runs on its own thread. Closing the window cancels the watch; the end of the
/// watch closes the window.
#[cfg(feature = "window")]
fn watch_in_window(
    mut config: peercam_viewer::Config,
) -> Result<Result<Summary, ViewError>, (u8, String)> {
    use peercam_viewer::window::{run_window, VideoWindow};
    let window = VideoWindow::open(format!("peercam: {} | connecting", config.camera))
        .map_err(|e| (1, e.to_string()))?;
    let handle = window.handle();
    config.frame_hook = Some(handle.frame_hook(&config.camera));
    let cancel = CancellationToken::new();
    let watch_cancel = cancel.clone();
    let watcher = std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            let result = watch(config, watch_cancel);
            handle.close();
            result
        })
        .map_err(|e| (1, format!("cannot start the viewing thread: {e}")))?;
    let shown = run_window(window, cancel.clone());
    cancel.cancel();
    let result = watcher
        .join()
        .map_err(|_| (1, "the viewing thread panicked".to_string()))?;
    shown.map_err(|e| (1, e.to_string()))?;
    result
}

/// What `--window` says when the binary was built without the `window` feature.
#[cfg(not(feature = "window"))]
const NO_WINDOW: &str = "--window is not available: this viewer was built without the `window` \
    feature (cargo build -p peercam-viewer --features window adds it); meanwhile use \
    -o - | ffplay -f h264 -";

#[cfg(not(feature = "window"))]
fn watch_in_window(
    _config: peercam_viewer::Config,
) -> Result<Result<Summary, ViewError>, (u8, String)> {
    Err((1, NO_WINDOW.into()))
}

fn netcheck(json: bool, common: Common) -> Result<ExitCode, (u8, String)> {
    let file = common.file_config()?;
    let (creds, trust, rendezvous) = file.identity().map_err(|e| (1, format!("{e:#}")))?;
    let bind = file
        .bind
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| (1, format!("cannot start the async runtime: {e}")))?;
    if !json {
        eprintln!("checking the network through the rendezvous at {rendezvous}...");
    }
    let check =
        peercam_common::netcheck::run(&creds, &trust, &rendezvous, bind, Duration::from_secs(3));
    let report = runtime.block_on(check).map_err(|e| (1, e.to_string()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| (1, e.to_string()))?
        );
    } else {
        print!("{}", report.human());
    }
    Ok(if report.udp {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}

fn ping(
    camera: CameraId,
    count: u32,
    json: bool,
    common: Common,
) -> Result<ExitCode, (u8, String)> {
    let file = common.file_config()?;
    let config = file
        .resolve(camera.clone())
        .map_err(|e| (1, format!("{e:#}")))?;
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| (1, format!("cannot start the async runtime: {e}")))?;
    let mut relayed = false;
    for n in 1..=count.max(1) {
        match runtime.block_on(peercam_viewer::probe(&config)) {
            Ok(p) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&p).map_err(|e| (1, e.to_string()))?
                    );
                } else {
                    println!(
                        "probe {n}: {} {}  rtt {:.1} ms  (connected in {:.0} ms)",
                        p.path, p.remote, p.rtt_ms, p.connect_ms
                    );
                }
                if p.path != "relay" {
                    verdict(
                        json,
                        "direct",
                        &format!(
                            "camera {camera} is reachable directly ({} {}).",
                            p.path, p.remote
                        ),
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                relayed = true;
            }
            Err(e) => {
                let code = e.exit_code();
                if !json {
                    println!("probe {n}: failed: {e}");
                }
                if code != 4 || n == count.max(1) {
                    if relayed {
                        break;
                    }
                    verdict(json, "unreachable", &e.to_string());
                    return Ok(ExitCode::from(code));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    verdict(
        json,
        "relay",
        &format!("camera {camera} is reachable only through the relay: no direct path through the NATs on this network (a symmetric NAT on one side)."),
    );
    Ok(ExitCode::from(6))
}

fn verdict(json: bool, verdict: &str, sentence: &str) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "verdict": verdict, "reason": sentence })
        );
    } else {
        println!("{sentence}");
    }
}
