//! The Annex B / NAL parser and SPS reading, on hostile video input (stdin, files).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercam_common::h264::{self, AnnexBReader};

fuzz_target!(|data: &[u8]| {
    // Whole-buffer split: concatenating the access units gives back the input.
    if let Ok(aus) = h264::split_access_units(data) {
        let joined: Vec<u8> = aus.iter().flat_map(|a| a.data.iter().copied()).collect();
        assert_eq!(joined, data);
        for au in &aus {
            let _ = h264::stream_params(au);
            let _ = h264::with_parameter_sets(au, &[0x67, 0x42], &[0x68, 0xce]);
        }
    }
    // Incremental reading in uneven chunks.
    let mut reader = AnnexBReader::new();
    let step = 1 + data.first().copied().unwrap_or(7) as usize % 13;
    for chunk in data.chunks(step) {
        let _ = reader.push(chunk);
        while reader.next_access_unit().is_some() {}
    }
    while reader.finish().is_some() {}
});
