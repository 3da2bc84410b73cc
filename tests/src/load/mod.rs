//! The rendezvous load generator (`loadgen`): N simulated cameras, each with its own
//! identity and QUIC connection, registered with the real `rendezvous` binary running as
//! a child process; viewers issuing connects at a chosen rate; optionally a restart of the
//! rendezvous. Reports registrations per second, the rendezvous' RSS per registered camera,
//! its CPU while registering and while idle (keep-alive cost), brokering latency and every
//! failure. `BENCHMARKS.md` records the figures and the commands.

pub mod fleet;
pub mod process;
pub mod viewers;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use peercam_certs::Role;
use peercam_common::{quic, ViewerId};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::fleet::Fleet;
use self::process::{free_port, metric, RdvProcess, Sample};
use crate::Pki;

/// The viewer identity every simulated camera allows.
const VIEWER: &str = "load-viewer";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The rendezvous binary.
    pub rendezvous: PathBuf,
    /// Simulated cameras.
    pub cameras: usize,
    /// Client UDP endpoints the cameras are spread over.
    pub endpoints: usize,
    /// Registration handshakes in flight at once during the initial registration.
    pub inflight: usize,
    /// Longest wait for all cameras to register.
    pub register_timeout: Duration,
    /// How long to measure the idle (keep-alive only) rendezvous.
    pub idle: Duration,
    /// Viewer connects per second (0: no connect phase).
    pub connect_rate: f64,
    /// Length of the connect phase.
    pub duration: Duration,
    /// Viewer connections issuing the connects.
    pub viewer_conns: usize,
    /// Restart the rendezvous after the rest and measure re-registration.
    pub restart: bool,
    /// Offer relay sessions (the rendezvous' default); off by default so that brokering
    /// is measured without socket allocations capped at 1000 sessions.
    pub relay: bool,
    /// How cameras reconnect after a loss.
    pub reconnect: fleet::Reconnect,
    /// Extra lines for the rendezvous' TOML config (experiments, e.g. `retry_threshold = 0`).
    pub extra_config: Vec<String>,
}

impl Options {
    /// Defaults for `cameras` cameras and the rendezvous binary at `rendezvous`.
    pub fn new(rendezvous: PathBuf, cameras: usize) -> Self {
        Options {
            rendezvous,
            cameras,
            endpoints: 32,
            inflight: 256,
            register_timeout: Duration::from_secs(600),
            idle: Duration::from_secs(20),
            connect_rate: 0.0,
            duration: Duration::from_secs(10),
            viewer_conns: 16,
            restart: false,
            relay: false,
            extra_config: Vec::new(),
            reconnect: fleet::Reconnect::Agent,
        }
    }
}

/// Everything measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Cameras simulated.
    pub cameras: usize,
    /// Seconds to create every camera's key and certificate (not part of any rate).
    pub identities_secs: f64,
    /// Seconds from the first dial to the last camera registered.
    pub register_secs: f64,
    /// Registrations per second over that time.
    pub registrations_per_sec: f64,
    /// Registrations per second in each tenth of the initial registration.
    pub registrations_per_sec_by_tenth: Vec<f64>,
    /// Dial → `Registered` during the initial registration: p50, p99, max (ms).
    pub register_latency_ms: [f64; 3],
    /// Failed registration attempts during the initial registration.
    pub register_failures: u64,
    /// The rendezvous before any camera.
    pub rdv_idle: Sample,
    /// The rendezvous with every camera registered.
    pub rdv_loaded: Sample,
    /// `(rss_loaded - rss_idle) / cameras`, bytes.
    pub rss_per_camera_bytes: f64,
    /// Rendezvous CPU while registering, percent of one core.
    pub cpu_register_pct: f64,
    /// Rendezvous CPU seconds while registering.
    pub cpu_register_secs: f64,
    /// Rendezvous CPU seconds over the idle window.
    pub cpu_idle_secs: f64,
    /// Rendezvous CPU with every camera registered and idle (keep-alives only), percent of
    /// one core, and the length of that window.
    pub cpu_idle_pct: f64,
    /// Seconds the idle window lasted.
    pub idle_secs: f64,
    /// Cameras the rendezvous' `/metrics` reported registered.
    pub metrics_registered: f64,
    /// The connect phase, if any.
    pub brokering: Option<viewers::Brokering>,
    /// Rendezvous CPU during the connect phase, percent of one core.
    pub cpu_connect_pct: f64,
    /// Connects per second asked for.
    pub connect_rate: f64,
    /// The restart, if any.
    pub restart: Option<Restart>,
    /// The load generator's own CPU over the run, seconds (it shares the machine).
    pub loadgen_cpu_secs: f64,
    /// The load generator's peak RSS, KiB.
    pub loadgen_hwm_kib: u64,
    /// UDP datagrams the kernel dropped for full receive buffers during the run
    /// (`RcvbufErrors` in `/proc/net/snmp`, whole machine).
    pub udp_rcvbuf_errors: u64,
    /// A few of the registration errors seen.
    pub errors: Vec<String>,
}

