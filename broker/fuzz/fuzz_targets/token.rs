//! Token verification with arbitrary input: a typed error or valid claims,
//! never a panic (JWT parsing is the first thing a stranger reaches).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use shoal_broker::{auth::Auth, Config};

static AUTH: LazyLock<Auth> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join("shoal-fuzz-token");
    let mut cfg = Config::for_tests(dir.clone());
    cfg.auth.jwt_secret = Some("fuzz-secret-fuzz-secret-fuzz-secret-0123".into());
    Auth::from_config(&cfg.auth, &dir).expect("auth")
});

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = AUTH.verify(s);
    }
});
