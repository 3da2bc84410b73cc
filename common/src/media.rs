//! The media protocol (ALPN `peercam-media/1`), viewer ↔ camera, end to end.
//!
//! The viewer dials the camera and opens one bidirectional control stream carrying
//! [`ToCamera`] / [`FromCamera`] CBOR frames. The camera then opens one unidirectional
//! stream per GOP: a [`GopHeader`] followed by frames, each a fixed binary [`FrameHeader`]
//! and the Annex B bytes of one access unit. Binary, not CBOR, because it is the hot path
//! and the layout is fixed. This module encodes and decodes; it does not schedule.

use bytes::{Buf, BufMut, Bytes};
use serde::{Deserialize, Serialize};

use crate::ids::SessionId;

/// ALPN of the media protocol.
pub const ALPN: &[u8] = b"peercam-media/1";

/// Largest access unit carried, in bytes (a 4K IDR frame fits easily).
pub const MAX_FRAME_PAYLOAD: usize = 16 * 1024 * 1024;

/// QUIC application close codes on media connections.
pub mod close {
    /// Normal close (viewer done, camera stopping).
    pub const OK: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 1;
    /// The viewer is not on the camera's access list (or its session is unknown).
    pub const ACCESS_DENIED: u32 = 2;
    /// The camera has as many viewers as it will serve.
    pub const TOO_MANY_VIEWERS: u32 = 3;
    /// The camera is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// The source ended.
    pub const SOURCE_ENDED: u32 = 5;
}

/// Stream error code a camera uses to reset a GOP stream that fell behind.
pub const RESET_STALE_GOP: u32 = 1;

/// Viewer → camera control messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCamera {
    /// First message: which introduction this connection belongs to.
    Hello {
        /// The session the rendezvous assigned.
        session: SessionId,
    },
    /// Clock probe; the camera answers with `Pong`.
    Ping {
        /// Echoed back.
        id: u64,
        /// Viewer's wall clock, microseconds since the Unix epoch.
        viewer_time_us: u64,
    },
}

/// Camera → viewer control messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromCamera {
    /// Codec parameters of the stream; GOP streams follow.
    StreamInfo(StreamInfo),
    /// Answer to `Ping`.
    Pong {
        /// The ping's id.
        id: u64,
        /// The ping's viewer time, echoed.
        viewer_time_us: u64,
        /// Camera's wall clock when answering, microseconds since the Unix epoch.
        camera_time_us: u64,
    },
    /// The camera will not serve this viewer.
    Refused {
        /// A sentence for the user.
        message: String,
    },
}

/// Codec parameters sent before any video.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Always `h264` for now.
    pub codec: String,
    /// Picture width in pixels.
    pub width: u32,
    /// Picture height in pixels.
    pub height: u32,
    /// Units per second of `pts` (90 000).
    pub timescale: u32,
    /// Nominal frame rate in thousandths (25 fps = 25 000).
    pub fps_milli: u32,
    /// Sequence parameter set (NAL without start code).
    #[serde(with = "serde_bytes_vec")]
    pub sps: Vec<u8>,
    /// Picture parameter set (NAL without start code).
    #[serde(with = "serde_bytes_vec")]
    pub pps: Vec<u8>,
}

mod serde_bytes_vec {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Vec<u8>, A::Error> {
                Err(A::Error::custom("expected a byte string"))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// First bytes of every GOP stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GopHeader {
    /// GOP sequence number, +1 per GOP the camera produced (gaps mean skipped GOPs).
    pub seq: u64,
}

impl GopHeader {
    /// Encoded size.
    pub const LEN: usize = 10;
    const MAGIC: [u8; 2] = *b"G1";

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..2].copy_from_slice(&Self::MAGIC);
        out[2..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    /// Decodes the header.
    pub fn decode(mut b: &[u8]) -> Result<Self, MediaError> {
        if b.len() < Self::LEN || b[..2] != Self::MAGIC {
            return Err(MediaError::BadGopHeader);
        }
        b.advance(2);
        Ok(GopHeader { seq: b.get_u64() })
    }
}

/// Frame flag: the frame is an IDR (a decoder can start here).
pub const FLAG_KEYFRAME: u8 = 0x01;

/// Frame flag: the frame comes from the camera's GOP cache (sent at once to a new viewer,
/// so its age says nothing about the link's latency).
pub const FLAG_CACHED: u8 = 0x02;

/// The fixed header in front of each frame on a GOP stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// Flags (`FLAG_*`).
    pub flags: u8,
    /// Presentation time in `timescale` units.
    pub pts: u64,
    /// Camera wall clock at capture, microseconds since the Unix epoch.
    pub capture_us: u64,
}

