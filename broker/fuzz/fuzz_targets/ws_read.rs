//! The WebSocket read path as the connection engine runs it: frame heads
//! parsed by `wsframe` (with the message size cap) from arbitrary bytes,
//! payloads unmasked, Shoal's fragment assembler, then frame decoding in
//! both encodings. Nothing may panic; no frame and no assembled message
//! may exceed the cap; a refused frame names a close code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_broker::{
    conn::{Assembler, Step},
    wsframe::{parse_head, unmask},
};
use shoal_proto::Encoding;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut asm = Assembler::new(MAX);
    let mut off = 0;
    for _ in 0..64 {
        let head = match parse_head(&buf[off..], MAX) {
            Ok(Some(h)) if h.frame_len() <= buf.len() - off => h,
            Ok(_) => return,
            Err(e) => {
                let _ = e.close_code();
                return;
            }
        };
        assert!(head.payload_len <= MAX, "frame of {} bytes", head.payload_len);
        let payload = &mut buf[off + head.head_len..off + head.frame_len()];
        unmask(payload, head.mask);
        let msg = match asm.feed(head.fin, head.opcode, payload) {
            Step::Whole => payload.to_vec(),
            Step::Reassembled(b) => b.to_vec(),
            Step::Close(_) => return,
            _ => {
                off += head.frame_len();
                continue;
            }
        };
        off += head.frame_len();
        assert!(msg.len() <= MAX, "assembled {} bytes", msg.len());
        for enc in Encoding::ALL {
            let _ = enc.decode_client(&msg);
        }
    }
});
