//! Media control messages and the binary GOP/frame headers, from a hostile camera or
//! viewer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercam_common::frame::decode;
use peercam_common::media::{FrameHeader, FromCamera, GopHeader, ToCamera, MAX_FRAME_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<ToCamera>(data);
    let _ = decode::<FromCamera>(data);
    if let Ok(h) = FrameHeader::decode(data) {
        assert!(h.len as usize <= MAX_FRAME_PAYLOAD);
        assert_eq!(FrameHeader::decode(&h.encode()).expect("round trip"), h);
    }
    if let Ok(g) = GopHeader::decode(data) {
        assert_eq!(GopHeader::decode(&g.encode()).expect("round trip"), g);
    }
});
