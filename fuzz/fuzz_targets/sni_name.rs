//! Fuzzes the AUTO_PASSTHROUGH name decoder: never a panic, and whatever
//! decodes encodes back to the same name (up to ASCII case).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::sni::SniName;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(n) = SniName::decode(s) {
        assert_eq!(n.encode(), s.to_ascii_lowercase());
    }
});