/// What a rendezvous restart measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Restart {
    /// Seconds from SIGTERM until the new process answered `/readyz`.
    pub down_secs: f64,
    /// Seconds from SIGTERM until every camera was registered again.
    pub all_back_secs: f64,
    /// Every camera came back within the registration timeout.
    pub all_back: bool,
    /// Failed registration attempts during the recovery.
    pub failures: u64,
    /// Most registrations per second the new process took (1 s buckets).
    pub peak_per_sec: u64,
    /// Rendezvous CPU during the recovery, percent of one core.
    pub cpu_pct: f64,
    /// Dial → `Registered` of the re-registrations: p50, p99, max (ms).
    pub latency_ms: [f64; 3],
    /// Cameras that received `GoingAway` before the close.
    pub going_away: u64,
    /// The reconnect window it announced, milliseconds.
    pub going_away_ms: u64,
}

/// Runs the load described by `opts` and returns what it measured.
pub async fn run(opts: &Options) -> Result<Report> {
    let mut report = Report {
        cameras: opts.cameras,
        connect_rate: opts.connect_rate,
        ..Default::default()
    };
    let udp_drops_before = udp_rcvbuf_errors();
    let pki = Pki::new();
    let t = Instant::now();
    let ids = fleet::identities(&pki, opts.cameras, &ViewerId::new(VIEWER)?);
    report.identities_secs = t.elapsed().as_secs_f64();

    let rdv_addr = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port(false)?));
    let config = write_config(&pki, opts, rdv_addr, admin)?;
    let log = pki.dir.path().join("rendezvous.log");
    let mut rdv = RdvProcess::start(&opts.rendezvous, &config, &log, admin)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.rdv_idle = rdv.sample()?;

    let endpoints = client_endpoints(opts.endpoints)?;
    let fleet = Arc::new(Fleet::default());
    let gate = Arc::new(Semaphore::new(opts.inflight.max(1)));
    let cancel = CancellationToken::new();
    let mut cameras = JoinSet::new();
    let cpu0 = rdv.sample()?.cpu_secs;
    let t = Instant::now();
    fleet::spawn_all(
        &mut cameras,
        ids,
        &endpoints,
        rdv_addr,
        &fleet,
        &gate,
        opts.reconnect,
        &cancel,
    );
    let (all, tenths) = wait_all(&fleet, opts.cameras, opts.register_timeout).await;
    report.registrations_per_sec_by_tenth = tenths;
    report.register_secs = t.elapsed().as_secs_f64();
    report.cpu_register_secs = rdv.sample()?.cpu_secs - cpu0;
    report.cpu_register_pct = pct(report.cpu_register_secs, report.register_secs);
    report.registrations_per_sec = opts.cameras as f64 / report.register_secs;
    report.register_failures = fleet.failures.load(Ordering::Relaxed);
    report.register_latency_ms = fleet.take_latencies();
    if !all {
        bail!(
            "only {} of {} cameras registered within {:?}; errors: {:?}; log: {}",
            fleet.registered.load(Ordering::Relaxed),
            opts.cameras,
            opts.register_timeout,
            fleet.error_samples(),
            log.display()
        );
    }
    // Real cameras never wait for each other: lift the load generator's own limit so that
    // a restart sees the full herd.
    gate.add_permits(Semaphore::MAX_PERMITS / 2);

    measure_idle(&rdv, opts, &mut report).await?;
    if opts.connect_rate > 0.0 {
        measure_connects(&rdv, &pki, rdv_addr, opts, &mut report).await?;
    }
    if opts.restart {
        report.restart = Some(restart(&mut rdv, &fleet, opts).await?);
    }
    cancel.cancel();
    while cameras.join_next().await.is_some() {}
    for ep in &endpoints {
        ep.close(0u32.into(), b"done");
    }
    let own = Sample::own()?;
    report.loadgen_cpu_secs = own.cpu_secs;
    report.loadgen_hwm_kib = own.hwm_kib;
    report.udp_rcvbuf_errors = udp_rcvbuf_errors().saturating_sub(udp_drops_before);
    report.errors = fleet.error_samples();
    Ok(report)
}

