//! A NAT lab: a small internet built from Linux network namespaces, veth pairs, bridges and the
//! kernel's own NAT (nftables), so that real peercam binaries can be run behind real NATs with
//! `ip netns exec` (see `/work/shared/LAB.md`). Needs root; tests call [`require_root`] first and
//! say loudly when they skip.
//!
//! Topology (every address is in 198.18.0.0/15, nothing is routed out of the lab):
//!
//! ```text
//!  internet ns  <prefix>-i : bridge <prefix>br 198.18.0.1/24 (the rendezvous address)
//!    camera side first hop (router WAN, carrier WAN or public host) 198.18.0.11
//!    viewer side first hop                                          198.18.0.12
//!  camera home LAN 198.19.1.0/24 (router .1, host .2)   router ns <prefix>-rc, host ns <prefix>-hc
//!  viewer home LAN 198.19.2.0/24 (router .1, host .2)   router ns <prefix>-rv, host ns <prefix>-hv
//!  double NAT: carrier ns <prefix>-kc / -kv, carrier LAN 198.19.200.0/24 (camera) and
//!    198.19.201.0/24 (viewer): carrier .1, home router WAN .2
//!  same LAN: one router ns <prefix>-r with a LAN bridge 198.19.1.1/24, camera host 198.19.1.2,
//!    viewer host 198.19.1.3 (double NAT: carrier <prefix>-k on 198.19.200.0/24)
//! ```
//!
//! IPv6 uses only the benchmarking prefix 2001:2::/48 (RFC 5180) and is routed nowhere else:
//!
//! ```text
//!  internet 2001:2::/64: bridge 2001:2::1 (the v6 rendezvous address, in every lab; the
//!    internet ns forwards v6 between its routes), camera side first hop 2001:2::11, viewer 2001:2::12
//!  public hosts: dual-stack, 2001:2::11 (camera) / 2001:2::12 (viewer)
//!  Ipv6Firewall: router WAN 2001:2::1N (N = 1 camera, 2 viewer), home LAN 2001:2:0:N::/64
//!    (router ::1, host ::2; same LAN: camera ::2, viewer ::3 on 2001:2:0:1::/64), routed from
//!    the internet ns via the router's WAN address
//! ```
//!
//! Every router has an nft table `ip lab`: masquerade on its WAN (fully-random for symmetric), a
//! forward filter that lets LAN→WAN out and only conntrack-established traffic back in, an input
//! filter that ignores anything new from the WAN, a full-cone `dnat` of UDP port
//! [`FULL_CONE_PORT`] to the inside host, and a loss chain on the forward hook. Loss towards and
//! from public hosts is applied on their port of the internet bridge (`table bridge lab`).
//! An [`Nat::Ipv6Firewall`] router also has an nft table `ip6 lab`: no translation, a forward
//! filter that lets LAN→WAN out and only conntrack-established traffic back in, the same input
//! filter (plus neighbour discovery), and a loss chain on the forward hook. Every namespace has
//! duplicate address detection, router advertisements and redirects off, so v6 addresses work at
//! once and routes stay as built.

use std::ffi::OsStr;
use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

/// The inside UDP port of a full-cone host: the router forwards any inbound UDP on this public port
/// to it, so the peer program must bind exactly this port (see [`Lab::fixed_port`]).
pub const FULL_CONE_PORT: u16 = 40000;

/// Every lab namespace and interface name starts with this, then the creator PID and a counter.
const FAMILY: &str = "pc";

/// Time limit for one set-up or tear-down command (they normally take milliseconds).
const CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// The kind of network a host sits behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Directly on the internet segment, no NAT.
    Public,
    /// Masquerade plus a dnat of UDP [`FULL_CONE_PORT`] to the host (endpoint-independent
    /// mapping and filtering).
    FullCone,
    /// Masquerade (endpoint-independent mapping, Linux keeps the source port) with
    /// address-and-port-dependent filtering: the common home router.
    PortRestricted,
    /// Masquerade fully-random: a new random public port per destination.
    Symmetric,
    /// A port-restricted home router behind a port-restricted carrier router.
    DoubleNat,
    /// Dual-stack home router: the host has a global IPv6 address (2001:2:0:N::2/64) that the
    /// router routes without translation through a stateful firewall (LAN→WAN new and
    /// established/related pass, WAN→LAN new is dropped: address-and-port-dependent filtering,
    /// the usual home router for v6); its IPv4 is NATed like [`Nat::PortRestricted`].
    Ipv6Firewall,
}

/// One of the two peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The camera host.
    Camera,
    /// The viewer host.
    Viewer,
}

/// What to build.
#[derive(Debug, Clone, PartialEq)]
pub struct LabSpec {
    /// The network of the camera host.
    pub camera: Nat,
    /// The network of the viewer host (ignored when `same_lan`).
    pub viewer: Nat,
    /// Both hosts on one LAN behind one router of kind `camera`.
    pub same_lan: bool,
    /// Random UDP drop (percent, 0..=100) in every router's forward path and on the internet
    /// bridge port of every public host (both directions), and between hosts on a shared LAN.
    pub loss_percent: u8,
}

impl LabSpec {
    /// A lab with the camera behind `camera` and the viewer behind `viewer`, no loss.
    pub fn new(camera: Nat, viewer: Nat) -> Self {
        Self {
            camera,
            viewer,
            same_lan: false,
            loss_percent: 0,
        }
    }
}

/// Why building the lab (or running one of its commands) failed.
#[derive(Debug)]
pub enum LabError {
    /// Not root, or `ip` / `nft` missing.
    Unavailable(String),
    /// A command could not be started.
    Spawn {
        /// The command line.
        command: String,
        /// The error from the OS.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// A command did not finish in time and was killed.
    Timeout {
        /// The command line.
        command: String,
        /// The time limit.
        after: Duration,
        /// Its standard error so far.
        stderr: String,
    },
    /// The specification cannot be built (e.g. names would be too long).
    Spec(String),
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::Unavailable(why) => write!(f, "the NAT lab is unavailable: {why}"),
            LabError::Spawn { command, source } => {
                write!(f, "could not start `{command}`: {source}")
            }
            LabError::Failed {
                command,
                status,
                stderr,
            } => {
                write!(f, "`{command}` failed ({status}): {}", stderr.trim())
            }
            LabError::Timeout {
                command,
                after,
                stderr,
            } => {
                write!(
                    f,
                    "`{command}` did not finish within {after:?} and was killed; stderr: {}",
                    stderr.trim()
                )
            }
            LabError::Spec(why) => write!(f, "bad lab specification: {why}"),
        }
    }
}

