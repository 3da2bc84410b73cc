//! The rendezvous under test as a child process: start it from a config file, wait until
//! it is ready, read its memory and CPU from `/proc`, stop it (SIGTERM) and start it again.
//!
//! Running the real binary, not the library in-process, keeps the load generator's own
//! memory and CPU out of the figures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// Memory and CPU of a process at one moment.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
    /// User + system CPU time so far, seconds.
    pub cpu_secs: f64,
}

impl Sample {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub fn of(pid: u32) -> Result<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the command name (which may contain spaces) start at "state" (3).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu = ticks(14).unwrap_or(0) + ticks(15).unwrap_or(0);
        Ok(Sample {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
            cpu_secs: cpu as f64 / CLK_TCK,
        })
    }

    /// This process.
    pub fn own() -> Result<Sample> {
        Sample::of(std::process::id())
    }
}

/// A rendezvous child process; killed when dropped.
#[derive(Debug)]
pub struct RdvProcess {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    child: Child,
}

impl RdvProcess {
    /// Starts `bin --config config`, logging to `log` at `warn` (or `$LOADGEN_RDV_LOG`;
    /// at the binary's default `info`, its per-connection spans cost ~1 KB per camera),
    /// and waits until `/readyz` answers.
    pub fn start(bin: &Path, config: &Path, log: &Path, admin: SocketAddr) -> Result<Self> {
        let child = spawn(bin, config, log)?;
        let mut p = RdvProcess {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            admin,
            child,
        };
        p.wait_ready()?;
        Ok(p)
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its memory and CPU now.
    pub fn sample(&self) -> Result<Sample> {
        Sample::of(self.pid())
    }

    /// Stops it the way systemd does (SIGTERM: it closes every connection with the
    /// shutdown code) and waits for it to exit.
    pub fn terminate(&mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("the rendezvous did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Starts the binary again with the same configuration (same ports).
    pub fn restart(&mut self) -> Result<()> {
        self.child = spawn(&self.bin, &self.config, &self.log)?;
        self.wait_ready()
    }

    /// Fetches `/metrics` from the admin listener.
    pub fn metrics(&self) -> Result<String> {
        http_get(self.admin, "/metrics")
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the rendezvous exited ({status}) before it was ready; see {}",
                    self.log.display()
                );
            }
            if http_get(self.admin, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the rendezvous was not ready within 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RdvProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &Path, config: &Path, log: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("LOADGEN_RDV_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// A plain HTTP/1.1 GET (the admin listener closes after each answer).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of an unlabelled or labelled metric line (`name` includes the labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A free port on 127.0.0.1 for UDP (`udp`) or TCP.
pub fn free_port(udp: bool) -> Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let s = Sample::own().expect("sample");
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib, "{s:?}");
    }

    #[test]
    fn parses_metric_lines() {
        let text = "# HELP a b\na 3\nb{x=\"y\"} 4\n";
        assert_eq!(metric(text, "a"), Some(3.0));
        assert_eq!(metric(text, "b{x=\"y\"}"), Some(4.0));
        assert_eq!(metric(text, "c"), None);
    }
}
