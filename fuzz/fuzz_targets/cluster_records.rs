//! What a rendezvous node reads back from Redis in cluster mode (presence records and
//! channel signals), as if another writer to Redis were hostile.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercam_rendezvous::cluster::{Presence, Signal};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Presence::decode(data) {
        // Whatever decodes must encode and decode to the same record.
        let bytes = record.encode().expect("a decoded record encodes");
        assert_eq!(Presence::decode(&bytes).expect("round trip"), record);
    }
    if let Ok(signal) = Signal::decode(data) {
        let bytes = signal.encode().expect("a decoded signal encodes");
        assert_eq!(Signal::decode(&bytes).expect("round trip"), signal);
    }
});
