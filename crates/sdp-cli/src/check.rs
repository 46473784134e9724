//! `sdp check FILE`: parse a policy file and report every mistake.

use std::path::Path;
use std::process::ExitCode;

use conf::{LoadError, Policy};

pub fn check(file: &Path) -> ExitCode {
    match Policy::load(file) {
        Ok(policy) => {
            println!("{}: {} rules OK", file.display(), policy.rule_count());
            ExitCode::SUCCESS
        }
        Err(LoadError::Parse(errors)) => {
            // One `file:line:column: ...` line per error, so editors can jump to each.
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sdp check: {e}");
            ExitCode::FAILURE
        }
    }
}
