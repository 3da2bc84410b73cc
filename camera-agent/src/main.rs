//! `camera-agent`: runs on the camera, registers it, streams to allowed viewers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use peercam_camera_agent::config::FileConfig;

/// peercam camera agent: registers this camera with a rendezvous and streams H.264 directly
/// and end-to-end encrypted to the viewers on its access list.
///
/// Set-up: `camera-agent init --id cam-7` makes the camera's key and CSR here; the CA signs
/// the CSR (`certs sign-csr`); then `camera-agent --config /etc/peercam/camera.toml`.
/// SIGHUP re-reads the access list from the config file.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Create this camera's key (it never leaves the camera), a CSR for the CA and a config
    /// file to fill in.
    Init(InitArgs),
    /// Check what this network allows: UDP, public address, whether the NAT is symmetric,
    /// IPv6, RTT to the rendezvous, and a verdict. Exit status 4 when UDP gets no answer.
    Netcheck(NetcheckArgs),
    /// Show the running agent's identity, certificate expiry, registration, viewers and
    /// warnings (read from its status socket).
    Status {
        /// The agent's status socket.
        #[arg(long, default_value = DEFAULT_STATUS_SOCKET, env = "PEERCAM_STATUS_SOCKET")]
        socket: PathBuf,
        /// The raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where the agent answers `camera-agent status`.
const DEFAULT_STATUS_SOCKET: &str = "/run/peercam/camera-agent.sock";

#[derive(clap::Args)]
struct NetcheckArgs {
    /// TOML config file.
    #[arg(long, short, env = "PEERCAM_CAMERA_CONFIG")]
    config: Option<PathBuf>,
    /// Rendezvous server host:port.
    #[arg(long, env = "PEERCAM_RENDEZVOUS")]
    rendezvous: Option<String>,
    /// Deployment CA certificate.
    #[arg(long, env = "PEERCAM_CA")]
    ca: Option<PathBuf>,
    /// This camera's certificate.
    #[arg(long, env = "PEERCAM_CERT")]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "PEERCAM_KEY")]
    key: Option<PathBuf>,
    /// Local UDP address [default: 0.0.0.0:0].
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct InitArgs {
    /// The camera's ID (as the viewers will ask for it).
    #[arg(long)]
    id: String,
    /// Directory for camera.key, camera.csr and camera.toml.
    #[arg(long, default_value = "/etc/peercam")]
    dir: PathBuf,
    /// Rendezvous host:port to put in the config.
    #[arg(long, default_value = "rdv.example.com:7400")]
    rendezvous: String,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct RunArgs {
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
    /// Video source: an Annex B .h264 file, `file:PATH`, `stdin`, or `exec:COMMAND` (run
    /// with sh, Annex B on its stdout, restarted when it exits).
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
    /// Unix socket on which the agent answers `camera-agent status`.
    #[arg(long, default_value = DEFAULT_STATUS_SOCKET, env = "PEERCAM_STATUS_SOCKET")]
    status_socket: PathBuf,
    /// Do not send punch packets (diagnosis and benchmarks: shows what punching buys).
    #[arg(long)]
    no_punch: bool,
    /// Log as JSON lines.
    #[arg(long, env = "PEERCAM_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Init(args)) => init(args),
        Some(Command::Status { socket, json }) => status(&socket, json),
        Some(Command::Netcheck(args)) => match netcheck(args) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(4),
            Err(e) => Err(e),
        },
        None => {
            init_tracing(cli.run.log_json);
            run(cli.run)
        }
    };
    match result {
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

fn netcheck(args: NetcheckArgs) -> Result<bool> {
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    if let Some(r) = args.rendezvous {
        file.rendezvous = vec![r];
    }
    file.ca = args.ca.or(file.ca);
    file.cert = args.cert.or(file.cert);
    file.key = args.key.or(file.key);
    let bind = args
        .bind
        .or(file.bind)
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let (creds, trust, rendezvous) = file.identity()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let first = rendezvous.first().context("no rendezvous configured")?;
    if !args.json {
        eprintln!("checking the network through the rendezvous at {first}...");
    }
    let check = peercam_common::netcheck::run(
        &creds,
        &trust,
        first,
        bind,
        std::time::Duration::from_secs(3),
    );
    let report = runtime.block_on(check)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(report.udp)
}

/// Answers status requests on a Unix socket: one JSON report per connection. Runs until
/// the returned handle is dropped; a socket that cannot be made is logged, not fatal.
fn serve_status(
    reporter: peercam_camera_agent::Reporter,
    path: &std::path::Path,
) -> Option<tokio_util::task::AbortOnDropHandle<()>> {
    use tokio::io::AsyncWriteExt;
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(path);
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "no status socket: `camera-agent status` will not work");
            return None;
        }
    };
    tracing::info!(socket = %path.display(), "status socket ready");
    Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let report = reporter.report();
                if let Ok(mut text) = serde_json::to_string(&report) {
                    text.push('\n');
                    let _ = stream.write_all(text.as_bytes()).await;
                }
            }
        },
    )))
}

