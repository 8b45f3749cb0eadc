//! Fuzz the Socket.IO event decoder (`shoal_proto::sio`): an event name
//! and its JSON arguments as a client sends them. It must return a frame
//! or a typed error, never panic; a frame it makes must be one the native
//! decoders accept unchanged (a `pub` body once `check_body` passes, as
//! the broker checks it before sequencing). The server side (event
//! payloads and ack payloads of any server frame) must not panic either.
//!
//! Input: one flags byte (bit 0: in namespace `/chat`), the event name,
//! a NUL, the arguments as a JSON array.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::{
    sio::{ack_payload, client_frame, namespace_prefix, server_event, EventArgs},
    ClientFrame, Encoding,
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let prefix = (flags & 1 == 1).then_some("chat:");
    let (name, args) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b"[]"[..]),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let _ = namespace_prefix(name);
    if let Ok(args) = serde_json::from_slice::<EventArgs>(args) {
        if let Ok(frame) = client_frame(name, args, Some(1), prefix) {
            let accepted = match &frame {
                ClientFrame::Pub { body, .. } => shoal_proto::check_body(body, 1 << 20).is_ok(),
                _ => true,
            };
            if accepted {
                for enc in Encoding::ALL {
                    let b = enc.encode_client(&frame).expect("an event's frame encodes");
                    assert_eq!(enc.decode_client(&b).ok(), Some(frame.clone()));
                }
            }
        }
    }
    for enc in Encoding::ALL {
        if let Ok(f) = enc.decode_server(rest) {
            let _ = server_event(&f, prefix);
            let _ = ack_payload(&f, prefix);
        }
    }
});
