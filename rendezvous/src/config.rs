//! The rendezvous' file configuration (TOML), kept apart from the runtime [`Config`].
//!
//! Every field is optional in the file; flags and environment variables override it (see
//! `main.rs`). [`FileConfig::resolve`] loads the certificates and produces the runtime
//! configuration, naming the file and setting of anything wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peercam_certs::Role;
use peercam_common::tls::{Credentials, DenyList, TlsError, Trust};
use serde::Deserialize;

use crate::cluster::record::BadNodeId;
use crate::cluster::{ClusterConfig, NodeId};
use crate::server::{Config, Limits};

/// Default UDP port of a rendezvous.
pub const DEFAULT_PORT: u16 = 7400;

/// The TOML file, as written by an operator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// UDP address to listen on (default `0.0.0.0:7400`).
    pub listen: Option<SocketAddr>,
    /// The deployment CA certificate.
    pub ca: Option<PathBuf>,
    /// This rendezvous' certificate.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// Seconds a viewer waits for a camera to answer an introduction.
    pub intro_timeout_secs: Option<u64>,
    /// Most concurrent connections.
    pub max_connections: Option<usize>,
    /// Lookups per second one viewer may sustain.
    pub lookup_rate: Option<f64>,
    /// Lookups one viewer may make in a burst.
    pub lookup_burst: Option<f64>,
    /// Unvalidated handshakes in progress above which clients must answer a QUIC Retry
    /// first (default 1024; 0 = always).
    pub retry_threshold: Option<usize>,
    /// Registrations per second this rendezvous sustains (default 500). On shutdown it
    /// asks its cameras to spread their reconnects over `cameras / registration_rate`
    /// seconds (0.5–120 s), so that a restart does not bring them all back at once.
    pub registration_rate: Option<f64>,
    /// Second UDP address for netcheck (default: the listen port + 1; "off" is not a
    /// value: set `probe = false` to disable).
    pub probe_listen: Option<SocketAddr>,
    /// TCP address for `/metrics`, `/livez`, `/readyz` (default off; keep it private,
    /// e.g. "127.0.0.1:9400").
    pub admin_listen: Option<SocketAddr>,
    /// Answer netcheck on a second port (default true).
    pub probe: Option<bool>,
    /// Offer a relay when no direct path works (default true).
    pub relay: Option<bool>,
    /// Most megabytes relayed per session.
    pub relay_max_mb: Option<u64>,
    /// Longest relay session, seconds.
    pub relay_max_secs: Option<u64>,
    /// Most relay sessions at once.
    pub relay_max_sessions: Option<usize>,
    /// Public IP the relay advertises (a VM behind 1:1 NAT).
    pub relay_public_ip: Option<std::net::IpAddr>,
    /// Revoked identities, as `role/id` (e.g. `viewer/mallory`).
    #[serde(default)]
    pub revoked_ids: Vec<String>,
    /// Revoked certificates, as SHA-256 fingerprints (`certs inspect` prints them).
    #[serde(default)]
    pub revoked_certs: Vec<String>,
    /// Cluster mode: share presence and introductions with other nodes through Redis
    /// (default off: a single node with its registry in memory).
    pub cluster: Option<ClusterFile>,
}

/// The `[cluster]` table, e.g. `cluster = { redis = "redis://10.0.0.5:6379", node_id = "rdv-1" }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Redis (or Valkey) URL, e.g. `redis://127.0.0.1:6379`; a password goes in the URL
    /// (`redis://:secret@host:6379`) and is never logged.
    pub redis: String,
    /// This node's name, unique in the cluster (`a-z 0-9 - . _`, at most 64).
    pub node_id: String,
    /// Seconds a camera's presence outlives its node's last refresh (default 30).
    pub presence_ttl_secs: Option<u64>,
    /// Seconds the node's liveness key outlives its last refresh (default 15).
    pub node_ttl_secs: Option<u64>,
}