impl FrameHeader {
    /// Encoded size.
    pub const LEN: usize = 21;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut b = &mut out[..];
        b.put_u32(self.len);
        b.put_u8(self.flags);
        b.put_u64(self.pts);
        b.put_u64(self.capture_us);
        out
    }

    /// Decodes and checks the header.
    pub fn decode(mut b: &[u8]) -> Result<Self, MediaError> {
        if b.len() < Self::LEN {
            return Err(MediaError::Truncated);
        }
        let h = FrameHeader {
            len: b.get_u32(),
            flags: b.get_u8(),
            pts: b.get_u64(),
            capture_us: b.get_u64(),
        };
        if h.len as usize > MAX_FRAME_PAYLOAD {
            return Err(MediaError::FrameTooLarge(h.len as usize));
        }
        Ok(h)
    }

    /// Whether the frame is a keyframe.
    pub fn is_keyframe(&self) -> bool {
        self.flags & FLAG_KEYFRAME != 0
    }

    /// Whether the frame was sent from the camera's GOP cache.
    pub fn is_cached(&self) -> bool {
        self.flags & FLAG_CACHED != 0
    }
}

/// One video frame as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Presentation time (90 kHz).
    pub pts: u64,
    /// Camera wall clock at capture, microseconds since the Unix epoch.
    pub capture_us: u64,
    /// Whether this is an IDR frame.
    pub keyframe: bool,
    /// Annex B bytes of one access unit.
    pub data: Bytes,
}

impl Frame {
    /// The header that goes in front of this frame.
    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            len: self.data.len() as u32,
            flags: if self.keyframe { FLAG_KEYFRAME } else { 0 },
            pts: self.pts,
            capture_us: self.capture_us,
        }
    }
}

/// Errors decoding media framing.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The GOP stream does not start with a valid header.
    #[error("GOP stream does not start with a valid header")]
    BadGopHeader,
    /// Not enough bytes.
    #[error("truncated frame header")]
    Truncated,
    /// A frame above [`MAX_FRAME_PAYLOAD`].
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_golden_and_round_trip() {
        let h = FrameHeader {
            len: 0x0002_0304,
            flags: FLAG_KEYFRAME,
            pts: 90_000,
            capture_us: 1_700_000_000_000_000,
        };
        let bytes = h.encode();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "00020304010000000000015f9000060a24181e4000");
        assert_eq!(FrameHeader::decode(&bytes).expect("decode"), h);
        assert_eq!(
            GopHeader { seq: 258 }.encode(),
            [b'G', b'1', 0, 0, 0, 0, 0, 0, 1, 2]
        );
    }

    #[test]
    fn bad_media_headers_are_errors() {
        assert!(FrameHeader::decode(&[0; 5]).is_err());
        let mut big = [0u8; FrameHeader::LEN];
        big[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            FrameHeader::decode(&big),
            Err(MediaError::FrameTooLarge(_))
        ));
        assert!(GopHeader::decode(b"XX12345678").is_err());
        assert!(GopHeader::decode(b"G1").is_err());
    }

    #[test]
    fn control_messages_round_trip() {
        let info = FromCamera::StreamInfo(StreamInfo {
            codec: "h264".into(),
            width: 640,
            height: 360,
            timescale: 90_000,
            fps_milli: 25_000,
            sps: vec![0x67, 1, 2],
            pps: vec![0x68, 3],
        });
        let bytes = crate::frame::encode(&info).expect("encode");
        assert_eq!(
            crate::frame::decode::<FromCamera>(&bytes[4..]).expect("decode"),
            info
        );
    }
}
