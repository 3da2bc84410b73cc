//! Rendezvous control messages and their framing, from a hostile peer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peercam_common::frame::{decode, encode};
use peercam_common::rdv::{FromRendezvous, ToRendezvous};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<ToRendezvous>(data) {
        // Whatever decodes must encode and decode to the same message.
        let bytes = encode(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<ToRendezvous>(&bytes[4..]).expect("round trip"), msg);
    }
    if let Ok(msg) = decode::<FromRendezvous>(data) {
        let bytes = encode(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<FromRendezvous>(&bytes[4..]).expect("round trip"), msg);
    }
    // The async framing reader over the same bytes (length prefix included).
    let rt = tokio_rt();
    rt.block_on(async {
        let mut input = data;
        while let Ok(Some(_)) = peercam_common::frame::read::<ToRendezvous, _>(&mut input).await {}
    });
});

fn tokio_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}