impl ClusterFile {
    fn resolve(&self) -> Result<ClusterConfig, ConfigError> {
        let node = NodeId::new(&self.node_id)?;
        let mut config = ClusterConfig::new(self.redis.clone(), node);
        if let Some(s) = self.presence_ttl_secs {
            config.presence_ttl = Duration::from_secs(s.max(1));
        }
        if let Some(s) = self.node_ttl_secs {
            config.node_ttl = Duration::from_secs(s.max(1));
        }
        Ok(config)
    }
}

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error(transparent)]
    File(#[from] peercam_common::config::FileError),
    /// A required setting is missing.
    #[error("no {0} given: set `{0} = \"...\"` in the config file or pass --{0}")]
    Missing(&'static str),
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The cluster node ID breaks the rules.
    #[error("cluster.node_id: {0}")]
    NodeId(#[from] BadNodeId),
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(peercam_common::config::load(path)?)
    }

    /// Parses TOML text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Ok(peercam_common::config::parse(text, path)?)
    }

    /// Loads certificates and builds the runtime configuration.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let ca = self.ca.as_ref().ok_or(ConfigError::Missing("ca"))?;
        let cert = self.cert.as_ref().ok_or(ConfigError::Missing("cert"))?;
        let key = self.key.as_ref().ok_or(ConfigError::Missing("key"))?;
        let mut limits = Limits::default();
        if let Some(s) = self.intro_timeout_secs {
            limits.intro_timeout = Duration::from_secs(s.max(1));
        }
        if let Some(n) = self.max_connections {
            limits.max_connections = n;
        }
        if let Some(r) = self.lookup_rate {
            limits.registry.lookup_rate = r.max(0.01);
        }
        if let Some(b) = self.lookup_burst {
            limits.registry.lookup_burst = b.max(1.0);
        }
        let listen = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)));
        if self.probe != Some(false) {
            limits.probe_listen = self.probe_listen.or_else(|| {
                let port = listen
                    .port()
                    .checked_add(1)
                    .filter(|_| listen.port() != 0)?;
                Some(SocketAddr::new(listen.ip(), port))
            });
        }
        limits.admin_listen = self.admin_listen;
        if let Some(n) = self.retry_threshold {
            limits.retry_threshold = n;
        }
        if let Some(r) = self.registration_rate {
            limits.reconnect_spread.rate = r.max(1.0);
        }
        if self.relay == Some(false) {
            limits.relay = None;
        }
        if let Some(relay) = limits.relay.as_mut() {
            if let Some(mb) = self.relay_max_mb {
                relay.max_bytes = mb.saturating_mul(1024 * 1024);
            }
            if let Some(s) = self.relay_max_secs {
                relay.max_duration = Duration::from_secs(s.max(1));
            }
            if let Some(n) = self.relay_max_sessions {
                relay.max_sessions = n;
            }
        }
        limits.relay_public_ip = self.relay_public_ip;
        limits.cluster = self
            .cluster
            .as_ref()
            .map(ClusterFile::resolve)
            .transpose()?;
        Ok(Config {
            listen,
            credentials: Credentials::load(cert, key, Role::Rendezvous)?,
            trust: Trust::load(ca)?
                .with_deny_list(DenyList::parse(&self.revoked_ids, &self.revoked_certs)?),
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_setting_names_file_and_line() {
        let err = FileConfig::parse(
            "listen = \"0.0.0.0:1\"\nlisten_port = 3\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("r.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn cluster_table_is_read_and_node_id_checked() {
        let text = "cluster = { redis = \"redis://127.0.0.1:6379\", node_id = \"rdv-1\", presence_ttl_secs = 9 }\n";
        let file = FileConfig::parse(text, Path::new("r.toml")).unwrap();
        let cluster = file.cluster.as_ref().unwrap().resolve().unwrap();
        assert_eq!(cluster.node.as_str(), "rdv-1");
        assert_eq!(cluster.presence_ttl, Duration::from_secs(9));
        assert_eq!(cluster.node_ttl, Duration::from_secs(15));
        let bad = "[cluster]\nredis = \"redis://h\"\nnode_id = \"Node A\"\n";
        let file = FileConfig::parse(bad, Path::new("r.toml")).unwrap();
        let err = file
            .cluster
            .as_ref()
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster.node_id") && err.contains("Node A"),
            "{err}"
        );
        assert!(
            FileConfig::default().cluster.is_none(),
            "single node by default"
        );
    }

    #[test]
    fn registration_rate_sizes_the_reconnect_window() {
        let file = FileConfig::parse("registration_rate = 2000.0\n", Path::new("r.toml")).unwrap();
        assert_eq!(file.registration_rate, Some(2000.0));
        let mut limits = Limits::default();
        assert_eq!(
            limits.reconnect_spread.window(10_000),
            Duration::from_secs(20),
            "default 500/s"
        );
        limits.reconnect_spread.rate = file.registration_rate.unwrap();
        assert_eq!(
            limits.reconnect_spread.window(10_000),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn missing_certificate_is_named() {
        let err = FileConfig::default().resolve().unwrap_err().to_string();
        assert!(err.contains("--ca"), "{err}");
    }
}