/// `n` client endpoints on loopback, each its own UDP socket and driver task.
fn client_endpoints(n: usize) -> Result<Vec<quinn::Endpoint>> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    Ok((0..n.max(1))
        .map(|_| quic::endpoint_with_buffers(any, None, quic::RENDEZVOUS_SOCKET_BUFFER))
        .collect::<std::io::Result<Vec<_>>>()?)
}

/// Memory and CPU with every camera registered and nothing but keep-alives going on.
async fn measure_idle(rdv: &RdvProcess, opts: &Options, report: &mut Report) -> Result<()> {
    // Let handshake leftovers (retransmit buffers, closed-connection state) drain.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu0 = rdv.sample()?.cpu_secs;
    let t = Instant::now();
    tokio::time::sleep(opts.idle).await;
    report.idle_secs = t.elapsed().as_secs_f64();
    report.rdv_loaded = rdv.sample()?;
    report.cpu_idle_secs = report.rdv_loaded.cpu_secs - cpu0;
    report.cpu_idle_pct = pct(report.cpu_idle_secs, report.idle_secs);
    report.rss_per_camera_bytes =
        (report.rdv_loaded.rss_kib as f64 - report.rdv_idle.rss_kib as f64) * 1024.0
            / opts.cameras.max(1) as f64;
    report.metrics_registered =
        metric(&rdv.metrics()?, "peercam_cameras_registered").unwrap_or(-1.0);
    Ok(())
}

/// Viewers connecting at `opts.connect_rate`, and the rendezvous' CPU meanwhile.
async fn measure_connects(
    rdv: &RdvProcess,
    pki: &Pki,
    rdv_addr: SocketAddr,
    opts: &Options,
    report: &mut Report,
) -> Result<()> {
    let cpu0 = rdv.sample()?.cpu_secs;
    let t = Instant::now();
    let b = viewers::run(
        pki,
        VIEWER,
        rdv_addr,
        opts.viewer_conns,
        opts.cameras,
        opts.connect_rate,
        opts.duration,
    )
    .await?;
    report.cpu_connect_pct = pct(rdv.sample()?.cpu_secs - cpu0, t.elapsed().as_secs_f64());
    report.brokering = Some(b);
    Ok(())
}

