#![no_main]
//! SDP parsers over arbitrary bytes: no panic, and what parses re-emits identically.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sdp_proto::fuzzing::parse_headers(data);
});
