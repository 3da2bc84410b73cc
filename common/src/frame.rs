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
    /// A frame that had started did not complete in time.
    #[error("frame did not complete in time")]
    Slow,
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
    read_within(r, None).await
}

/// Reads one frame; waiting for a frame to start is unbounded, but once its first byte has
/// arrived the whole frame must arrive within `body_timeout` (a peer trickling a frame
/// byte by byte cannot hold resources).
pub async fn read_within<T, R>(
    r: &mut R,
    body_timeout: Option<std::time::Duration>,
) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut first = [0u8; 1];
    if r.read(&mut first).await.map_err(FrameError::Io)? == 0 {
        return Ok(None);
    }
    let rest = read_rest(r, first[0]);
    match body_timeout {
        None => rest.await.map(Some),
        Some(t) => tokio::time::timeout(t, rest)
            .await
            .map_err(|_| FrameError::Slow)?
            .map(Some),
    }
}

async fn read_rest<T, R>(r: &mut R, first: u8) -> Result<T, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut prefix = [first, 0, 0, 0];
    r.read_exact(&mut prefix[1..])
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode(&body)
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
    async fn a_frame_trickled_too_slowly_is_an_error() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        let r =
            read_within::<u32, _>(&mut server, Some(std::time::Duration::from_millis(50))).await;
        assert!(matches!(r, Err(FrameError::Slow)));
    }

    #[tokio::test]
    async fn round_trip_through_a_stream() {
        let bytes = encode(&("hello".to_string(), 7u32)).expect("encode");
        let mut input: &[u8] = &bytes;
        let back: (String, u32) = read(&mut input).await.expect("read").expect("one frame");
        assert_eq!(back, ("hello".to_string(), 7));
    }
}
