//! The rendezvous protocol (ALPN `peercam-rdv/1`): one message enum per direction.
//!
//! A camera or viewer opens one bidirectional stream after the handshake and exchanges
//! [`ToRendezvous`] / [`FromRendezvous`] frames on it (see `frame`). Who the peer is comes
//! from its certificate, never from a message. This module defines the messages only; the
//! rules that act on them live in the `rendezvous` crate.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{CameraId, SessionId, ViewerId};

/// ALPN of the rendezvous protocol.
pub const ALPN: &[u8] = b"peercam-rdv/1";

/// First bytes of the packet a camera sends to its relay address to announce itself,
/// followed by the 16-byte token of the [`RelayOffer`].
pub const RELAY_HELLO: &[u8] = b"peercam-relay";

/// A relay session offered to a camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayOffer {
    /// Where the camera announces itself and sends relayed packets.
    pub addr: SocketAddr,
    /// Proof of the camera's announcement.
    #[serde(with = "crate::ids::serde_bytes16")]
    pub token: [u8; 16],
}

/// Most local addresses a peer may announce.
pub const MAX_LOCAL_ADDRS: usize = 16;
/// Most entries in a camera's access list.
pub const MAX_ACCESS_LIST: usize = 1024;

/// QUIC application close codes used on rendezvous connections.
pub mod close {
    /// Normal close.
    pub const OK: u32 = 0;
    /// The peer sent a malformed, oversized or unexpected message.
    pub const PROTOCOL: u32 = 1;
    /// The peer's certificate has a role that may not do this.
    pub const WRONG_ROLE: u32 = 2;
    /// Another key already holds this camera ID.
    pub const ID_TAKEN: u32 = 3;
    /// The rendezvous is shutting down: reconnect (with backoff).
    pub const SHUTDOWN: u32 = 4;
    /// The same camera registered again from a newer connection.
    pub const REPLACED: u32 = 5;
    /// Too many connections or requests.
    pub const BUSY: u32 = 6;
}

/// Protocol version a camera-agent announces in [`Capabilities::version`].
pub const AGENT_VERSION: u32 = 2;
/// First agent version that understands [`FromRendezvous::GoingAway`]; older cameras get
/// only the `SHUTDOWN` close, as before (sending it to them would make them reconnect
/// while this process still drains, measured worse than not sending it).
pub const GOING_AWAY_SINCE: u32 = 2;

/// What a camera can do, announced at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Codecs the camera streams (e.g. `h264`).
    pub codecs: Vec<String>,
    /// Protocol version of the agent.
    pub version: u32,
}

/// Messages from a camera or viewer to the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToRendezvous {
    /// Camera: register the ID in my certificate.
    Register {
        /// Host candidates (LAN interface addresses with the agent's port).
        local_addrs: Vec<SocketAddr>,
        /// Viewers allowed to connect.
        access: Vec<ViewerId>,
        /// What I can stream.
        caps: Capabilities,
    },
    /// Camera: replace my access list.
    SetAccess {
        /// Viewers allowed to connect.
        access: Vec<ViewerId>,
    },
    /// Viewer: introduce me to a camera.
    Connect {
        /// The camera wanted.
        camera: CameraId,
        /// Host candidates of the viewer.
        local_addrs: Vec<SocketAddr>,
    },
    /// Camera: I accept this introduction and have sent my punch packets.
    Accept {
        /// The introduction answered.
        session: SessionId,
        /// Host candidates of the camera (may have changed since registration).
        local_addrs: Vec<SocketAddr>,
    },
    /// Camera: I refuse this introduction.
    Decline {
        /// The introduction answered.
        session: SessionId,
    },
    /// Any (netcheck): what address do you see me at?
    WhoAmI,
    /// Viewer: the introduction `session` ended in a connection to the camera over `path`.
    /// Sent once per session, on the connection that asked for it; counted only for
    /// sessions the rendezvous brokered for this viewer. No answer.
    Report {
        /// The introduction reported on (from `PeerReady`).
        session: SessionId,
        /// How the viewer reached the camera.
        path: PathKind,
    },
}

/// How a viewer reached a camera, as reported to the rendezvous (metrics only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PathKind {
    /// A host candidate on the viewer's link.
    Lan,
    /// A public or server-reflexive address, through the NATs.
    Direct,
    /// The rendezvous' relay.
    Relay,
}

impl PathKind {
    /// Every kind, in the order metrics list them.
    pub const ALL: [PathKind; 3] = [PathKind::Direct, PathKind::Lan, PathKind::Relay];

