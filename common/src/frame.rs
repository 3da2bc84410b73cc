//! Length-prefixed CBOR frames: the framing of every control message.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of CBOR. Frames larger
//! than [`MAX_FRAME`] are refused before any allocation, so a hostile peer cannot make us
//! buffer more than that. This module does no I/O policy (timeouts belong to callers).

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest control frame accepted or sent, in bytes (CBOR body, without the prefix).
pub const MAX_FRAME: usize = 64 * 1024;

/// Why a frame could not be read, decoded or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame above [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error("stream error")]
    Io(#[source] std::io::Error),
}

/// Encodes a message into a complete frame (prefix + CBOR).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    ciborium::into_writer(msg, &mut out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes a frame body (without the prefix). Trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut cursor = std::io::Cursor::new(body);
    let msg = ciborium::de::from_reader_with_recursion_limit(&mut cursor, 32)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if cursor.position() as usize != body.len() {
        return Err(FrameError::Malformed("trailing bytes after message".into()));
    }
    Ok(msg)
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
pub async fn read<T, R>(r: &mut R) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut prefix[got..]).await.map_err(FrameError::Io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode(&body).map(Some)
}

/// Writes one frame.
pub async fn write<T, W>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let bytes = encode(msg)?;
    w.write_all(&bytes).await.map_err(FrameError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversized_prefix_is_refused_without_allocating() {
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let err = read::<u32, _>(&mut input).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)));
    }

    #[tokio::test]
    async fn truncated_frames_are_errors() {
        let mut input: &[u8] = &[0, 0, 0, 10, 1];
        assert!(matches!(
            read::<u32, _>(&mut input).await,
            Err(FrameError::Truncated)
        ));
        let mut input: &[u8] = &[0, 0];
        assert!(matches!(
            read::<u32, _>(&mut input).await,
            Err(FrameError::Truncated)
        ));
        let mut empty: &[u8] = &[];
        assert!(read::<u32, _>(&mut empty)
            .await
            .expect("clean end")
            .is_none());
    }

    #[tokio::test]
    async fn round_trip_through_a_stream() {
        let bytes = encode(&("hello".to_string(), 7u32)).expect("encode");
        let mut input: &[u8] = &bytes;
        let back: (String, u32) = read(&mut input).await.expect("read").expect("one frame");
        assert_eq!(back, ("hello".to_string(), 7));
    }
}
