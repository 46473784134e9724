//! `sdp stat`: the offloaded sockets of running libsdp processes.
//!
//! Placeholder until the library publishes its per-process statistics in shared memory
//! (DESIGN.md §8); then this reads them.

use std::process::ExitCode;

pub fn stat() -> ExitCode {
    println!("no libsdp processes with offloaded sockets");
    ExitCode::SUCCESS
}
