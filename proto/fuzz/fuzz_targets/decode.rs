//! Fuzz the frame decoders with arbitrary bytes in both encodings: they must
//! return `Ok` or a typed error, never panic, and whatever decodes must
//! survive an encode/decode round trip unchanged. The cluster-bus payload
//! decoder (bytes read from Redis) and the receivers' `msg` fast path get
//! the same input; the fast path must agree with the full decode on the
//! seq of every frame both accept. And the publish body policy's promise:
//! a `pub` body that `check_body` accepts is delivered intact in a `msg`
//! frame in both encodings and on the bus.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::Encoding;

fuzz_target!(|data: &[u8]| {
    for enc in Encoding::ALL {
        if let Ok(frame) = enc.decode_client(data) {
            let bytes = enc
                .encode_client(&frame)
                .expect("a decoded frame re-encodes");
            assert_eq!(enc.decode_client(&bytes).ok(), Some(frame.clone()));
            if let shoal_proto::ClientFrame::Pub { body, .. } = frame {
                if shoal_proto::check_body(&body, 1 << 20).is_ok() {
                    let msg = shoal_proto::ServerFrame::Msg {
                        room: "r".into(),
                        seq: 1,
                        from: "u".into(),
                        ts: 0,
                        body: body.clone(),
                        kind: None,
                        target: None,
                        reply_to: None,
                        mentions: vec![],
                    };
                    for out in Encoding::ALL {
                        let b = out.encode_server(&msg).expect("an accepted body encodes");
                        assert_eq!(out.decode_server(&b).ok().as_ref(), Some(&msg));
                    }
                    let rec = shoal_proto::bus::BusRecord {
                        ts: 0,
                        from: "u".into(),
                        body,
                        meta: Default::default(),
                    };
                    let b = shoal_proto::bus::encode_record(&rec);
                    assert_eq!(shoal_proto::bus::decode_record(&b).ok(), Some(rec));
                }
            }
        }
        let full = enc.decode_server(data);
        if let Ok(Some((seq, _))) = enc.decode_msg_as::<serde_json::Value>(data) {
            if let Ok(shoal_proto::ServerFrame::Msg { seq: s, .. }) = full {
                assert_eq!(seq, s);
            }
        }
    }
    if let Ok(shoal_proto::bus::BusPayload::Msg { record, .. }) =
        shoal_proto::bus::decode_payload(data)
    {
        let bytes = shoal_proto::bus::encode_record(&record);
        assert_eq!(shoal_proto::bus::decode_record(&bytes).ok(), Some(record));
    }
});
