//! Test support for cluster mode: a real `redis-server` (Debian package `redis-server`)
//! on a free loopback port with no persistence, killed when dropped; rendezvous nodes
//! joined to it; and a node that can be crashed (its runtime dropped without any clean-up).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peercam_rendezvous::cluster::{ClusterConfig, NodeId};

use crate::{any_port, Pki};

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server`, or returns `None` after printing why the test is skipped when
    /// it is not installed. Under CI (the `CI` variable is set) a missing server fails the
    /// test instead: there the cluster tests must run.
    pub fn start_or_skip(test: &str) -> Option<RedisServer> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let why = "redis-server is not installed (apt-get install redis-server; scripts/test.sh does)";
            if std::env::var_os("CI").is_some() {
                panic!("{test}: {why}; cluster tests must run in CI");
            }
            // Straight to fd 2: libtest captures `eprintln!` of passing tests, and a skip
            // must be seen.
            let msg = format!("SKIPPED: {test} not run because {why}\n");
            let _ = std::io::stderr().write_all(msg.as_bytes());
            return None;
        }
        Some(Self::start())
    }

    fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut child = spawn(port, dir.path());
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if ping(port) {
                    return RedisServer { child, port, dir };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start on a loopback port");
    }

    /// Kills the server (an outage); [`RedisServer::resume`] starts it again, empty.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port after [`RedisServer::kill`].
    pub fn resume(&mut self) {
        self.child = spawn(self.port, self.dir.path());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ping(self.port) {
            assert!(Instant::now() < deadline, "redis-server did not restart");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server; returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (package redis-tools) runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Number of subscribers of `channel` (a node listens on `peercam:chan:<node>`).
    pub fn subscribers(&self, channel: &str) -> u64 {
        let out = self.cli(&["PUBSUB", "NUMSUB", channel]);
        out.lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether `key` exists.
    pub fn exists(&self, key: &str) -> bool {
        self.cli(&["EXISTS", key]) == "1"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(port: u16, dir: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server")
}

fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Cluster settings for node `id` with short TTLs (2 s), so expiry shows within a test.
pub fn cluster_config(redis: &RedisServer, id: &str) -> ClusterConfig {
    let mut config = ClusterConfig::new(redis.url(), NodeId::new(id).expect("node id"));
    config.presence_ttl = Duration::from_secs(2);
    config.node_ttl = Duration::from_secs(2);
    config
}

/// Limits for a cluster node `id` in tests: fast timeouts, an admin listener.
pub fn node_limits(redis: &RedisServer, id: &str) -> peercam_rendezvous::Limits {
    peercam_rendezvous::Limits {
        intro_timeout: Duration::from_secs(2),
        drain: Duration::from_millis(300),
        admin_listen: Some(crate::any_tcp()),
        cluster: Some(cluster_config(redis, id)),
        ..Default::default()
    }
}

/// Starts rendezvous node `id` of the cluster on `redis`, on any loopback port.
pub async fn start_node(pki: &Pki, redis: &RedisServer, id: &str) -> peercam_rendezvous::Handle {
    crate::start_rendezvous_with(pki, node_limits(redis, id)).await
}

/// A rendezvous node on its own runtime and thread, so that it can crash: its runtime is
/// dropped with every task in it, with no clean-up sent to Redis or to its peers.
pub struct CrashableNode {
    addr: SocketAddr,
    crash: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CrashableNode {
    /// Starts node `id`.
    pub fn start(pki: &Pki, redis: &RedisServer, id: &str) -> CrashableNode {
        let config = peercam_rendezvous::Config {
            listen: any_port(),
            credentials: pki.creds(peercam_certs::Role::Rendezvous, "rdv"),
            trust: pki.trust(),
            limits: node_limits(redis, id),
        };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (crash, crashed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let handle = peercam_rendezvous::start(config)
                    .await
                    .expect("node starts");
                let _ = addr_tx.send(handle.local_addr());
                let _ = crashed.await;
                drop(handle); // no shutdown(): the tasks die with the runtime below
            });
            rt.shutdown_background();
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("crashable node started");
        CrashableNode {
            addr,
            crash: Some(crash),
            thread: Some(thread),
        }
    }

    /// The node's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the node at once.
    pub fn crash(&mut self) {
        if let Some(c) = self.crash.take() {
            let _ = c.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CrashableNode {
    fn drop(&mut self) {
        self.crash();
    }
}
