//! What cluster nodes put in Redis, as plain values: node IDs, key names, the presence
//! record of a camera and the signals sent on the per-node channels. Pure: no I/O.
//!
//! Everything read back from Redis is treated as input from a peer: size-limited before
//! decoding, decoded with a recursion limit, validated (IDs through their newtypes,
//! address and list lengths against the protocol's limits), and never trusted to panic
//! anything. CBOR, like the rendezvous protocol; golden-bytes tests pin the format.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use peercam_certs::Fingerprint;
use peercam_common::rdv::{RelayOffer, MAX_ACCESS_LIST, MAX_LOCAL_ADDRS};
use peercam_common::{CameraId, SessionId, ViewerId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest presence record accepted (an access list of 1024 IDs of 64 bytes fits).
pub const MAX_RECORD: usize = 96 * 1024;
/// Largest signal accepted from a node channel (signals carry no access list).
pub const MAX_SIGNAL: usize = 8 * 1024;
/// Longest node ID.
pub const MAX_NODE_ID: usize = 64;
/// Prefix of every key and channel, so a Redis shared with other software stays tidy.
pub const PREFIX: &str = "peercam";
/// Version of the records and signals; a node ignores what it does not understand.
pub const VERSION: u32 = 1;

/// The name of one rendezvous node in a cluster: 1–64 of `a-z 0-9 - . _`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

/// A node ID that breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a node ID: use 1 to 64 characters among a-z, 0-9, '-', '.', '_'")]
pub struct BadNodeId(pub String);

impl NodeId {
    /// Validates and wraps a node ID.
    pub fn new(id: &str) -> Result<Self, BadNodeId> {
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
        if id.is_empty() || id.len() > MAX_NODE_ID || !id.chars().all(ok) {
            return Err(BadNodeId(id.to_string()));
        }
        Ok(NodeId(id.to_string()))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = BadNodeId;
    fn from_str(s: &str) -> Result<Self, BadNodeId> {
        NodeId::new(s)
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NodeId::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Key names. The camera ID is in braces (a Redis Cluster hash tag) so a camera's keys
/// share a slot and the scripts that touch both stay valid on a sharded Redis.
pub mod keys {
    use super::{NodeId, PREFIX};
    use peercam_common::CameraId;

    /// Hash with the camera's presence: fields `owner` (`node/conn`) and `rec` (CBOR).
    pub fn presence(camera: &CameraId) -> String {
        format!("{PREFIX}:cam:{{{camera}}}")
    }

    /// The camera's last presence record, kept after it left (for "offline, last seen"
    /// answers to viewers it allowed).
    pub fn seen(camera: &CameraId) -> String {
        format!("{PREFIX}:seen:{{{camera}}}")
    }

    /// The key fingerprint (hex) that holds the camera ID, kept for the pin period.
    pub fn owner(camera: &CameraId) -> String {
        format!("{PREFIX}:owner:{{{camera}}}")
    }

    /// A node's liveness key.
    pub fn node(node: &NodeId) -> String {
        format!("{PREFIX}:node:{node}")
    }

    /// The channel a node listens on for forwarded introductions and their answers.
    pub fn channel(node: &NodeId) -> String {
        format!("{PREFIX}:chan:{node}")
    }

    /// The `owner` field value: which connection of which node holds the camera.
    pub fn owner_tag(node: &NodeId, conn: u64) -> String {
        format!("{node}/{conn}")
    }
}

/// Why a value read from Redis was rejected.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Larger than the limit for its kind.
    #[error("{0} bytes is over the limit")]
    TooLarge(usize),
    /// Not valid CBOR for the expected type, or trailing bytes.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Well-formed but breaks a rule (version, list lengths).
    #[error("invalid: {0}")]
    Invalid(&'static str),
    /// Could not be encoded (only for values over the limit).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// A camera online on some node, as published in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Format version ([`VERSION`]).
    pub v: u32,
    /// The node the camera is connected to.
    pub node: NodeId,
    /// That node's connection number (a reconnect gets a new one).
    pub conn: u64,
    /// The camera's key fingerprint.
    #[serde(with = "fingerprint")]
    pub key: Fingerprint,
    /// The camera's address as its node observed it.
    pub observed: SocketAddr,
    /// Its host candidates.
    pub local: Vec<SocketAddr>,
    /// Viewers allowed to connect (the node enforces it again on delivery).
    pub access: Vec<ViewerId>,
    /// When the node last wrote this record, Unix milliseconds.
    pub at_ms: u64,
}

impl Presence {
    /// Whether `viewer` is on the access list.
    pub fn allows(&self, viewer: &ViewerId) -> bool {
        self.access.contains(viewer)
    }

    /// Seconds between the record's last write and `now_ms`.
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.at_ms) / 1000
    }

    /// Encodes the record; fails only when it would be over [`MAX_RECORD`].
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        encode(self, MAX_RECORD)
    }

    /// Decodes and validates a record read from Redis.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let p: Presence = decode(bytes, MAX_RECORD)?;
        if p.v != VERSION {
            return Err(RecordError::Invalid("unknown version"));
        }
        if p.local.len() > MAX_LOCAL_ADDRS {
            return Err(RecordError::Invalid("too many local addresses"));
        }
        if p.access.len() > MAX_ACCESS_LIST {
            return Err(RecordError::Invalid("access list too long"));
        }
        Ok(p)
    }
}

