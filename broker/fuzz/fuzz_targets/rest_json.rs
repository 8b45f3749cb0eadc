//! REST request bodies: every body type the API parses, from arbitrary
//! bytes. A bad body must be a 400 error value, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_broker::http::{parse_json, ApiPublish, Credentials};

fuzz_target!(|data: &[u8]| {
    let _ = parse_json::<Credentials>(data);
    let _ = parse_json::<ApiPublish>(data);
});