impl std::error::Error for LabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LabError::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded processes
// ---------------------------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(char::is_whitespace) || a.is_empty() {
            s.push('\'');
            s.push_str(&a.chars().take(60).collect::<String>());
            if a.chars().count() > 60 {
                s.push('…');
            }
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion with `stdin` as its input, killing it after `timeout`. Returns its
/// output whatever the exit status (see [`run_checked`] for a failing status as an error).
pub fn run_bounded(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let command = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    let feeder = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => {
            let bytes = bytes.to_vec();
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            }))
        }
        _ => None,
    };
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let status: Option<ExitStatus> = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => {
                let _ = child.kill();
                break child.wait().ok();
            }
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    // The readers end when the pipes close; a grandchild holding them open must not hang us.
    let collect = |h: Option<std::thread::JoinHandle<Vec<u8>>>| -> Vec<u8> {
        let Some(h) = h else { return Vec::new() };
        let until = Instant::now() + Duration::from_secs(1);
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    let stdout = collect(out);
    let stderr = collect(err);
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(LabError::Timeout {
            command,
            after: timeout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Like [`run_bounded`], but a non-zero exit status is an error carrying stderr.
pub fn run_checked(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, LabError> {
    let command = describe(cmd);
    let out = run_bounded(cmd, stdin, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// A long-running child (a peer, a reflector) that is killed and reaped when dropped, and that
/// kills itself after a deadline if nobody drops it first ([`KillOnDrop::wait_timeout`]).
#[derive(Debug)]
pub struct KillOnDrop {
    child: Child,
}

impl KillOnDrop {
    /// Spawns `cmd` (configure its stdio first).
    pub fn spawn(cmd: &mut Command) -> Result<Self, LabError> {
        let command = describe(cmd);
        let child = cmd
            .spawn()
            .map_err(|source| LabError::Spawn { command, source })?;
        Ok(Self { child })
    }

    /// The child, e.g. to take its stdout.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits at most `timeout` for the child to exit; kills it if it has not.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Tools and privileges
// ---------------------------------------------------------------------------------------------

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

pub(crate) fn ip_path() -> &'static Path {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| find_tool("ip").unwrap_or_else(|| PathBuf::from("ip")))
}

fn nft_path() -> &'static Path {
    static NFT: OnceLock<PathBuf> = OnceLock::new();
    NFT.get_or_init(|| find_tool("nft").unwrap_or_else(|| PathBuf::from("nft")))
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `Ok` if this process can build the lab: it runs as root and `ip` (iproute2) and `nft`
/// (nftables) are installed. Otherwise a sentence saying what is missing.
pub fn require_root() -> Result<(), String> {
    match effective_uid() {
        Some(0) => {}
        Some(uid) => {
            return Err(format!(
                "the NAT lab needs root (network namespaces, veth, nftables) but this process runs as uid {uid}"
            ))
        }
        None => return Err("the NAT lab needs root but the effective uid could not be read from /proc/self/status".into()),
    }
    let mut missing = Vec::new();
    if find_tool("ip").is_none() {
        missing.push("`ip` (Debian package iproute2)");
    }
    if find_tool("nft").is_none() {
        missing.push("`nft` (Debian package nftables)");
    }
    if !Path::new("/proc/sys/net/ipv6").is_dir() {
        missing.push("IPv6 in the kernel (it is disabled: /proc/sys/net/ipv6 is absent)");
    }
    if !missing.is_empty() {
        return Err(format!(
            "the NAT lab needs {} but it is not installed",
            missing.join(" and ")
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// `pc<pid base36>_<counter base36>`: unique per process and per lab within the process.
pub(crate) fn fresh_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{FAMILY}{}_{}",
        base36(u64::from(std::process::id())),
        base36(u64::from(n))
    )
}

/// Namespaces made by this process that still exist (none, once every [`Lab`] is
/// dropped).
pub fn leftovers() -> Vec<String> {
    let me = std::process::id();
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| creator_pid(n) == Some(me))
        .map(String::from)
        .collect()
}

/// The creator PID encoded in a lab name (`pc<pid36>_<n36>[-...|...]`), if it is one.
fn creator_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(FAMILY)?;
    let (pid, rest) = rest.split_once('_')?;
    let counter: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
    };
    if !valid(pid) || !valid(&counter) || !rest[counter.len()..].starts_with('-') {
        return None;
    }
    u32::try_from(u64::from_str_radix(pid, 36).ok()?).ok()
}

fn list_namespaces() -> Vec<String> {
    let mut cmd = Command::new(ip_path());
    cmd.args(["netns", "list"]);
    match run_bounded(&mut cmd, None, CMD_TIMEOUT) {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Deletes lab namespaces (name family `pc<pid36>_<n36>-…`) left behind by crashed earlier runs,
/// i.e. whose creating process no longer exists. Never touches labs of live processes.
pub fn sweep_stale() {
    sweep(false);
}

/// [`sweep_stale`]; with `own`, also labs carrying this process's PID, which before this process
/// made its first lab can only come from a dead earlier process that had the same PID.
fn sweep(own: bool) {
    let me = std::process::id();
    for ns in list_namespaces() {
        let Some(pid) = creator_pid(&ns) else {
            continue;
        };
        let stale = (own && pid == me) || !creator_alive(pid, &ns);
        if !stale {
            continue;
        }
        kill_ns_processes(&ns);
        let mut cmd = Command::new(ip_path());
        cmd.args(["netns", "del", &ns]);
        let _ = run_bounded(&mut cmd, None, CMD_TIMEOUT);
    }
}

/// Whether process `pid` may be the creator of namespace `ns`: it exists, is not a zombie, and
/// started before the namespace was made (PIDs are reused quickly when `pid_max` is 32768 and
/// the lab spawns thousands of `ip` commands). When in doubt: alive.
fn creator_alive(pid: u32, ns: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the parenthesised command: state is field 3.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, a)| a.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X")) {
        return false;
    }
    let created = std::fs::metadata(format!("/run/netns/{ns}"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    match (process_start_secs(pid), created) {
        // Allow 2 s for the rounding of btime and ticks.
        (Some(started), Some(created)) => started <= created + 2,
        _ => true,
    }
}

/// When process `pid` started, in seconds since the Unix epoch (from /proc; USER_HZ is 100 on
/// every Linux architecture).
fn process_start_secs(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    // starttime is field 22; `after` starts at field 3.
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + ticks / 100)
}

pub(crate) fn kill_ns_processes(ns: &str) {
    let mut cmd = Command::new(ip_path());
    cmd.args(["netns", "pids", ns]);
    let Ok(out) = run_bounded(&mut cmd, None, CMD_TIMEOUT) else {
        return;
    };
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|p| p.parse::<u32>().is_ok_and(|p| p != std::process::id()))
        .map(str::to_owned)
        .collect();
    if pids.is_empty() {
        return;
    }
    if let Some(kill) = find_tool("kill") {
        let mut cmd = Command::new(kill);
        cmd.arg("-KILL").args(&pids);
        let _ = run_bounded(&mut cmd, None, CMD_TIMEOUT);
    }
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

/// How one router translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouterKind {
    PortRestricted,
    Symmetric,
    /// Port-restricted masquerade plus a dnat of UDP [`FULL_CONE_PORT`] to this inside host.
    FullCone(Ipv4Addr),
}

#[derive(Debug, Clone)]
struct HostInfo {
    ns: String,
    ip: Ipv4Addr,
    public: Ipv4Addr,
    fixed_port: Option<u16>,
    ip6: Option<Ipv6Addr>,
}

/// A running lab. Dropping it kills every process left in its namespaces and deletes them (and
/// with them every veth and bridge), even while unwinding from a panic.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    internet: String,
    camera: Option<HostInfo>,
    viewer: Option<HostInfo>,
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The internet namespace's bridge on 2001:2::/64.
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);

/// The first hop of side `net` (1 camera, 2 viewer) on the v6 internet: 2001:2::1`net`.
fn wan6(net: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10 + u16::from(net))
}

/// Address `host` on home network `net`: 2001:2:0:`net`::`host`.
fn home6(net: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, u16::from(net), 0, 0, 0, host)
}

impl Lab {
    /// The rendezvous address: the internet namespace's bridge.
    pub const RENDEZVOUS_IP: Ipv4Addr = GATEWAY;

    /// The IPv6 rendezvous address, on the same bridge as [`Lab::RENDEZVOUS_IP`] (every lab has
    /// it, so any lab can host a dual-stack rendezvous).
    pub const RENDEZVOUS_IP6: Ipv6Addr = GATEWAY6;

    /// Builds the lab described by `spec`. On error everything made so far is deleted.
    pub fn build(spec: &LabSpec) -> Result<Lab, LabError> {
        require_root().map_err(LabError::Unavailable)?;
        if spec.loss_percent > 100 {
            return Err(LabError::Spec(format!(
                "loss_percent {} is over 100",
                spec.loss_percent
            )));
        }
        // Once per process, before its first lab: other threads' builds wait for it.
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| sweep(true));

        let prefix = fresh_prefix();
        if prefix.len() + 3 > 15 {
            return Err(LabError::Spec(format!(
                "lab prefix {prefix} leaves no room for interface names"
            )));
        }
        let internet = format!("{prefix}-i");
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            internet: internet.clone(),
            camera: None,
            viewer: None,
        };
        lab.add_ns(&internet)?;
        let br = lab.ifname("br");
        lab.ip(&internet, &["link", "add", &br, "type", "bridge"])?;
        lab.no_bridge_netfilter(&internet);
        lab.ip(&internet, &["addr", "add", "198.18.0.1/24", "dev", &br])?;
        lab.ip6_addr(&internet, GATEWAY6, &br)?;
        lab.ip(&internet, &["link", "set", &br, "up"])?;
        // The internet routes v6 to the home networks behind Ipv6Firewall routers.
        lab.sysctl(&internet, "net.ipv6.conf.all.forwarding", "1")?;

        let loss = spec.loss_percent;
        let mut public_ports = Vec::new();
        if spec.same_lan {
            let (cam, view) = lab.build_shared(spec.camera, loss, &mut public_ports)?;
            lab.camera = Some(cam);
            lab.viewer = Some(view);
        } else {
            let cam = lab.build_side(
                'c',
                spec.camera,
                Ipv4Addr::new(198, 18, 0, 11),
                1,
                200,
                loss,
                &mut public_ports,
            )?;
            lab.camera = Some(cam);
            let view = lab.build_side(
                'v',
                spec.viewer,
                Ipv4Addr::new(198, 18, 0, 12),
                2,
                201,
                loss,
                &mut public_ports,
            )?;
            lab.viewer = Some(view);
        }
        if loss > 0 && !public_ports.is_empty() {
            let mut rules = String::new();
            for p in &public_ports {
                rules.push_str(&format!(
                    "  chain from_{p} {{ type filter hook prerouting priority 0; policy accept; \
                     iifname \"{p}\" ip protocol udp numgen random mod 100 < {loss} drop; \
                     iifname \"{p}\" ip6 nexthdr udp numgen random mod 100 < {loss} drop; }}\n  \
                     chain to_{p} {{ type filter hook postrouting priority 0; policy accept; \
                     oifname \"{p}\" ip protocol udp numgen random mod 100 < {loss} drop; \
                     oifname \"{p}\" ip6 nexthdr udp numgen random mod 100 < {loss} drop; }}\n"
                ));
            }
            lab.nft(&internet, &format!("table bridge lab {{\n{rules}}}\n"))?;
        }
        Ok(lab)
    }

    /// The namespace of the internet, where the rendezvous runs (it has [`Lab::RENDEZVOUS_IP`]).
    pub fn internet_ns(&self) -> &str {
        &self.internet
    }

    fn host(&self, side: Side) -> &HostInfo {
        let h = match side {
            Side::Camera => self.camera.as_ref(),
            Side::Viewer => self.viewer.as_ref(),
        };
        h.expect("a built lab has both hosts")
    }

    /// The namespace of the camera or viewer host.
    pub fn host_ns(&self, side: Side) -> &str {
        &self.host(side).ns
    }

    /// The host's own (inside) address.
    pub fn host_ip(&self, side: Side) -> Ipv4Addr {
        self.host(side).ip
    }

    /// The address the internet sees for this host: its outermost router's WAN address, or the
    /// host's own address when it is public.
    pub fn public_ip(&self, side: Side) -> Ipv4Addr {
        self.host(side).public
    }

    /// The host's global IPv6 address (in 2001:2::/48), which is also what the internet sees
    /// (v6 is never translated): `Some` for [`Nat::Public`] and [`Nat::Ipv6Firewall`] hosts,
    /// `None` for hosts behind IPv4-only NATs.
    pub fn host_ip6(&self, side: Side) -> Option<Ipv6Addr> {
        self.host(side).ip6
    }

    /// The UDP port the peer on this side must bind: `Some(FULL_CONE_PORT)` behind a full-cone
    /// NAT (on a shared full-cone LAN only the camera gets it), else `None` (any port).
    pub fn fixed_port(&self, side: Side) -> Option<u16> {
        self.host(side).fixed_port
    }

    /// `ip netns exec <ns> <program>`; add arguments, stdio and a time limit
    /// ([`run_bounded`] / [`KillOnDrop`]).
    pub fn command(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(ip_path());
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// Every namespace this lab made.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The per-run name prefix of this lab's namespaces and interfaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // --- building blocks ---

    fn ifname(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), LabError> {
        let mut cmd = Command::new(ip_path());
        cmd.args(["netns", "add", ns]);
        run_checked(&mut cmd, None, CMD_TIMEOUT)?;
        self.namespaces.push(ns.to_owned());
        self.ip(ns, &["link", "set", "lo", "up"])?;
        // Before any interface exists, so that every one inherits `default`: v6 addresses are
        // usable at once (no DAD), and nothing but the lab's own routes steers v6 (no RA, no
        // redirects).
        let mut script = String::new();
        for conf in ["all", "default"] {
            for key in ["accept_dad", "accept_ra", "accept_redirects"] {
                script.push_str(&format!("echo 0 > /proc/sys/net/ipv6/conf/{conf}/{key}\n"));
            }
        }
        let mut cmd = self.command(ns, "/bin/sh");
        cmd.args(["-e", "-c", &script]);
        run_checked(&mut cmd, None, CMD_TIMEOUT).map(drop)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<(), LabError> {
        let mut cmd = Command::new(ip_path());
        cmd.args(["-n", ns]).args(args);
        run_checked(&mut cmd, None, CMD_TIMEOUT).map(drop)
    }

    fn nft(&self, ns: &str, script: &str) -> Result<(), LabError> {
        let mut cmd = self.command(ns, nft_path());
        cmd.args(["-f", "-"]);
        run_checked(&mut cmd, Some(script.as_bytes()), CMD_TIMEOUT).map(drop)
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<(), LabError> {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        let mut cmd = self.command(ns, "/bin/sh");
        cmd.args(["-c", &format!("echo {value} > {file}")]);
        run_checked(&mut cmd, None, CMD_TIMEOUT).map(drop)
    }

    /// Bridged frames stay pure layer 2 (no iptables/conntrack on them), whatever this kernel's
    /// br_netfilter default is. Absent sysctl = no br_netfilter = already so.
    fn no_bridge_netfilter(&self, ns: &str) {
        let _ = self.sysctl(ns, "net.bridge.bridge-nf-call-iptables", "0");
        let _ = self.sysctl(ns, "net.bridge.bridge-nf-call-ip6tables", "0");
    }

    /// Adds `addr`/64 to `dev` in `ns`, usable at once (no duplicate address detection).
    fn ip6_addr(&self, ns: &str, addr: Ipv6Addr, dev: &str) -> Result<(), LabError> {
        self.ip(
            ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ],
        )
    }

    /// A v6 route in `ns` to `dest` (`default` or a prefix) via `gw`.
    fn ip6_route(&self, ns: &str, dest: &str, gw: Ipv6Addr) -> Result<(), LabError> {
        self.ip(ns, &["-6", "route", "add", dest, "via", &gw.to_string()])
    }

    /// The IPv6 half of an [`Nat::Ipv6Firewall`] router in `ns`: WAN address [`wan6`]`(net)` on
    /// `wan`, LAN 2001:2:0:`net`::1/64 on `lan`, routes both ways (the internet namespace routes
    /// the LAN prefix to the WAN address), and `table ip6 lab`: forwarding without translation,
    /// LAN→WAN new and established/related in, loss on the forward hook.
    fn firewall6(&self, ns: &str, wan: &str, lan: &str, net: u8, loss: u8) -> Result<(), LabError> {
        let wan_ip = wan6(net);
        self.sysctl(ns, "net.ipv6.conf.all.forwarding", "1")?;
        self.ip6_addr(ns, wan_ip, wan)?;
        self.ip6_addr(ns, home6(net, 1), lan)?;
        self.ip6_route(ns, "default", GATEWAY6)?;
        self.ip6_route(&self.internet, &format!("{}/64", home6(net, 0)), wan_ip)?;
        let loss_rule = if loss > 0 {
            format!("meta l4proto udp numgen random mod 100 < {loss} drop")
        } else {
            String::new()
        };
        let script = format!(
            "table ip6 lab {{
  chain forward_loss {{ type filter hook forward priority -10; policy accept;
    {loss_rule}
  }}
  chain forward {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname != \"{wan}\" oifname \"{wan}\" accept
  }}
  chain input {{ type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    iifname != \"{wan}\" accept
  }}
}}
"
        );
        self.nft(ns, &script)
    }

    /// A v6 host `addr`/64 on `dev` in `ns` with its default route via `gw`.
    fn host_net6(&self, ns: &str, dev: &str, addr: Ipv6Addr, gw: Ipv6Addr) -> Result<(), LabError> {
        self.ip6_addr(ns, addr, dev)?;
        self.ip6_route(ns, "default", gw)
    }

    /// A veth pair `a` in `ns_a`, `b` in `ns_b`, created directly inside the namespaces (nothing
    /// ever appears in the root namespace), both up.
    fn veth(&self, ns_a: &str, a: &str, ns_b: &str, b: &str) -> Result<(), LabError> {
        self.ip(
            ns_a,
            &[
                "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b,
            ],
        )?;
        self.ip(ns_a, &["link", "set", a, "up"])?;
        self.ip(ns_b, &["link", "set", b, "up"])
    }

    /// Plugs a new veth into the internet bridge: returns nothing, `inside` lives in `ns`.
    fn to_internet(&self, ns: &str, inside: &str, port: &str, cidr: &str) -> Result<(), LabError> {
        self.veth(ns, inside, &self.internet, port)?;
        self.ip(
            &self.internet,
            &["link", "set", port, "master", &self.ifname("br")],
        )?;
        self.ip(ns, &["addr", "add", cidr, "dev", inside])
    }

    /// A host namespace `ns` with interface `dev` at `ip`/24, default route via `gw`.
    fn host_net(&self, ns: &str, dev: &str, ip: Ipv4Addr, gw: Ipv4Addr) -> Result<(), LabError> {
        self.ip(ns, &["addr", "add", &format!("{ip}/24"), "dev", dev])?;
        self.ip(ns, &["route", "add", "default", "via", &gw.to_string()])
    }

    /// Router rules in `ns`: NAT out of `wan`, only established traffic in, loss on forward.
    fn router(&self, ns: &str, wan: &str, kind: RouterKind, loss: u8) -> Result<(), LabError> {
        self.sysctl(ns, "net.ipv4.ip_forward", "1")?;
        let random = if kind == RouterKind::Symmetric {
            " fully-random"
        } else {
            ""
        };
        let (dnat, dnat_ok) = match kind {
            RouterKind::FullCone(inside) => (
                format!("iifname \"{wan}\" udp dport {FULL_CONE_PORT} dnat to {inside}:{FULL_CONE_PORT}"),
                "ct status dnat accept",
            ),
            _ => (String::new(), ""),
        };
        let loss_rule = if loss > 0 {
            format!("meta l4proto udp numgen random mod 100 < {loss} drop")
        } else {
            String::new()
        };
        let script = format!(
            "table ip lab {{
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    {dnat}
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    oifname \"{wan}\" masquerade{random}
  }}
  chain forward_loss {{ type filter hook forward priority -10; policy accept;
    {loss_rule}
  }}
  chain forward {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname != \"{wan}\" oifname \"{wan}\" accept
    {dnat_ok}
  }}
  chain input {{ type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    iifname != \"{wan}\" accept
  }}
}}
"
        );
        self.nft(ns, &script)
    }

    /// One side (`s` = 'c' or 'v') of a two-LAN lab. `wan_ip` is its address on the internet,
    /// `home` its home network number, `carrier` its carrier network number (double NAT).
    #[allow(clippy::too_many_arguments)]
    fn build_side(
        &mut self,
        s: char,
        nat: Nat,
        wan_ip: Ipv4Addr,
        home: u8,
        carrier: u8,
        loss: u8,
        public_ports: &mut Vec<String>,
    ) -> Result<HostInfo, LabError> {
        let host_ns = format!("{}-h{s}", self.prefix);
        self.add_ns(&host_ns)?;
        let host_if = self.ifname(&format!("{s}h"));
        let port = self.ifname(&format!("{s}b"));
        let wan_cidr = format!("{wan_ip}/24");
        let inside = Ipv4Addr::new(198, 19, home, 2);
        let home_gw = Ipv4Addr::new(198, 19, home, 1);
        match nat {
            Nat::Public => {
                self.to_internet(&host_ns, &host_if, &port, &wan_cidr)?;
                self.ip(
                    &host_ns,
                    &["route", "add", "default", "via", &GATEWAY.to_string()],
                )?;
                self.host_net6(&host_ns, &host_if, wan6(home), GATEWAY6)?;
                public_ports.push(port);
                Ok(HostInfo {
                    ns: host_ns,
                    ip: wan_ip,
                    public: wan_ip,
                    fixed_port: None,
                    ip6: Some(wan6(home)),
                })
            }
            Nat::FullCone | Nat::PortRestricted | Nat::Symmetric | Nat::Ipv6Firewall => {
                let router_ns = format!("{}-r{s}", self.prefix);
                self.add_ns(&router_ns)?;
                let wan = self.ifname(&format!("{s}w"));
                let lan = self.ifname(&format!("{s}l"));
                self.to_internet(&router_ns, &wan, &port, &wan_cidr)?;
                self.ip(
                    &router_ns,
                    &["route", "add", "default", "via", &GATEWAY.to_string()],
                )?;
                self.veth(&router_ns, &lan, &host_ns, &host_if)?;
                self.ip(
                    &router_ns,
                    &["addr", "add", &format!("{home_gw}/24"), "dev", &lan],
                )?;
                self.host_net(&host_ns, &host_if, inside, home_gw)?;
                let kind = match nat {
                    Nat::FullCone => RouterKind::FullCone(inside),
                    Nat::Symmetric => RouterKind::Symmetric,
                    _ => RouterKind::PortRestricted,
                };
                self.router(&router_ns, &wan, kind, loss)?;
                let ip6 = if nat == Nat::Ipv6Firewall {
                    self.firewall6(&router_ns, &wan, &lan, home, loss)?;
                    self.host_net6(&host_ns, &host_if, home6(home, 2), home6(home, 1))?;
                    Some(home6(home, 2))
                } else {
                    None
                };
                let fixed_port = (nat == Nat::FullCone).then_some(FULL_CONE_PORT);
                Ok(HostInfo {
                    ns: host_ns,
                    ip: inside,
                    public: wan_ip,
                    fixed_port,
                    ip6,
                })
            }
            Nat::DoubleNat => {
                let carrier_ns = format!("{}-k{s}", self.prefix);
                let router_ns = format!("{}-r{s}", self.prefix);
                self.add_ns(&carrier_ns)?;
                self.add_ns(&router_ns)?;
                self.carrier_and_home(s, &carrier_ns, &router_ns, &port, &wan_cidr, carrier, loss)?;
                let lan = self.ifname(&format!("{s}l"));
                self.veth(&router_ns, &lan, &host_ns, &host_if)?;
                self.ip(
                    &router_ns,
                    &["addr", "add", &format!("{home_gw}/24"), "dev", &lan],
                )?;
                self.host_net(&host_ns, &host_if, inside, home_gw)?;
                Ok(HostInfo {
                    ns: host_ns,
                    ip: inside,
                    public: wan_ip,
                    fixed_port: None,
                    ip6: None,
                })
            }
        }
    }

    /// A carrier router on the internet (WAN `wan_cidr`) and a home router behind it on
    /// 198.19.`carrier`.0/24; the home router's LAN is left to the caller.
    #[allow(clippy::too_many_arguments)]
    fn carrier_and_home(
        &self,
        s: char,
        carrier_ns: &str,
        router_ns: &str,
        port: &str,
        wan_cidr: &str,
        carrier: u8,
        loss: u8,
    ) -> Result<(), LabError> {
        let kwan = self.ifname(&format!("{s}k"));
        let klan = self.ifname(&format!("{s}m"));
        let hwan = self.ifname(&format!("{s}w"));
        self.to_internet(carrier_ns, &kwan, port, wan_cidr)?;
        self.ip(
            carrier_ns,
            &["route", "add", "default", "via", &GATEWAY.to_string()],
        )?;
        self.veth(carrier_ns, &klan, router_ns, &hwan)?;
        let kgw = Ipv4Addr::new(198, 19, carrier, 1);
        self.ip(
            carrier_ns,
            &["addr", "add", &format!("{kgw}/24"), "dev", &klan],
        )?;
        self.ip(
            router_ns,
            &[
                "addr",
                "add",
                &format!("198.19.{carrier}.2/24"),
                "dev",
                &hwan,
            ],
        )?;
        self.ip(
            router_ns,
            &["route", "add", "default", "via", &kgw.to_string()],
        )?;
        self.router(carrier_ns, &kwan, RouterKind::PortRestricted, loss)?;
        self.router(router_ns, &hwan, RouterKind::PortRestricted, loss)
    }

    /// Both hosts on one LAN (198.19.1.0/24: camera .2, viewer .3; for `Ipv6Firewall` also
    /// 2001:2:0:1::/64: camera ::2, viewer ::3) behind one router of kind `nat`; for `Public`
    /// both hosts sit directly on the internet.
    fn build_shared(
        &mut self,
        nat: Nat,
        loss: u8,
        public_ports: &mut Vec<String>,
    ) -> Result<(HostInfo, HostInfo), LabError> {
        if nat == Nat::Public {
            let c = self.build_side(
                'c',
                Nat::Public,
                Ipv4Addr::new(198, 18, 0, 11),
                1,
                200,
                loss,
                public_ports,
            )?;
            let v = self.build_side(
                'v',
                Nat::Public,
                Ipv4Addr::new(198, 18, 0, 12),
                2,
                201,
                loss,
                public_ports,
            )?;
            return Ok((c, v));
        }
        let cam_ns = format!("{}-hc", self.prefix);
        let view_ns = format!("{}-hv", self.prefix);
        let router_ns = format!("{}-r", self.prefix);
        self.add_ns(&cam_ns)?;
        self.add_ns(&view_ns)?;
        let wan_ip = Ipv4Addr::new(198, 18, 0, 11);
        let wan_cidr = format!("{wan_ip}/24");
        let port = self.ifname("cb");
        let wan = if nat == Nat::DoubleNat {
            let carrier_ns = format!("{}-k", self.prefix);
            self.add_ns(&carrier_ns)?;
            self.add_ns(&router_ns)?;
            self.carrier_and_home('c', &carrier_ns, &router_ns, &port, &wan_cidr, 200, loss)?;
            None
        } else {
            self.add_ns(&router_ns)?;
            let w = self.ifname("cw");
            self.to_internet(&router_ns, &w, &port, &wan_cidr)?;
            self.ip(
                &router_ns,
                &["route", "add", "default", "via", &GATEWAY.to_string()],
            )?;
            Some(w)
        };
        let lan_br = self.ifname("lb");
        self.ip(&router_ns, &["link", "add", &lan_br, "type", "bridge"])?;
        self.no_bridge_netfilter(&router_ns);
        self.ip(
            &router_ns,
            &["addr", "add", "198.19.1.1/24", "dev", &lan_br],
        )?;
        self.ip(&router_ns, &["link", "set", &lan_br, "up"])?;
        let gw = Ipv4Addr::new(198, 19, 1, 1);
        let cam_ip = Ipv4Addr::new(198, 19, 1, 2);
        let view_ip = Ipv4Addr::new(198, 19, 1, 3);
        let v6 = nat == Nat::Ipv6Firewall;
        let (cam_ip6, view_ip6) = if v6 {
            (Some(home6(1, 2)), Some(home6(1, 3)))
        } else {
            (None, None)
        };
        for (s, ns, ip, ip6) in [
            ('c', &cam_ns, cam_ip, cam_ip6),
            ('v', &view_ns, view_ip, view_ip6),
        ] {
            let rport = self.ifname(&format!("{s}p"));
            let hif = self.ifname(&format!("{s}h"));
            self.veth(&router_ns, &rport, ns, &hif)?;
            self.ip(&router_ns, &["link", "set", &rport, "master", &lan_br])?;
            self.host_net(ns, &hif, ip, gw)?;
            if let Some(ip6) = ip6 {
                self.host_net6(ns, &hif, ip6, home6(1, 1))?;
            }
        }
        if let Some(w) = &wan {
            let kind = match nat {
                Nat::FullCone => RouterKind::FullCone(cam_ip),
                Nat::Symmetric => RouterKind::Symmetric,
                _ => RouterKind::PortRestricted,
            };
            self.router(&router_ns, w, kind, loss)?;
            if v6 {
                self.firewall6(&router_ns, w, &lan_br, 1, loss)?;
            }
        }
        if loss > 0 {
            // Host-to-host frames never reach the router's IP forward hook: lose them on the bridge.
            self.nft(
                &router_ns,
                &format!(
                    "table bridge lab {{ chain forward_loss {{ type filter hook forward priority 0; policy accept; \
                     ip protocol udp numgen random mod 100 < {loss} drop; \
                     ip6 nexthdr udp numgen random mod 100 < {loss} drop; }}\n}}\n"
                ),
            )?;
        }
        let fixed = (nat == Nat::FullCone).then_some(FULL_CONE_PORT);
        Ok((
            HostInfo {
                ns: cam_ns,
                ip: cam_ip,
                public: wan_ip,
                fixed_port: fixed,
                ip6: cam_ip6,
            },
            HostInfo {
                ns: view_ns,
                ip: view_ip,
                public: wan_ip,
                fixed_port: None,
                ip6: view_ip6,
            },
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            kill_ns_processes(ns);
            let mut cmd = Command::new(ip_path());
            cmd.args(["netns", "del", ns]);
            let _ = run_bounded(&mut cmd, None, CMD_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::str::FromStr;
    use std::sync::mpsc;

    const PYTHON: &str = "/usr/bin/python3";

    /// Replies to every datagram with `seen <src ip>:<src port>` (`[ip]:port` for v6); on `poke`
    /// also sends `stranger-addr` from (stranger ip, any port) and `stranger-port` from (bind ip,
    /// another port) to the sender. Exits by itself after `lifetime` seconds. The address family
    /// follows `ip`.
    const REFLECTOR: &str = r#"
import select, socket, sys, time
ip, ports, stranger, lifetime = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
fam = socket.AF_INET6 if ':' in ip else socket.AF_INET
def fmt(src):
    return ('[%s]:%d' if ':' in src[0] else '%s:%d') % src[:2]
socks = []
for p in ports.split(','):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((ip, int(p)))
    socks.append(s)
st_addr = None
if stranger:
    st_addr = socket.socket(fam, socket.SOCK_DGRAM)
    st_addr.bind((stranger, 0))
st_port = socket.socket(fam, socket.SOCK_DGRAM)
st_port.bind((ip, 0))
print('ready', flush=True)
deadline = time.time() + lifetime
while time.time() < deadline:
    r, _, _ = select.select(socks, [], [], 0.2)
    for s in r:
        data, src = s.recvfrom(2048)
        s.sendto(('seen ' + fmt(src)).encode(), src)
        if data.startswith(b'poke'):
            if st_addr is not None:
                st_addr.sendto(b'stranger-addr', src)
            st_port.sendto(b'stranger-port', src)
"#;

    /// From ONE socket bound to `port` (0 = any), sends `msg` to each target in turn (retrying
    /// every 150 ms, 4 s in all) and prints `reply <target> <observed>`; then listens `linger`
    /// seconds more and prints `extra <payload> <src>` for anything else that arrives. Targets
    /// are `ip:port` (IPv4) or `[ip]:port` (IPv6, then the socket is v6).
    const CLIENT: &str = r#"
import socket, sys, time
port, targets, msg, linger = int(sys.argv[1]), sys.argv[2].split(','), sys.argv[3].encode(), float(sys.argv[4])
v6 = targets[0].startswith('[')
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
if v6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(('::' if v6 else '0.0.0.0', port))
s.settimeout(0.05)
print('local %d' % s.getsockname()[1], flush=True)
seen = {}
def fmt(src):
    return ('[%s]:%d' if ':' in src[0] else '%s:%d') % src[:2]
def handle(data, src):
    src_s = fmt(src)
    text = data.decode(errors='replace')
    if text.startswith('seen ') and src_s in targets:
        if src_s not in seen:
            seen[src_s] = text[5:]
            print('reply %s %s' % (src_s, text[5:]), flush=True)
    else:
        print('extra %s %s' % (text, src_s), flush=True)
def recv_until(end):
    while time.time() < end:
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        except OSError:
            continue
        handle(data, src)
deadline = time.time() + 4.0
for t in targets:
    ip, p = t.rsplit(':', 1)
    ip = ip.strip('[]')
    while t not in seen and time.time() < deadline:
        try:
            s.sendto(msg, (ip, int(p)))
        except OSError:
            pass
        recv_until(min(deadline, time.time() + 0.15))
    if t not in seen:
        print('unreachable %s' % t, flush=True)
recv_until(time.time() + linger)
"#;

    fn lab_available() -> bool {
        match require_root() {
            Ok(()) => true,
            Err(why) => {
                // Straight to fd 2: libtest captures `eprintln!` of passing tests, and a skip
                // must be seen.
                let msg = format!("SKIPPED: NAT lab test not run because {why}\n");
                let _ = std::io::stderr().write_all(msg.as_bytes());
                false
            }
        }
    }

    /// A reflector running in `ns`, killed on drop.
    struct Reflector {
        _child: KillOnDrop,
    }

    fn reflector(
        lab: &Lab,
        ns: &str,
        ip: Ipv4Addr,
        ports: &[u16],
        stranger: Option<Ipv4Addr>,
    ) -> Reflector {
        reflector_at(lab, ns, ip.into(), ports, stranger.map(IpAddr::from))
    }

    /// [`reflector`] on IPv6.
    fn reflector6(
        lab: &Lab,
        ns: &str,
        ip: Ipv6Addr,
        ports: &[u16],
        stranger: Option<Ipv6Addr>,
    ) -> Reflector {
        reflector_at(lab, ns, ip.into(), ports, stranger.map(IpAddr::from))
    }

    fn reflector_at(
        lab: &Lab,
        ns: &str,
        ip: IpAddr,
        ports: &[u16],
        stranger: Option<IpAddr>,
    ) -> Reflector {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let stranger = stranger.map(|s| s.to_string()).unwrap_or_default();
        let mut cmd = lab.command(ns, PYTHON);
        cmd.args([
            "-c",
            REFLECTOR,
            &ip.to_string(),
            &ports.join(","),
            &stranger,
            "15",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = KillOnDrop::spawn(&mut cmd).unwrap();
        let stdout = child.child().stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("reflector did not start within 5 s");
        assert_eq!(line.trim(), "ready", "reflector in {ns} failed to start");
        Reflector { _child: child }
    }

    /// What [`probe`] saw; `A` is `SocketAddrV4` or `SocketAddrV6`.
    #[derive(Debug)]
    struct Probe<A = SocketAddrV4> {
        local: u16,
        replies: HashMap<String, A>,
        unreachable: Vec<String>,
        extras: Vec<(String, A)>,
    }

    impl<A: fmt::Display> Probe<A> {
        /// `<payload> <source>` of every unexpected datagram.
        fn extras_text(&self) -> Vec<String> {
            self.extras
                .iter()
                .map(|(w, a)| format!("{w} {a}"))
                .collect()
        }
    }

    fn probe<A>(lab: &Lab, side: Side, port: u16, targets: &[A], msg: &str, linger: f32) -> Probe<A>
    where
        A: fmt::Display + FromStr,
        A::Err: fmt::Debug,
    {
        let targets: Vec<String> = targets.iter().map(A::to_string).collect();
        let mut cmd = lab.command(lab.host_ns(side), PYTHON);
        cmd.args([
            "-c",
            CLIENT,
            &port.to_string(),
            &targets.join(","),
            msg,
            &linger.to_string(),
        ]);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(8)).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "probe client failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut p = Probe {
            local: 0,
            replies: HashMap::new(),
            unreachable: Vec::new(),
            extras: Vec::new(),
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["local", port] => p.local = port.parse().unwrap(),
                ["reply", t, seen] => {
                    p.replies.insert((*t).to_owned(), seen.parse().unwrap());
                }
                ["unreachable", t] => p.unreachable.push((*t).to_owned()),
                ["extra", payload, src] => {
                    p.extras.push(((*payload).to_owned(), src.parse().unwrap()))
                }
                _ => panic!("unexpected probe output line {line:?}"),
            }
        }
        p
    }

    fn rv(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Lab::RENDEZVOUS_IP, port)
    }

    fn rv6(port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(Lab::RENDEZVOUS_IP6, port, 0, 0)
    }

    /// The kind of network `side` sits behind in `spec`.
    fn nat_of(spec: &LabSpec, side: Side) -> Nat {
        if side == Side::Viewer && !spec.same_lan {
            spec.viewer
        } else {
            spec.camera
        }
    }

    fn in_benchmark_prefix(ip: Ipv6Addr) -> bool {
        ip.segments()[..3] == [0x2001, 2, 0]
    }

    /// Drops `lab` and checks that every one of its namespaces is gone.
    fn drop_and_check(lab: Lab) {
        let names = lab.namespaces().to_vec();
        drop(lab);
        let left = list_namespaces();
        for n in &names {
            assert!(!left.contains(n), "namespace {n} survived the lab's drop");
        }
    }

    /// Builds `spec`, checks both hosts reach the rendezvous address (seen from the public
    /// address) and, when they have IPv6, the v6 rendezvous address (seen from their own
    /// address), then drops the lab and checks every namespace is gone.
    fn check_connectivity(spec: LabSpec) {
        let started = Instant::now();
        let lab = Lab::build(&spec).unwrap_or_else(|e| panic!("building {spec:?}: {e}"));
        let names = lab.namespaces().to_vec();
        let built = started.elapsed();
        {
            let _r = reflector(&lab, lab.internet_ns(), Lab::RENDEZVOUS_IP, &[7000], None);
            let _r6 = reflector6(&lab, lab.internet_ns(), Lab::RENDEZVOUS_IP6, &[7000], None);
            for side in [Side::Camera, Side::Viewer] {
                let p = probe(&lab, side, 0, &[rv(7000)], "hello", 0.0);
                let seen = p.replies.get(&rv(7000).to_string()).unwrap_or_else(|| {
                    panic!("{spec:?}: {side:?} host cannot reach the rendezvous address: {p:?}")
                });
                assert_eq!(
                    *seen.ip(),
                    lab.public_ip(side),
                    "{spec:?}: {side:?} seen from the wrong address"
                );
                let nat = nat_of(&spec, side);
                if nat == Nat::Public {
                    assert_eq!(lab.public_ip(side), lab.host_ip(side));
                }
                if nat == Nat::Ipv6Firewall {
                    assert_ne!(lab.public_ip(side), lab.host_ip(side), "v4 is NATed");
                }
                match (nat, lab.host_ip6(side)) {
                    (Nat::Public | Nat::Ipv6Firewall, Some(ip6)) => {
                        assert!(in_benchmark_prefix(ip6), "{ip6} is outside 2001:2::/48");
                        let p = probe(&lab, side, 0, &[rv6(7000)], "hello", 0.0);
                        let seen = p.replies.get(&rv6(7000).to_string()).unwrap_or_else(|| {
                            panic!(
                                "{spec:?}: {side:?} host cannot reach [{}]: {p:?}",
                                Lab::RENDEZVOUS_IP6
                            )
                        });
                        assert_eq!(
                            *seen,
                            SocketAddrV6::new(ip6, p.local, 0, 0),
                            "{spec:?}: {side:?}: v6 must arrive from the host's own address and port"
                        );
                    }
                    (Nat::Public | Nat::Ipv6Firewall, None) => {
                        panic!("{spec:?}: {side:?} host has no IPv6 address")
                    }
                    (_, Some(ip6)) => panic!("{spec:?}: {side:?} host behind {nat:?} has {ip6}"),
                    (_, None) => {}
                }
            }
            if let (true, Some(cip6), Some(vip6)) = (
                spec.same_lan,
                lab.host_ip6(Side::Camera),
                lab.host_ip6(Side::Viewer),
            ) {
                let _r = reflector6(&lab, lab.host_ns(Side::Viewer), vip6, &[7001], None);
                let target = SocketAddrV6::new(vip6, 7001, 0, 0);
                let p = probe(&lab, Side::Camera, 0, &[target], "hello", 0.0);
                let seen = p
                    .replies
                    .get(&target.to_string())
                    .unwrap_or_else(|| panic!("{spec:?}: v6 LAN unreachable: {p:?}"));
                assert_eq!(*seen, SocketAddrV6::new(cip6, p.local, 0, 0));
            }
            if spec.same_lan {
                // The two hosts talk directly on their LAN, without NAT.
                let vip = lab.host_ip(Side::Viewer);
                let _r = reflector(&lab, lab.host_ns(Side::Viewer), vip, &[7001], None);
                let target = SocketAddrV4::new(vip, 7001);
                let p = probe(&lab, Side::Camera, 0, &[target], "hello", 0.0);
                let seen = p
                    .replies
                    .get(&target.to_string())
                    .unwrap_or_else(|| panic!("{spec:?}: LAN unreachable: {p:?}"));
                assert_eq!(*seen.ip(), lab.host_ip(Side::Camera));
            }
        }
        drop(lab);
        let left = list_namespaces();
        for n in &names {
            assert!(!left.contains(n), "namespace {n} survived the lab's drop");
        }
        eprintln!(
            "lab {spec:?}: built in {built:?}, checked and removed in {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn lab_every_nat_kind_reaches_the_internet() {
        if !lab_available() {
            return;
        }
        use Nat::*;
        let kinds = [
            Public,
            FullCone,
            PortRestricted,
            Symmetric,
            DoubleNat,
            Ipv6Firewall,
        ];
        for (i, camera) in kinds.into_iter().enumerate() {
            let viewer = kinds[(i + 1) % kinds.len()];
            check_connectivity(LabSpec::new(camera, viewer));
        }
    }

    #[test]
    fn lab_same_lan_reaches_the_internet() {
        if !lab_available() {
            return;
        }
        use Nat::*;
        for camera in [PortRestricted, FullCone, DoubleNat, Public, Ipv6Firewall] {
            check_connectivity(LabSpec {
                camera,
                viewer: camera,
                same_lan: true,
                loss_percent: 0,
            });
        }
    }

    #[test]
    fn lab_with_loss_still_reaches_the_internet() {
        if !lab_available() {
            return;
        }
        use Nat::*;
        check_connectivity(LabSpec {
            camera: PortRestricted,
            viewer: PortRestricted,
            same_lan: true,
            loss_percent: 5,
        });
        check_connectivity(LabSpec {
            camera: Symmetric,
            viewer: Public,
            same_lan: false,
            loss_percent: 5,
        });
        check_connectivity(LabSpec {
            camera: DoubleNat,
            viewer: FullCone,
            same_lan: false,
            loss_percent: 5,
        });
    }

    /// Sends `count` datagrams from one socket to `target` (1 ms apart) and prints how many
    /// replies came back (IPv6 when the address has a colon).
    const COUNTER: &str = r#"
import socket, sys, time
ip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = ':' in ip
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('::' if v6 else '0.0.0.0', 0))
s.setblocking(False)
got = 0
def drain():
    global got
    while True:
        try:
            s.recvfrom(2048)
            got += 1
        except BlockingIOError:
            return
for i in range(count):
    s.sendto(b'n%d' % i, (ip, port))
    time.sleep(0.001)
    drain()
end = time.time() + 0.3
while time.time() < end:
    time.sleep(0.02)
    drain()
print(got)
"#;

    fn round_trips(lab: &Lab, from_ns: &str, target: impl Into<SocketAddr>, count: u32) -> u32 {
        let target: SocketAddr = target.into();
        let mut cmd = lab.command(from_ns, PYTHON);
        cmd.args([
            "-c",
            COUNTER,
            &target.ip().to_string(),
            &target.port().to_string(),
            &count.to_string(),
        ]);
        let out = run_checked(&mut cmd, None, Duration::from_secs(8)).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    #[test]
    fn lab_loss_drops_that_share_of_udp() {
        if !lab_available() {
            return;
        }
        // 150 round trips each cross the lossy element twice: 25 % survive at 50 % loss.
        for loss in [0u8, 50] {
            for (camera, viewer, same_lan) in [
                (Nat::PortRestricted, Nat::Public, false),
                (Nat::Symmetric, Nat::Symmetric, true),
            ] {
                let spec = LabSpec {
                    camera,
                    viewer,
                    same_lan,
                    loss_percent: loss,
                };
                let lab = Lab::build(&spec).unwrap();
                let _r = reflector(&lab, lab.internet_ns(), Lab::RENDEZVOUS_IP, &[7000], None);
                let mut paths = vec![
                    (lab.host_ns(Side::Camera).to_owned(), rv(7000)),
                    (lab.host_ns(Side::Viewer).to_owned(), rv(7000)),
                ];
                let _lan = same_lan.then(|| {
                    let vip = lab.host_ip(Side::Viewer);
                    paths.push((
                        lab.host_ns(Side::Camera).to_owned(),
                        SocketAddrV4::new(vip, 7001),
                    ));
                    reflector(&lab, lab.host_ns(Side::Viewer), vip, &[7001], None)
                });
                for (ns, target) in paths {
                    let got = round_trips(&lab, &ns, target, 150);
                    eprintln!("{spec:?}: {ns} -> {target}: {got}/150 round trips");
                    if loss == 0 {
                        assert!(
                            got >= 148,
                            "{spec:?}: {ns} -> {target}: only {got}/150 round trips without loss"
                        );
                    } else {
                        assert!((12..=75).contains(&got), "{spec:?}: {ns} -> {target}: {got}/150 round trips at 50 % loss (expected ~37)");
                    }
                }
            }
        }
    }

    #[test]
    fn lab_mapping_port_restricted_keeps_port_symmetric_changes_it() {
        if !lab_available() {
            return;
        }
        let lab = Lab::build(&LabSpec::new(Nat::PortRestricted, Nat::Symmetric)).unwrap();
        let _r = reflector(
            &lab,
            lab.internet_ns(),
            Lab::RENDEZVOUS_IP,
            &[7000, 7001],
            None,
        );
        let targets = [rv(7000), rv(7001)];

        let cam = probe(&lab, Side::Camera, 45000, &targets, "hello", 0.0);
        let (a, b) = (
            cam.replies[&targets[0].to_string()],
            cam.replies[&targets[1].to_string()],
        );
        assert_eq!(cam.local, 45000);
        assert_eq!(*a.ip(), lab.public_ip(Side::Camera));
        assert_eq!(
            a, b,
            "port-restricted NAT must map one socket to one public port: {cam:?}"
        );
        assert_eq!(
            a.port(),
            45000,
            "Linux masquerade keeps the inside port: {cam:?}"
        );

        let view = probe(&lab, Side::Viewer, 45000, &targets, "hello", 0.0);
        let (a, b) = (
            view.replies[&targets[0].to_string()],
            view.replies[&targets[1].to_string()],
        );
        assert_eq!(*a.ip(), lab.public_ip(Side::Viewer));
        assert_eq!(a.ip(), b.ip());
        assert_ne!(
            a.port(),
            b.port(),
            "symmetric NAT must map each destination to a new port: {view:?}"
        );
        drop(_r);
        drop(lab);

        // Double NAT keeps the port through both routers; full cone maps the fixed port.
        let lab = Lab::build(&LabSpec::new(Nat::DoubleNat, Nat::FullCone)).unwrap();
        let _r = reflector(
            &lab,
            lab.internet_ns(),
            Lab::RENDEZVOUS_IP,
            &[7000, 7001],
            None,
        );
        let cam = probe(&lab, Side::Camera, 45000, &targets, "hello", 0.0);
        let (a, b) = (
            cam.replies[&targets[0].to_string()],
            cam.replies[&targets[1].to_string()],
        );
        assert_eq!(a, b, "{cam:?}");
        assert_eq!(
            a,
            SocketAddrV4::new(lab.public_ip(Side::Camera), 45000),
            "{cam:?}"
        );
        assert_eq!(lab.fixed_port(Side::Camera), None);
        let port = lab.fixed_port(Side::Viewer).unwrap();
        assert_eq!(port, FULL_CONE_PORT);
        let view = probe(&lab, Side::Viewer, port, &targets, "hello", 0.0);
        let (a, b) = (
            view.replies[&targets[0].to_string()],
            view.replies[&targets[1].to_string()],
        );
        assert_eq!(a, b, "{view:?}");
        assert_eq!(
            a,
            SocketAddrV4::new(lab.public_ip(Side::Viewer), FULL_CONE_PORT),
            "{view:?}"
        );
    }

    #[test]
    fn lab_filtering_port_restricted_drops_strangers_full_cone_lets_them_in() {
        if !lab_available() {
            return;
        }
        let stranger = Ipv4Addr::new(198, 18, 0, 200);
        for (camera, viewer) in [
            (Nat::PortRestricted, Nat::FullCone),
            (Nat::Symmetric, Nat::Public),
        ] {
            let lab = Lab::build(&LabSpec::new(camera, viewer)).unwrap();
            let mut add = Command::new(ip_path());
            add.args([
                "-n",
                lab.internet_ns(),
                "addr",
                "add",
                "198.18.0.200/24",
                "dev",
                &lab.ifname("br"),
            ]);
            run_checked(&mut add, None, CMD_TIMEOUT).unwrap();
            let _r = reflector(
                &lab,
                lab.internet_ns(),
                Lab::RENDEZVOUS_IP,
                &[7000],
                Some(stranger),
            );
            for (side, nat) in [(Side::Camera, camera), (Side::Viewer, viewer)] {
                let port = lab.fixed_port(side).unwrap_or(45000);
                let p = probe(&lab, side, port, &[rv(7000)], "poke", 0.6);
                assert!(
                    p.replies.contains_key(&rv(7000).to_string()),
                    "{nat:?}: no reply from the rendezvous: {p:?}"
                );
                let got: Vec<&str> = p.extras.iter().map(|(what, _)| what.as_str()).collect();
                match nat {
                    Nat::PortRestricted | Nat::Symmetric | Nat::Ipv6Firewall => {
                        assert!(
                            got.is_empty(),
                            "{nat:?} let in packets from endpoints the host never sent to: {p:?}"
                        )
                    }
                    Nat::FullCone | Nat::Public => {
                        assert!(
                            got.contains(&"stranger-addr"),
                            "{nat:?} dropped a packet from a new address: {p:?}"
                        );
                        assert!(
                            got.contains(&"stranger-port"),
                            "{nat:?} dropped a packet from a new port: {p:?}"
                        );
                        let from_new_addr = p
                            .extras
                            .iter()
                            .find(|(w, _)| w == "stranger-addr")
                            .unwrap()
                            .1;
                        assert_eq!(*from_new_addr.ip(), stranger);
                    }
                    Nat::DoubleNat => unreachable!(),
                }
            }
        }
    }

    /// One UDP socket bound to `ip`:`port` (v6 when `ip` has a colon): prints `ready`, then
    /// `got <payload> <src>` for every datagram; each stdin line `<ip> <port> <payload>` is sent
    /// from that socket and acknowledged with `sent <payload>`. Exits after `lifetime` seconds or
    /// when stdin closes.
    const AGENT: &str = r#"
import os, select, socket, sys, time
ip, port, lifetime = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, port))
def fmt(src):
    return ('[%s]:%d' if ':' in src[0] else '%s:%d') % src[:2]
print('ready', flush=True)
buf = b''
deadline = time.time() + lifetime
while time.time() < deadline:
    r, _, _ = select.select([s, 0], [], [], 0.1)
    if s in r:
        data, src = s.recvfrom(2048)
        print('got %s %s' % (data.decode(errors='replace'), fmt(src)), flush=True)
    if 0 in r:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        buf += chunk
        while b'\n' in buf:
            line, buf = buf.split(b'\n', 1)
            dip, dport, payload = line.decode().split()
            s.sendto(payload.encode(), (dip, int(dport)))
            print('sent %s' % payload, flush=True)
"#;

    /// A UDP endpoint in one namespace, driven over stdin (see [`AGENT`]).
    struct Agent {
        name: String,
        child: KillOnDrop,
        lines: mpsc::Receiver<String>,
        got: Vec<(String, SocketAddr)>,
    }

    impl Agent {
        fn start(lab: &Lab, ns: &str, at: SocketAddr) -> Agent {
            let mut cmd = lab.command(ns, PYTHON);
            cmd.args([
                "-c",
                AGENT,
                &at.ip().to_string(),
                &at.port().to_string(),
                "10",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
            let mut child = KillOnDrop::spawn(&mut cmd).unwrap();
            let stdout = child.child().stdout.take().unwrap();
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let mut agent = Agent {
                name: format!("{at} in {ns}"),
                child,
                lines,
                got: Vec::new(),
            };
            agent.expect_line("ready");
            agent
        }

        /// Next line that is not a `got` (those are recorded), within 3 s.
        fn expect_line(&mut self, want: &str) {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = self
                    .lines
                    .recv_timeout(left)
                    .unwrap_or_else(|_| panic!("agent {}: no `{want}` within 3 s", self.name));
                if !self.record(&line) {
                    assert_eq!(line, want, "agent {}", self.name);
                    return;
                }
            }
        }

        fn record(&mut self, line: &str) -> bool {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["got", payload, src] => {
                    self.got.push(((*payload).to_owned(), src.parse().unwrap()));
                    true
                }
                _ => false,
            }
        }

        fn send(&mut self, to: SocketAddr, payload: &str) {
            let line = format!("{} {} {payload}\n", to.ip(), to.port());
            let stdin = self.child.child().stdin.as_mut().unwrap();
            stdin.write_all(line.as_bytes()).unwrap();
            stdin.flush().unwrap();
            self.expect_line(&format!("sent {payload}"));
        }

        /// Records whatever arrives during `d`.
        fn settle(&mut self, d: Duration) {
            let deadline = Instant::now() + d;
            while let Ok(line) = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                self.record(&line);
            }
        }

        /// Records what arrives for `within`, or until `payload` has arrived; returns its
        /// source.
        fn wait_for(&mut self, payload: &str, within: Duration) -> Option<SocketAddr> {
            let deadline = Instant::now() + within;
            loop {
                if let Some((_, src)) = self.got.iter().find(|(p, _)| p == payload) {
                    return Some(*src);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(line) => {
                        self.record(&line);
                    }
                    Err(_) => return None,
                }
            }
        }
    }

    /// Hole punching over IPv6 in `spec` (camera behind Ipv6Firewall): the camera's firewall
    /// drops what the viewer sends before the camera sent to the viewer, then lets the viewer's
    /// packets in, and only from that address and port; the addresses seen are the hosts' own.
    fn check_v6_filtering(spec: LabSpec) {
        let started = Instant::now();
        assert_eq!(spec.camera, Nat::Ipv6Firewall);
        let lab = Lab::build(&spec).unwrap();
        let cam6 = lab.host_ip6(Side::Camera).unwrap();
        let view6 = lab.host_ip6(Side::Viewer).unwrap();
        let cam = SocketAddr::from(SocketAddrV6::new(cam6, 5000, 0, 0));
        let view = SocketAddr::from(SocketAddrV6::new(view6, 6000, 0, 0));
        let view_port = SocketAddr::from(SocketAddrV6::new(view6, 6001, 0, 0));
        let stranger = SocketAddr::from(rv6(6000));
        let mut c = Agent::start(&lab, lab.host_ns(Side::Camera), cam);
        let mut v = Agent::start(&lab, lab.host_ns(Side::Viewer), view);
        let mut vp = Agent::start(&lab, lab.host_ns(Side::Viewer), view_port);
        let mut st = Agent::start(&lab, lab.internet_ns(), stranger);

        // Unsolicited: the camera's firewall drops all of it.
        v.send(cam, "early");
        vp.send(cam, "early-port");
        st.send(cam, "early-stranger");
        assert_eq!(
            c.wait_for("early", Duration::from_millis(300)),
            None,
            "{spec:?}: the firewall let in a packet before the camera sent anything"
        );
        // The camera sends to the viewer: it arrives (the viewer's own firewall, if any, has
        // state from "early") from the camera's own address and port.
        c.send(view, "punch");
        assert_eq!(
            v.wait_for("punch", Duration::from_secs(2)),
            Some(cam),
            "{spec:?}: viewer got {:?}",
            v.got
        );
        // Now the viewer gets in, from its own address and port; nobody else does.
        v.send(cam, "late");
        vp.send(cam, "late-port");
        st.send(cam, "late-stranger");
        assert_eq!(
            c.wait_for("late", Duration::from_secs(2)),
            Some(view),
            "{spec:?}: camera got {:?}",
            c.got
        );
        c.settle(Duration::from_millis(300));
        let got: Vec<&str> = c.got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            got,
            ["late"],
            "{spec:?}: the camera's firewall let in {:?}",
            c.got
        );
        drop((c, v, vp, st));
        drop_and_check(lab);
        eprintln!("v6 filtering {spec:?}: {:?}", started.elapsed());
    }

    #[test]
    fn lab_ipv6_firewall_lets_in_only_what_the_host_asked_for() {
        if !lab_available() {
            return;
        }
        check_v6_filtering(LabSpec::new(Nat::Ipv6Firewall, Nat::Ipv6Firewall));
        check_v6_filtering(LabSpec::new(Nat::Ipv6Firewall, Nat::Public));
    }

    #[test]
    fn lab_ipv6_firewall_is_untranslated_and_dual_stack() {
        if !lab_available() {
            return;
        }
        let started = Instant::now();
        let lab = Lab::build(&LabSpec::new(Nat::Ipv6Firewall, Nat::Public)).unwrap();
        let br = lab.ifname("br");
        let stranger = Ipv4Addr::new(198, 18, 0, 200);
        let stranger6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x200);
        let mut add = Command::new(ip_path());
        add.args(["-n", lab.internet_ns(), "addr", "add", "198.18.0.200/24"])
            .args(["dev", &br]);
        run_checked(&mut add, None, CMD_TIMEOUT).unwrap();
        lab.ip6_addr(lab.internet_ns(), stranger6, &br).unwrap();
        let _r = reflector(
            &lab,
            lab.internet_ns(),
            Lab::RENDEZVOUS_IP,
            &[7000, 7001],
            Some(stranger),
        );
        let _r6 = reflector6(
            &lab,
            lab.internet_ns(),
            Lab::RENDEZVOUS_IP6,
            &[7000, 7001],
            Some(stranger6),
        );
        // All four probes at once: each lingers for strangers.
        let (v4, v6) = std::thread::scope(|s| {
            let v4: Vec<_> = [Side::Camera, Side::Viewer]
                .map(|side| {
                    let lab = &lab;
                    s.spawn(move || probe(lab, side, 45000, &[rv(7000), rv(7001)], "poke", 0.6))
                })
                .into_iter()
                .collect();
            let v6: Vec<_> = [Side::Camera, Side::Viewer]
                .map(|side| {
                    let lab = &lab;
                    s.spawn(move || probe(lab, side, 45000, &[rv6(7000), rv6(7001)], "poke", 0.6))
                })
                .into_iter()
                .collect();
            (
                v4.into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>(),
                v6.into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>(),
            )
        });
        for (i, side) in [Side::Camera, Side::Viewer].into_iter().enumerate() {
            let (p4, p6) = (&v4[i], &v6[i]);
            let a = p4.replies[&rv(7000).to_string()];
            assert_eq!(a, p4.replies[&rv(7001).to_string()], "{side:?}: {p4:?}");
            let a6 = p6.replies[&rv6(7000).to_string()];
            assert_eq!(a6, p6.replies[&rv6(7001).to_string()], "{side:?}: {p6:?}");
            let ip6 = lab.host_ip6(side).unwrap();
            assert_eq!(a6, SocketAddrV6::new(ip6, 45000, 0, 0), "{side:?}: {p6:?}");
            let ex4 = p4.extras_text();
            let ex6 = p6.extras_text();
            match side {
                Side::Camera => {
                    // v4: port-restricted NAT (keeps the port); v6: the host's own address.
                    assert_ne!(lab.public_ip(side), lab.host_ip(side));
                    assert_eq!(a, SocketAddrV4::new(lab.public_ip(side), 45000), "{p4:?}");
                    assert!(ex4.is_empty(), "v4 NAT let in strangers: {ex4:?}");
                    assert!(ex6.is_empty(), "v6 firewall let in strangers: {ex6:?}");
                }
                Side::Viewer => {
                    assert_eq!(a, SocketAddrV4::new(lab.host_ip(side), 45000), "{p4:?}");
                    assert_eq!(ip6, Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x12));
                    for (ex, ip) in [(&ex4, IpAddr::from(stranger)), (&ex6, stranger6.into())] {
                        assert!(
                            ex.iter().any(|e| e.starts_with("stranger-port")),
                            "public host missed a packet from a new port: {ex:?}"
                        );
                        let from = match ip {
                            IpAddr::V4(ip) => format!(" {ip}:"),
                            IpAddr::V6(ip) => format!(" [{ip}]:"),
                        };
                        assert!(
                            ex.iter()
                                .any(|e| e.starts_with("stranger-addr") && e.contains(&from)),
                            "public host missed a packet from {from}: {ex:?}"
                        );
                    }
                }
            }
        }
        drop((_r, _r6));
        drop_and_check(lab);
        eprintln!("dual stack: {:?}", started.elapsed());
    }

    #[test]
    fn lab_loss_applies_to_ipv6_udp() {
        if !lab_available() {
            return;
        }
        // As lab_loss_drops_that_share_of_udp, on v6: router forward hooks (camera), the
        // public host's bridge port (viewer), the shared LAN bridge (camera -> viewer).
        for (loss, camera, viewer, same_lan) in [
            (50u8, Nat::Ipv6Firewall, Nat::Public, false),
            (50, Nat::Ipv6Firewall, Nat::Ipv6Firewall, true),
            (0, Nat::Ipv6Firewall, Nat::Ipv6Firewall, true),
        ] {
            let spec = LabSpec {
                camera,
                viewer,
                same_lan,
                loss_percent: loss,
            };
            let lab = Lab::build(&spec).unwrap();
            let _r = reflector6(&lab, lab.internet_ns(), Lab::RENDEZVOUS_IP6, &[7000], None);
            let cam_ns = lab.host_ns(Side::Camera).to_owned();
            let view_ns = lab.host_ns(Side::Viewer).to_owned();
            let mut paths = vec![(cam_ns.clone(), rv6(7000)), (view_ns.clone(), rv6(7000))];
            let _lan = same_lan.then(|| {
                let vip = lab.host_ip6(Side::Viewer).unwrap();
                paths.push((cam_ns.clone(), SocketAddrV6::new(vip, 7001, 0, 0)));
                reflector6(&lab, &view_ns, vip, &[7001], None)
            });
            let counts: Vec<u32> = std::thread::scope(|s| {
                let hs: Vec<_> = paths
                    .iter()
                    .map(|(ns, t)| {
                        let lab = &lab;
                        s.spawn(move || round_trips(lab, ns, *t, 150))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for ((ns, target), got) in paths.iter().zip(counts) {
                eprintln!("{spec:?}: {ns} -> {target}: {got}/150 round trips");
                if loss == 0 {
                    assert!(
                        got >= 148,
                        "{spec:?}: {ns} -> {target}: only {got}/150 without loss"
                    );
                } else {
                    assert!(
                        (12..=75).contains(&got),
                        "{spec:?}: {ns} -> {target}: {got}/150 round trips at 50 % loss (expected ~37)"
                    );
                }
            }
        }
    }

    #[test]
    fn lab_names_encode_the_creator() {
        let p = fresh_prefix();
        assert!(p.len() <= 11, "{p}");
        assert_eq!(creator_pid(&format!("{p}-i")), Some(std::process::id()));
        assert_eq!(creator_pid(&format!("{p}-hc")), Some(std::process::id()));
        assert_eq!(creator_pid("pcfoo"), None);
        assert_eq!(creator_pid("pc12_3"), None);
        assert_eq!(creator_pid("pc1z_a-k"), Some(71));
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36), "10");
    }

    #[test]
    fn lab_sweep_removes_only_dead_creators() {
        if !lab_available() {
            return;
        }
        // PID 4194304 is above the largest possible pid_max, so it is never alive.
        let dead = format!("{FAMILY}{}_0-i", base36(4_194_304 + 1));
        assert_eq!(creator_pid(&dead), Some(4_194_305));
        let mut add = Command::new(ip_path());
        add.args(["netns", "add", &dead]);
        run_checked(&mut add, None, CMD_TIMEOUT).unwrap();
        let lab = Lab::build(&LabSpec::new(Nat::Public, Nat::Public)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let started = process_start_secs(std::process::id()).unwrap();
        assert!(
            started <= now + 1 && started + 3600 > now,
            "start {started}, now {now}"
        );
        assert!(creator_alive(std::process::id(), lab.internet_ns()));
        sweep_stale();
        let left = list_namespaces();
        let leaked = left.contains(&dead);
        if leaked {
            let mut del = Command::new(ip_path());
            del.args(["netns", "del", &dead]);
            let _ = run_bounded(&mut del, None, CMD_TIMEOUT);
        }
        assert!(!leaked, "sweep_stale kept {dead}");
        for n in lab.namespaces() {
            assert!(left.contains(n), "sweep_stale removed the live lab's {n}");
        }
    }
}