/// The camera's answer to a forwarded introduction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The camera accepted and has punched: the viewer may dial.
    Accepted {
        /// The camera's address as its node observed it now.
        camera_observed: SocketAddr,
        /// Its host candidates.
        camera_local: Vec<SocketAddr>,
        /// Round-trip time node↔camera, microseconds.
        camera_rtt_us: u64,
    },
    /// The camera, or its node's access check, said no.
    Declined,
    /// The camera is no longer connected to that node.
    Gone,
    /// The camera did not answer in time, or the node is overloaded.
    Timeout,
}

/// A message on a node's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// To the camera's node: introduce this viewer.
    Intro {
        /// Format version ([`VERSION`]).
        v: u32,
        /// The introduction.
        session: SessionId,
        /// Where to send the [`Signal::Answer`].
        from: NodeId,
        /// The camera asked for.
        camera: CameraId,
        /// The viewer, as named in its certificate.
        viewer: ViewerId,
        /// The viewer's address as its node observed it.
        viewer_observed: SocketAddr,
        /// The viewer's host candidates.
        viewer_local: Vec<SocketAddr>,
        /// Round-trip time node↔viewer, microseconds.
        viewer_rtt_us: u64,
        /// A relay session on the viewer's node, if it offers one.
        relay: Option<RelayOffer>,
    },
    /// Back to the viewer's node: the camera's answer.
    Answer {
        /// Format version ([`VERSION`]).
        v: u32,
        /// The introduction answered.
        session: SessionId,
        /// What the camera said.
        reply: Reply,
    },
}

impl Signal {
    /// Encodes the signal; fails only when it would be over [`MAX_SIGNAL`].
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        encode(self, MAX_SIGNAL)
    }

    /// Decodes and validates a signal read from a channel.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let s: Signal = decode(bytes, MAX_SIGNAL)?;
        match &s {
            Signal::Intro {
                v, viewer_local, ..
            } => {
                if *v != VERSION {
                    return Err(RecordError::Invalid("unknown version"));
                }
                if viewer_local.len() > MAX_LOCAL_ADDRS {
                    return Err(RecordError::Invalid("too many local addresses"));
                }
            }
            Signal::Answer { v, reply, .. } => {
                if *v != VERSION {
                    return Err(RecordError::Invalid("unknown version"));
                }
                if let Reply::Accepted { camera_local, .. } = reply {
                    if camera_local.len() > MAX_LOCAL_ADDRS {
                        return Err(RecordError::Invalid("too many local addresses"));
                    }
                }
            }
        }
        Ok(s)
    }
}

fn encode<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, RecordError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| RecordError::Encode(e.to_string()))?;
    if out.len() > max {
        return Err(RecordError::TooLarge(out.len()));
    }
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, RecordError> {
    if bytes.len() > max {
        return Err(RecordError::TooLarge(bytes.len()));
    }
    let mut cursor = std::io::Cursor::new(bytes);
    let value = ciborium::de::from_reader_with_recursion_limit(&mut cursor, 16)
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    if cursor.position() as usize != bytes.len() {
        return Err(RecordError::Malformed("trailing bytes".into()));
    }
    Ok(value)
}

mod fingerprint {
    use peercam_certs::Fingerprint;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(f: &Fingerprint, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&f.0)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Fingerprint, D::Error> {
        let bytes = serde_bytes_like(d)?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a key fingerprint is 32 bytes"))?;
        Ok(Fingerprint(arr))
    }

