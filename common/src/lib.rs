//! What camera-agent, viewer and rendezvous share: identities, the wire protocols (CBOR
//! control messages, binary media framing), TLS and QUIC configuration, H.264 parsing and
//! small pure helpers.
//!
//! Nothing here owns a task or a socket loop; the programs do. The one exception is
//! [`impair`], the test and benchmark link model, whose socket owns its two tasks.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backoff;
pub mod config;
pub mod fec;
pub mod frame;
pub mod going_away;
pub mod h264;
pub mod ids;
pub mod impair;
pub mod media;
pub mod net;
pub mod netcheck;
pub mod quic;
pub mod rdv;
pub mod tls;

pub use ids::{CameraId, SessionId, ViewerId};

/// Wall clock in microseconds since the Unix epoch.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
