//! The WebSocket read path as the broker configures it: the mask check,
//! fastwebsockets' server-side frame reader (auto-close and auto-pong off, message size cap)
//! over arbitrary bytes, then Shoal's fragment assembler, then frame
//! decoding in both encodings. Nothing may panic; the assembler may never
//! hand out a message over the cap.
#![no_main]

use fastwebsockets::{after_handshake_split, Role};
use libfuzzer_sys::fuzz_target;
use shoal_broker::conn::{Assembler, Step};
use shoal_proto::Encoding;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let masked_only = shoal_broker::maskcheck::MaskCheck::new(data, flag);
        let (mut rd, _) = after_handshake_split(masked_only, tokio::io::sink(), Role::Server);
        rd.set_auto_close(false);
        rd.set_auto_pong(false);
        rd.set_max_message_size(MAX + 1);
        let mut send = |_f: fastwebsockets::Frame<'_>| {
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        };
        let mut asm = Assembler::new(MAX);
        for _ in 0..64 {
            let Ok(frame) = rd.read_frame(&mut send).await else {
                return;
            };
            let msg = match asm.feed(frame.fin, frame.opcode, &frame.payload) {
                Step::Whole => frame.payload.to_vec(),
                Step::Reassembled(b) => b.to_vec(),
                Step::Close(_) => return,
                _ => continue,
            };
            assert!(msg.len() <= MAX, "assembled {} bytes", msg.len());
            for enc in Encoding::ALL {
                let _ = enc.decode_client(&msg);
            }
        }
    });
});