    /// The lowercase name (`lan`, `direct`, `relay`), as shown to users and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Lan => "lan",
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
        }
    }
}

/// Why the rendezvous could not introduce a viewer to a camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The camera is unknown or this viewer may not view it. Both cases get this same
    /// answer, so that IDs cannot be probed.
    Unavailable,
    /// The camera is known, this viewer is allowed, but it is not connected now.
    Offline {
        /// Seconds since it was last connected.
        last_seen_secs: u64,
    },
    /// The camera did not answer the introduction in time.
    Timeout,
    /// The camera declined (its own access list said no).
    Declined,
    /// Too many requests: wait before asking again.
    RateLimited {
        /// Suggested wait in milliseconds.
        retry_after_ms: u64,
    },
    /// The request is not valid for this peer's role or state.
    BadRequest,
}

/// Messages from the rendezvous to a camera or viewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromRendezvous {
    /// Camera: you are registered.
    Registered {
        /// Your address as the rendezvous sees it (server-reflexive candidate).
        observed: SocketAddr,
    },
    /// Camera: a viewer wants to connect; punch towards it, then `Accept`.
    Introduce {
        /// This introduction.
        session: SessionId,
        /// The viewer, as named in its certificate.
        viewer: ViewerId,
        /// The viewer's address as the rendezvous sees it.
        viewer_observed: SocketAddr,
        /// The viewer's host candidates.
        viewer_local: Vec<SocketAddr>,
        /// Round-trip time rendezvous↔viewer, microseconds.
        viewer_rtt_us: u64,
        /// A relay session, if the rendezvous offers one: announce yourself to it too.
        relay: Option<RelayOffer>,
    },
    /// Viewer: the camera is ready; dial it now.
    PeerReady {
        /// This introduction.
        session: SessionId,
        /// The camera's address as the rendezvous sees it.
        camera_observed: SocketAddr,
        /// The camera's host candidates.
        camera_local: Vec<SocketAddr>,
        /// Round-trip time rendezvous↔camera, microseconds.
        camera_rtt_us: u64,
        /// The relay address to dial if no direct path works.
        relay: Option<SocketAddr>,
    },
    /// Viewer: the introduction failed.
    Refused {
        /// Why.
        reason: Refusal,
    },
    /// Any: the answer to `WhoAmI`.
    YouAre {
        /// The sender's address as the rendezvous sees it.
        observed: SocketAddr,
        /// A second port of this rendezvous, on the same address, to ask again: a different
        /// answer there means the NAT's mapping depends on the destination.
        probe_port: Option<u16>,
    },
    /// Any: the previous request was malformed or not allowed for your role.
    Error {
        /// A sentence for logs.
        message: String,
    },
    /// Camera: this rendezvous is shutting down (a `SHUTDOWN` close follows). Wait a
    /// uniformly random delay in `[0, reconnect_within_ms]` before the first reconnect,
    /// so that the fleet comes back at a rate the rendezvous sustains
    /// (`going_away`). Sent last on the stream, only to cameras that announced version
    /// [`GOING_AWAY_SINCE`] or later (an older one would fail to decode it).
    GoingAway {
        /// The window to spread the first reconnect over, in milliseconds.
        reconnect_within_ms: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode};

    fn samples() -> Vec<ToRendezvous> {
        let viewer = ViewerId::new("alice").expect("id");
        vec![
            ToRendezvous::Register {
                local_addrs: vec!["198.19.1.2:4000".parse().expect("addr")],
                access: vec![viewer],
                caps: Capabilities {
                    codecs: vec!["h264".into()],
                    version: 1,
                },
            },
            ToRendezvous::Connect {
                camera: CameraId::new("cam-1").expect("id"),
                local_addrs: vec![],
            },
            ToRendezvous::Accept {
                session: SessionId([7; 16]),
                local_addrs: vec!["[::1]:5".parse().expect("addr")],
            },
            ToRendezvous::Report {
                session: SessionId([9; 16]),
                path: PathKind::Relay,
            },
        ]
    }

    #[test]
    fn round_trip() {
        for msg in samples() {
            let bytes = encode(&msg).expect("encode");
            assert_eq!(decode::<ToRendezvous>(&bytes[4..]).expect("decode"), msg);
        }
        for reply in [
            FromRendezvous::Refused {
                reason: Refusal::Offline { last_seen_secs: 9 },
            },
            FromRendezvous::GoingAway {
                reconnect_within_ms: 5000,
            },
            FromRendezvous::GoingAway {
                reconnect_within_ms: u64::MAX,
            },
        ] {
            let bytes = encode(&reply).expect("encode");
            assert_eq!(
                decode::<FromRendezvous>(&bytes[4..]).expect("decode"),
                reply
            );
        }
    }

    /// Renaming a Rust identifier must not silently change the wire.
    #[test]
    fn golden_bytes() {
        let msg = ToRendezvous::Connect {
            camera: CameraId::new("cam-1").expect("id"),
            local_addrs: vec!["198.19.1.2:4000".parse().expect("addr")],
        };
        let hex: String = encode(&msg)
            .expect("encode")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, GOLDEN_CONNECT);
        let refused = FromRendezvous::Refused {
            reason: Refusal::Unavailable,
        };
        let hex: String = encode(&refused)
            .expect("encode")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, GOLDEN_REFUSED);
        let report = ToRendezvous::Report {
            session: SessionId([1; 16]),
            path: PathKind::Direct,
        };
        assert_eq!(hex_of(&report), GOLDEN_REPORT);
        let going = FromRendezvous::GoingAway {
            reconnect_within_ms: 5000,
        };
        let hex: String = encode(&going)
            .expect("encode")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, GOLDEN_GOING_AWAY);
        for (kind, name) in [
            (PathKind::Lan, "Lan"),
            (PathKind::Direct, "Direct"),
            (PathKind::Relay, "Relay"),
        ] {
            let bytes = encode(&kind).expect("encode");
            assert!(bytes.ends_with(name.as_bytes()), "{kind:?}: {bytes:02x?}");
        }
    }

    fn hex_of(msg: &ToRendezvous) -> String {
        encode(msg)
            .expect("encode")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    const GOLDEN_CONNECT: &str = "00000032a167436f6e6e656374a26663616d6572616563616d2d316b6c6f63616c5f616464727381a1625634828418c6130102190fa0";
    const GOLDEN_REFUSED: &str =
        "0000001da16752656675736564a166726561736f6e6b556e617661696c61626c65";

    /// `{"GoingAway": {"reconnect_within_ms": 5000}}`.
    const GOLDEN_GOING_AWAY: &str =
        "00000023a169476f696e6741776179a1737265636f6e6e6563745f77697468696e5f6d73191388";
    const GOLDEN_REPORT: &str = "0000002ea1665265706f7274a26773657373696f6e5001010101010101010101010101010101647061746866446972656374";

    /// What a camera-agent from before `GoingAway` sees: a decode error (it then ends the
    /// session and reconnects with its backoff, as after the `SHUTDOWN` close that
    /// follows), never a panic and never a wrong message.
    #[test]
    fn going_away_is_an_error_for_older_peers() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        enum OldFromRendezvous {
            Registered { observed: SocketAddr },
            Error { message: String },
        }
        let bytes = encode(&FromRendezvous::GoingAway {
            reconnect_within_ms: 5000,
        })
        .expect("encode");
        assert!(matches!(
            decode::<OldFromRendezvous>(&bytes[4..]),
            Err(crate::frame::FrameError::Malformed(_))
        ));
    }

    #[test]
    fn path_kinds_round_trip_and_name_themselves() {
        for kind in PathKind::ALL {
            let msg = ToRendezvous::Report {
                session: SessionId([3; 16]),
                path: kind,
            };
            let bytes = encode(&msg).expect("encode");
            assert_eq!(decode::<ToRendezvous>(&bytes[4..]).expect("decode"), msg);
        }
        let names: Vec<_> = PathKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, ["direct", "lan", "relay"]);
    }

    #[test]
    fn invalid_ids_in_messages_are_refused() {
        let msg = ToRendezvous::Connect {
            camera: CameraId::new("cam-1").expect("id"),
            local_addrs: vec![],
        };
        let mut bytes = encode(&msg).expect("encode");
        let pos = bytes
            .windows(5)
            .position(|w| w == b"cam-1")
            .expect("id present");
        bytes[pos] = b'C'; // upper case: not a valid ID
        assert!(decode::<ToRendezvous>(&bytes[4..]).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let good = encode(&samples()[0]).expect("encode");
        for i in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut buf = good[4..].to_vec();
            if i % 2 == 0 {
                // mutate a valid message
                let idx = (seed as usize) % buf.len();
                buf[idx] = (seed >> 32) as u8;
                buf.truncate(((seed >> 40) as usize) % (buf.len() + 1));
            } else {
                buf = (0..(seed % 64)).map(|k| (seed >> (k % 56)) as u8).collect();
            }
            let _ = decode::<ToRendezvous>(&buf);
            let _ = decode::<FromRendezvous>(&buf);
        }
    }
}
