#![no_main]
//! A connection driven by arbitrary peer messages and application calls: no panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sdp_proto::fuzzing::drive_connection(data);
});