fn status(socket: &std::path::Path, json: bool) -> Result<()> {
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent's status socket {}: is camera-agent running (and started with this --status-socket)?",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    if json {
        print!("{text}");
    } else {
        let report: peercam_camera_agent::status::Report =
            serde_json::from_str(&text).context("the agent sent an unreadable status")?;
        print!("{}", report.human());
    }
    Ok(())
}

fn init(args: InitArgs) -> Result<()> {
    use peercam_certs::{files, make_csr, Identity, Role};
    let identity = Identity::new(Role::Camera, &args.id)?;
    let made = make_csr(&identity)?;
    let (key, csr, toml) = (
        args.dir.join("camera.key"),
        args.dir.join("camera.csr"),
        args.dir.join("camera.toml"),
    );
    files::write_private(&key, &made.key_pem, args.force)?;
    files::write_public(&csr, &made.cert_pem, args.force)?;
    let config = format!(
        "# camera-agent configuration for {id}\n\
         rendezvous = [\"{rdv}\"]\n\
         ca = \"{dir}/ca.pem\"           # the deployment CA certificate\n\
         cert = \"{dir}/camera.pem\"     # what `certs sign-csr` returns for camera.csr\n\
         key = \"{dir}/camera.key\"      # made here, never leaves this camera\n\
         access = []                      # viewer IDs allowed to watch, e.g. [\"alice\"]; reload with SIGHUP\n\
         source = \"stdin\"               # or the path of an Annex B .h264 file\n",
        id = args.id,
        rdv = args.rendezvous,
        dir = args.dir.display(),
    );
    files::write_public(&toml, &config, args.force)?;
    println!("camera {} initialised in {}:", args.id, args.dir.display());
    println!(
        "  {}  private key (mode 0600): stays on this camera",
        key.display()
    );
    println!("  {}  send this to your CA", csr.display());
    println!("  {}  edit the rendezvous and access list", toml.display());
    println!("next:");
    println!("  1. on the CA machine: certs sign-csr --csr camera.csr --out camera.pem");
    println!(
        "  2. copy camera.pem and ca.pem into {}",
        args.dir.display()
    );
    println!("  3. camera-agent --config {}", toml.display());
    Ok(())
}

fn run(cli: RunArgs) -> Result<()> {
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
        let status_server = serve_status(handle.reporter(), &cli.status_socket);
        serve_signals(&handle, cli.config.as_deref()).await?;
        drop(status_server);
        let _ = std::fs::remove_file(&cli.status_socket);
        handle.shutdown();
        handle.join().await;
        Ok(())
    })
}

/// Runs until SIGTERM or Ctrl-C; on SIGHUP re-reads the access list from the config file.
async fn serve_signals(
    handle: &peercam_camera_agent::Handle,
    config: Option<&std::path::Path>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = hup.recv() => reload_access(handle, config),
        }
    }
}

fn reload_access(handle: &peercam_camera_agent::Handle, config: Option<&std::path::Path>) {
    let Some(path) = config else {
        tracing::warn!("SIGHUP: no --config file to reload the access list from");
        return;
    };
    let access = FileConfig::load(path).and_then(|f| f.access_list());
    match access {
        Ok(list) => {
            tracing::info!(viewers = list.len(), "SIGHUP: access list reloaded");
            handle.set_access(list);
        }
        Err(e) => tracing::error!(error = %e, "SIGHUP: access list not changed"),
    }
}
