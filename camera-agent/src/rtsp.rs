//! The RTSP source: H.264 from the camera's own RTSP server (stock firmware, OpenIPC,
//! thingino), through the `retina` client.
//!
//! Asks for RTP over the RTSP TCP connection (no extra ports, no reordering problems),
//! Annex B framing with SPS/PPS before every keyframe, and reconnects with backoff and
//! jitter whenever the server or the connection goes away. Credentials come from the URL
//! and are never logged.

use std::time::Duration;

use futures_util::StreamExt;
use peercam_common::backoff::Backoff;
use peercam_common::config::redact_url;
use peercam_common::h264;
use retina::client::{PlayOptions, Session, SessionOptions, SetupOptions};
use retina::codec::{CodecItem, FrameFormat};
use tracing::{info, warn};

use crate::source::{Framer, SourceError, TIMESCALE};

/// A session that delivered frames this long counts as healthy: the next reconnect is
/// quick.
const HEALTHY: Duration = Duration::from_secs(10);
/// Limit for connecting and for the server's answers.
const RTSP_TIMEOUT: Duration = Duration::from_secs(10);

/// Splits credentials out of an RTSP URL; returns the URL without them (safe to log).
pub(crate) fn parse(
    url: &str,
) -> Result<(url::Url, Option<retina::client::Credentials>), SourceError> {
    let bad = |why: String| SourceError::Rtsp {
        url: redact_url(url),
        why,
    };
    let mut parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.scheme() != "rtsp" {
        return Err(bad("only rtsp:// URLs are supported".into()));
    }
    let creds = if parsed.username().is_empty() {
        None
    } else {
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        Some(retina::client::Credentials {
            username: decode(parsed.username()),
            password: decode(parsed.password().unwrap_or("")),
        })
    };
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    Ok((parsed, creds))
}

/// Runs the RTSP source forever (until cancelled by the caller).
pub(crate) async fn run(url: &str, mut framer: Framer) -> Result<(), SourceError> {
    let (url, creds) = parse(url)?;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let started = tokio::time::Instant::now();
        match session(&url, creds.clone(), &mut framer).await {
            Ok(()) => warn!(source = %url, "RTSP stream ended; reconnecting"),
            Err(e) => warn!(source = %url, error = %e, "RTSP source failed; reconnecting"),
        }
        if started.elapsed() > HEALTHY {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay(rand::random::<f64>().max(0.2))).await;
    }
}

async fn session(
    url: &url::Url,
    creds: Option<retina::client::Credentials>,
    framer: &mut Framer,
) -> Result<(), String> {
    let options = SessionOptions::default().creds(creds).user_agent(format!(
        "peercam camera-agent {}",
        env!("CARGO_PKG_VERSION")
    ));
    let mut described = tokio::time::timeout(RTSP_TIMEOUT, Session::describe(url.clone(), options))
        .await
        .map_err(|_| "DESCRIBE timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let video = described
        .streams()
        .iter()
        .position(|s| s.media() == "video" && s.encoding_name().eq_ignore_ascii_case("h264"))
        .ok_or("the RTSP server offers no H.264 video stream")?;
    let setup = SetupOptions::default().frame_format(FrameFormat::SIMPLE);
    tokio::time::timeout(RTSP_TIMEOUT, described.setup(video, setup))
        .await
        .map_err(|_| "SETUP timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let playing = tokio::time::timeout(RTSP_TIMEOUT, described.play(PlayOptions::default()))
        .await
        .map_err(|_| "PLAY timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut demuxed = playing.demuxed().map_err(|e| e.to_string())?;
    info!(source = %url, "RTSP stream playing");
    loop {
        let item = tokio::time::timeout(RTSP_TIMEOUT, demuxed.next())
            .await
            .map_err(|_| "no data from the RTSP server".to_string())?;
        match item {
            None => return Ok(()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(CodecItem::VideoFrame(frame))) => {
                let pts = (frame.timestamp().elapsed_secs().max(0.0) * TIMESCALE as f64) as u64;
                // One frame is one access unit in Annex B, with SPS/PPS before keyframes.
                match h264::split_access_units(frame.data()) {
                    Ok(aus) => {
                        for au in aus {
                            framer.publish(au, pts);
                        }
                    }
                    Err(e) => warn!(error = %e, "dropped an unreadable frame"),
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_split_out_and_never_shown() {
        let (url, creds) = parse("rtsp://admin:s3cr%40t@192.0.2.7:554/stream1").unwrap();
        assert_eq!(url.as_str(), "rtsp://192.0.2.7:554/stream1");
        let creds = creds.unwrap();
        assert_eq!(
            (creds.username.as_str(), creds.password.as_str()),
            ("admin", "s3cr@t")
        );
        let shown = redact_url("rtsp://admin:s3cr%40t@192.0.2.7:554/stream1");
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(parse("http://x/").is_err());
        let err = parse("rtsp://admin:hunter2@[bad").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
