//! `camera-agent`: runs on the camera, registers it, streams to allowed viewers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use peercam_camera_agent::config::FileConfig;

/// peercam camera agent: registers this camera with a rendezvous and streams H.264 directly
/// and end-to-end encrypted to the viewers on its access list.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (settings below override it).
    #[arg(long, short, env = "PEERCAM_CAMERA_CONFIG")]
    config: Option<PathBuf>,
    /// Rendezvous server host:port (repeatable; tried in order).
    #[arg(long, env = "PEERCAM_RENDEZVOUS", value_delimiter = ',')]
    rendezvous: Vec<String>,
    /// Deployment CA certificate.
    #[arg(long, env = "PEERCAM_CA")]
    ca: Option<PathBuf>,
    /// This camera's certificate.
    #[arg(long, env = "PEERCAM_CERT")]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "PEERCAM_KEY")]
    key: Option<PathBuf>,
    /// Viewer allowed to watch (repeatable).
    #[arg(long = "allow", env = "PEERCAM_ALLOW", value_delimiter = ',')]
    allow: Vec<String>,
    /// Video source: an Annex B .h264 file, `file:PATH`, or `stdin`.
    #[arg(long, env = "PEERCAM_SOURCE")]
    source: Option<String>,
    /// Play a file source once instead of looping it.
    #[arg(long)]
    once: bool,
    /// Frame rate of a file source (default: from the stream, else 25).
    #[arg(long)]
    fps: Option<f64>,
    /// Local UDP address [default: 0.0.0.0:0].
    #[arg(long, env = "PEERCAM_BIND")]
    bind: Option<std::net::SocketAddr>,
    /// Most viewers at once [default: 8].
    #[arg(long)]
    max_viewers: Option<usize>,
    /// Do not send punch packets (diagnosis and benchmarks: shows what punching buys).
    #[arg(long)]
    no_punch: bool,
    /// Log as JSON lines.
    #[arg(long, env = "PEERCAM_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("camera-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    if !cli.rendezvous.is_empty() {
        file.rendezvous = cli.rendezvous;
    }
    if !cli.allow.is_empty() {
        file.access = cli.allow;
    }
    file.ca = cli.ca.or(file.ca);
    file.cert = cli.cert.or(file.cert);
    file.key = cli.key.or(file.key);
    file.source = cli.source.or(file.source);
    file.bind = cli.bind.or(file.bind);
    file.fps = cli.fps.or(file.fps);
    file.max_viewers = cli.max_viewers.or(file.max_viewers);
    if cli.once {
        file.looped = Some(false);
    }
    let mut config = file.resolve()?;
    config.punch = !cli.no_punch;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let handle = peercam_camera_agent::start(config).await?;
        wait_for_signal().await;
        handle.shutdown();
        handle.join().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
