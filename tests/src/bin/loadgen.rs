//! `loadgen`: loads a real `rendezvous` binary with simulated cameras and viewers and
//! reports what it costs (see `BENCHMARKS.md` for the figures and `peercam_tests::load`).
//!
//! Build both in release for figures:
//! `cargo build --release -p peercam-rendezvous -p peercam-tests --bin rendezvous --bin loadgen`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use peercam_tests::load::{self, Options};

/// Simulates N cameras (own key, own certificate, own QUIC connection each) registered with
/// a rendezvous child process, and viewers connecting at a chosen rate.
#[derive(Parser)]
#[command(about)]
struct Cli {
    /// Simulated cameras.
    #[arg(long, default_value_t = 1000)]
    cameras: usize,
    /// Viewer connects per second after registration (0: none).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Seconds of connects.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds the idle (keep-alive only) rendezvous is measured.
    #[arg(long, default_value_t = 20)]
    idle: u64,
    /// Afterwards, restart the rendezvous (SIGTERM, start again on the same port) and
    /// measure until every camera is registered again.
    #[arg(long)]
    restart: bool,
    /// Client UDP endpoints the cameras are spread over.
    #[arg(long, default_value_t = 32)]
    endpoints: usize,
    /// Registration handshakes in flight at once (initial registration only).
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Viewer connections issuing connects.
    #[arg(long, default_value_t = 16)]
    viewer_conns: usize,
    /// Instead of the window the rendezvous announces (`GoingAway`), cameras whose session
    /// it ended (GoingAway or a SHUTDOWN close) wait uniformly in [0, SECS] before
    /// reconnecting (comparison).
    #[arg(long, value_name = "SECS", conflicts_with = "ignore_going_away")]
    spread_after_shutdown: Option<f64>,
    /// Cameras ignore `GoingAway` and reconnect within 0–0.5 s, as camera-agent did before
    /// it (comparison).
    #[arg(long)]
    ignore_going_away: bool,
    /// Let the rendezvous offer relay sessions with each introduction.
    #[arg(long)]
    relay: bool,
    /// An extra line for the rendezvous' TOML config (repeatable), e.g.
    /// `--rdv-config 'retry_threshold = 0'`.
    #[arg(long = "rdv-config")]
    rdv_config: Vec<String>,
    /// The rendezvous binary [default: next to this one].
    #[arg(long)]
    rendezvous: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    // The load generator's own logs (its QUIC clients), off unless RUST_LOG asks.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let rendezvous = match cli.rendezvous {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no directory above this binary")?
            .join("rendezvous"),
    };
    let mut opts = Options::new(rendezvous, cli.cameras);
    opts.connect_rate = cli.connect_rate;
    opts.duration = Duration::from_secs(cli.duration);
    opts.idle = Duration::from_secs(cli.idle);
    opts.restart = cli.restart;
    opts.endpoints = cli.endpoints;
    opts.inflight = cli.inflight;
    opts.viewer_conns = cli.viewer_conns;
    opts.relay = cli.relay;
    opts.extra_config = cli.rdv_config;
    if cli.ignore_going_away {
        opts.reconnect = load::fleet::Reconnect::IgnoreGoingAway;
    }
    if let Some(secs) = cli.spread_after_shutdown {
        opts.reconnect = load::fleet::Reconnect::SpreadAfterShutdown(Duration::from_secs_f64(secs));
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(load::run(&opts))?;
    print!("{}", report.text());
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
