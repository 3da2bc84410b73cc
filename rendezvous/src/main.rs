//! `rendezvous`: runs a peercam rendezvous server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use peercam_rendezvous::config::FileConfig;

/// The peercam rendezvous: cameras register here, viewers find them here, and both are
/// introduced for a direct, end-to-end encrypted connection.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (settings below override it).
    #[arg(long, short, env = "PEERCAM_RDV_CONFIG")]
    config: Option<PathBuf>,
    /// UDP address to listen on [default: 0.0.0.0:7400].
    #[arg(long, env = "PEERCAM_RDV_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Deployment CA certificate.
    #[arg(long, env = "PEERCAM_RDV_CA")]
    ca: Option<PathBuf>,
    /// This rendezvous' certificate.
    #[arg(long, env = "PEERCAM_RDV_CERT")]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "PEERCAM_RDV_KEY")]
    key: Option<PathBuf>,
    /// TCP address for /metrics, /livez and /readyz (keep it private).
    #[arg(long, env = "PEERCAM_RDV_ADMIN")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Do not offer a relay.
    #[arg(long)]
    no_relay: bool,
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
            eprintln!("rendezvous: {e:#}");
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
    file.listen = cli.listen.or(file.listen);
    file.ca = cli.ca.or(file.ca);
    file.cert = cli.cert.or(file.cert);
    file.key = cli.key.or(file.key);
    file.admin_listen = cli.admin_listen.or(file.admin_listen);
    if cli.no_relay {
        file.relay = Some(false);
    }
    let config = file.resolve()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let handle = peercam_rendezvous::start(config).await?;
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
