//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same entry
//! points the fuzz targets use, so CI exercises them on stable Rust; then runs a small
//! deterministic mutation loop over the corpus (a stand-in for libFuzzer on stable).

use sdp_proto::fuzzing;
use std::fs;
use std::path::Path;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .collect();
    files.sort_by_key(|e| e.path());
    files
        .into_iter()
        .map(|e| fs::read(e.path()).unwrap())
        .collect()
}

fn target_fn(target: &str) -> fn(&[u8]) {
    match target {
        "parse_message" => fuzzing::parse_message,
        "parse_headers" => fuzzing::parse_headers,
        "parse_hello" => fuzzing::parse_hello,
        "connection" => fuzzing::drive_connection,
        other => panic!("unknown target {other}"),
    }
}

const TARGETS: [&str; 4] = [
    "parse_message",
    "parse_headers",
    "parse_hello",
    "connection",
];

#[test]
fn fuzz_corpus_replays_without_panic() {
    for t in TARGETS {
        let files = corpus(t);
        assert!(!files.is_empty(), "{t} has a seed corpus");
        for f in &files {
            target_fn(t)(f);
            fuzzing::parse_all(f);
        }
    }
}

#[test]
fn fuzz_fuzz_targets_listed_match_corpus_dirs() {
    let manifest =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml")).unwrap();
    for t in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{t}\"")),
            "{t} is a fuzz target"
        );
    }
}

#[test]
fn fuzz_mutations_of_corpus_never_panic() {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let rounds = if cfg!(debug_assertions) {
        3_000
    } else {
        30_000
    };
    for t in TARGETS {
        let files = corpus(t);
        let f = target_fn(t);
        for _ in 0..rounds {
            let mut input = files[(next() % files.len() as u64) as usize].clone();
            for _ in 0..(1 + next() % 4) {
                match next() % 4 {
                    0 if !input.is_empty() => {
                        let i = (next() % input.len() as u64) as usize;
                        input[i] ^= 1 << (next() % 8);
                    }
                    1 if !input.is_empty() => {
                        let i = (next() % input.len() as u64) as usize;
                        input[i] = next() as u8;
                    }
                    2 => input.truncate((next() % (input.len() as u64 + 1)) as usize),
                    _ => {
                        let i = (next() % (input.len() as u64 + 1)) as usize;
                        input.insert(i, next() as u8);
                    }
                }
            }
            f(&input);
        }
    }
}