async fn restart(rdv: &mut RdvProcess, fleet: &Fleet, opts: &Options) -> Result<Restart> {
    let failures0 = fleet.failures.load(Ordering::Relaxed);
    let going0 = fleet.going_away.load(Ordering::Relaxed);
    let regs0 = fleet.registrations.load(Ordering::Relaxed);
    let t = Instant::now();
    rdv.terminate()?;
    rdv.restart()?;
    let mut out = Restart {
        down_secs: t.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let cpu0 = rdv.sample()?.cpu_secs;
    let t_up = Instant::now();
    // Back = every camera registered anew with the new process.
    let deadline = t + opts.register_timeout;
    let mut last = (Instant::now(), regs0);
    loop {
        let regs = fleet.registrations.load(Ordering::Relaxed);
        if last.0.elapsed() >= Duration::from_secs(1) {
            out.peak_per_sec = out.peak_per_sec.max(regs - last.1);
            last = (Instant::now(), regs);
        }
        if regs - regs0 >= opts.cameras as u64
            && fleet.registered.load(Ordering::Relaxed) == opts.cameras
        {
            out.all_back = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out.all_back_secs = t.elapsed().as_secs_f64();
    out.peak_per_sec = out
        .peak_per_sec
        .max(fleet.registrations.load(Ordering::Relaxed) - last.1);
    out.cpu_pct = pct(rdv.sample()?.cpu_secs - cpu0, t_up.elapsed().as_secs_f64());
    out.failures = fleet.failures.load(Ordering::Relaxed) - failures0;
    out.latency_ms = fleet.take_latencies();
    out.going_away = fleet.going_away.load(Ordering::Relaxed) - going0;
    out.going_away_ms = fleet.going_away_ms.load(Ordering::Relaxed);
    Ok(out)
}

/// Waits until `n` cameras are registered; also returns the registration rate in each
/// tenth of the way (how it changes as registered cameras accumulate).
async fn wait_all(fleet: &Fleet, n: usize, timeout: Duration) -> (bool, Vec<f64>) {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut tenths = Vec::new();
    let mut mark = (start, 0usize);
    loop {
        let now = fleet.registered.load(Ordering::Relaxed);
        let next = n * (tenths.len() + 1) / 10;
        if now >= next && tenths.len() < 10 {
            let secs = mark.0.elapsed().as_secs_f64().max(1e-3);
            tenths.push((now - mark.1) as f64 / secs);
            mark = (Instant::now(), now);
            continue;
        }
        if now >= n {
            return (true, tenths);
        }
        if Instant::now() > deadline {
            return (false, tenths);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pct(cpu_secs: f64, wall_secs: f64) -> f64 {
    if wall_secs > 0.0 {
        100.0 * cpu_secs / wall_secs
    } else {
        0.0
    }
}

fn write_config(
    pki: &Pki,
    opts: &Options,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<PathBuf> {
    let (cert, key) = pki.files(Role::Rendezvous, "rdv");
    // One viewer identity issues every connect: let its rate limit follow the load.
    let rate = (opts.connect_rate * 2.0).max(100.0);
    let mut text = format!(
        "listen = \"{listen}\"\nadmin_listen = \"{admin}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         probe = false\nrelay = {}\nlookup_rate = {rate}\nlookup_burst = {rate}\n",
        pki.ca_path().display(),
        cert.display(),
        key.display(),
        opts.relay,
    );
    for line in &opts.extra_config {
        text.push_str(line);
        text.push('\n');
    }
    let path = pki.dir.path().join("rendezvous.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `RcvbufErrors` of UDP in `/proc/net/snmp` (0 if unreadable).
fn udp_rcvbuf_errors() -> u64 {
    let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

impl Report {
    /// The report as a human reads it.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let mib = |k: u64| k as f64 / 1024.0;
        let _ = writeln!(
            s,
            "cameras                      {} (identities made in {:.1} s)",
            self.cameras, self.identities_secs
        );
        let _ = writeln!(
            s,
            "registration                 {:.0}/s ({:.1} s for all, {} failed attempts, rendezvous CPU {:.1} s = {:.0}% of one core)",
            self.registrations_per_sec, self.register_secs, self.register_failures, self.cpu_register_secs, self.cpu_register_pct
        );
        let tenths: Vec<String> = self
            .registrations_per_sec_by_tenth
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect();
        let _ = writeln!(s, "  by tenths                  {}/s", tenths.join(" "));
        let [p50, p99, max] = self.register_latency_ms;
        let _ = writeln!(
            s,
            "  dial → Registered          p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
        );
        let _ = writeln!(
            s,
            "rendezvous RSS               idle {:.1} MiB, loaded {:.1} MiB (peak {:.1} MiB), /metrics says {} registered",
            mib(self.rdv_idle.rss_kib),
            mib(self.rdv_loaded.rss_kib),
            mib(self.rdv_loaded.hwm_kib),
            self.metrics_registered
        );
        let _ = writeln!(
            s,
            "RSS per registered camera    {:.1} KB ({:.0} bytes)",
            self.rss_per_camera_bytes / 1000.0,
            self.rss_per_camera_bytes
        );
        let _ = writeln!(
            s,
            "keep-alive cost (idle)       rendezvous CPU {:.2} s over {:.0} s = {:.2}% of one core",
            self.cpu_idle_secs, self.idle_secs, self.cpu_idle_pct
        );
        if let Some(b) = &self.brokering {
            let _ = writeln!(
                s,
                "brokering at {:.0}/s           p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} ok, {} failed, {} not sent (viewers busy); rendezvous CPU {:.0}%",
                self.connect_rate, b.p50_ms, b.p99_ms, b.max_ms, b.ok, b.failed, b.saturated, self.cpu_connect_pct
            );
        }
        if let Some(r) = &self.restart {
            let _ = writeln!(
                s,
                "restart                      down {:.2} s; all {} back: {} after {:.1} s; {} failed attempts; peak {}/s; rendezvous CPU {:.0}%",
                r.down_secs, self.cameras, r.all_back, r.all_back_secs, r.failures, r.peak_per_sec, r.cpu_pct
            );
            let _ = writeln!(
                s,
                "  GoingAway                  {} cameras told to reconnect within {} ms",
                r.going_away, r.going_away_ms
            );
            let [p50, p99, max] = r.latency_ms;
            let _ = writeln!(
                s,
                "  dial → Registered          p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
            );
        }
        let _ = writeln!(
            s,
            "load generator               CPU {:.1} s, peak RSS {:.0} MiB; UDP receive-buffer drops {}",
            self.loadgen_cpu_secs,
            mib(self.loadgen_hwm_kib),
            self.udp_rcvbuf_errors
        );
        for e in &self.errors {
            let _ = writeln!(s, "error sample                 {e}");
        }
        s
    }
}
