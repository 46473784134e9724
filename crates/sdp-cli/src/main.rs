//! sdp-cli
fn main() {}
