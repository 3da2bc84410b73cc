//! Media control messages, the binary GOP/frame headers and parity datagrams (with a
//! recovery driven by their fields), from a hostile camera or viewer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercam_common::fec::{Codecs, ParityHeader};
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
    let datagram = bytes::Bytes::copy_from_slice(data);
    if let Ok((h, row)) = ParityHeader::decode(&datagram) {
        assert_eq!(h.encode(&row), datagram);
        let mut block = vec![0u8; (h.len as usize).min(1 << 16)];
        let holes = [0..block.len().min(row.len() + 7)];
        let parity = [Some(row), None];
        let _ = Codecs::default().recover(&mut block, &holes, h.rows as usize, &parity);
    }
});