    fn serde_bytes_like<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                if v.len() > 32 {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Presence {
        Presence {
            v: VERSION,
            node: NodeId::new("node-a").unwrap(),
            conn: 7,
            key: Fingerprint([0xab; 32]),
            observed: "198.18.0.5:4000".parse().unwrap(),
            local: vec!["198.19.1.2:4000".parse().unwrap()],
            access: vec![ViewerId::new("alice").unwrap()],
            at_ms: 1_700_000_000_000,
        }
    }

    fn intro() -> Signal {
        Signal::Intro {
            v: VERSION,
            session: SessionId([3; 16]),
            from: NodeId::new("node-b").unwrap(),
            camera: CameraId::new("cam-1").unwrap(),
            viewer: ViewerId::new("alice").unwrap(),
            viewer_observed: "198.18.0.9:5000".parse().unwrap(),
            viewer_local: vec![],
            viewer_rtt_us: 250,
            relay: Some(RelayOffer {
                addr: "198.18.0.1:40000".parse().unwrap(),
                token: [9; 16],
            }),
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn node_ids_are_checked() {
        assert!(NodeId::new("rdv-1.eu_west").is_ok());
        for bad in ["", "Node", "a b", "a/b", &"x".repeat(65)] {
            assert!(NodeId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_names() {
        let cam = CameraId::new("cam-1").unwrap();
        let node = NodeId::new("a").unwrap();
        assert_eq!(keys::presence(&cam), "peercam:cam:{cam-1}");
        assert_eq!(keys::owner(&cam), "peercam:owner:{cam-1}");
        assert_eq!(keys::seen(&cam), "peercam:seen:{cam-1}");
        assert_eq!(keys::node(&node), "peercam:node:a");
        assert_eq!(keys::channel(&node), "peercam:chan:a");
        assert_eq!(keys::owner_tag(&node, 12), "a/12");
    }

    #[test]
    fn round_trip() {
        let p = sample();
        assert_eq!(Presence::decode(&p.encode().unwrap()).unwrap(), p);
        let answers = [
            Reply::Accepted {
                camera_observed: "[2001:db8::1]:7".parse().unwrap(),
                camera_local: vec!["198.19.1.2:4000".parse().unwrap()],
                camera_rtt_us: 99,
            },
            Reply::Declined,
            Reply::Gone,
            Reply::Timeout,
        ];
        let mut signals = vec![intro()];
        signals.extend(answers.into_iter().map(|reply| Signal::Answer {
            v: VERSION,
            session: SessionId([1; 16]),
            reply,
        }));
        for s in signals {
            assert_eq!(Signal::decode(&s.encode().unwrap()).unwrap(), s);
        }
    }

    /// Renaming a Rust identifier must not silently change what other nodes read.
    #[test]
    fn golden_bytes() {
        assert_eq!(hex(&sample().encode().unwrap()), GOLDEN_PRESENCE);
        let answer = Signal::Answer {
            v: VERSION,
            session: SessionId([1; 16]),
            reply: Reply::Declined,
        };
        assert_eq!(hex(&answer.encode().unwrap()), GOLDEN_ANSWER);
    }

    const GOLDEN_PRESENCE: &str = concat!(
        "a8617601646e6f6465666e6f64652d6164636f6e6e07636b65795820",
        "abababababababababababababababababababababababababababababababab",
        "686f62736572766564a1625634828418c6120005190fa0656c6f63616c81a16256",
        "34828418c6130102190fa0666163636573738165616c6963656561745f6d731b00",
        "00018bcfe56800"
    );
    const GOLDEN_ANSWER: &str = concat!(
        "a166416e73776572a36176016773657373696f6e50",
        "01010101010101010101010101010101657265706c79684465636c696e6564"
    );

    #[test]
    fn invalid_values_are_refused() {
        let mut p = sample();
        p.v = 2;
        assert!(Presence::decode(&p.encode().unwrap()).is_err());
        let mut p = sample();
        p.local = vec!["198.19.1.2:1".parse().unwrap(); MAX_LOCAL_ADDRS + 1];
        assert!(Presence::decode(&p.encode().unwrap()).is_err());
        let big = vec![0u8; MAX_SIGNAL + 1];
        assert!(matches!(
            Signal::decode(&big),
            Err(RecordError::TooLarge(_))
        ));
        // An upper-case camera ID is not an ID.
        let mut bytes = intro().encode().unwrap();
        let pos = bytes.windows(5).position(|w| w == b"cam-1").unwrap();
        bytes[pos] = b'C';
        assert!(Signal::decode(&bytes).is_err());
        // Trailing bytes.
        let mut bytes = sample().encode().unwrap();
        bytes.push(0);
        assert!(Presence::decode(&bytes).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let goods = [sample().encode().unwrap(), intro().encode().unwrap()];
        for i in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut buf = goods[i % 2].clone();
            if i % 3 == 0 {
                buf = (0..(seed % 96)).map(|k| (seed >> (k % 56)) as u8).collect();
            } else {
                let idx = (seed as usize) % buf.len();
                buf[idx] = (seed >> 32) as u8;
                buf.truncate(((seed >> 40) as usize) % (buf.len() + 1));
            }
            let _ = Presence::decode(&buf);
            let _ = Signal::decode(&buf);
        }
    }
}
