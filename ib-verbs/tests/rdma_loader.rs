//! The `rdma` provider on a machine without RDMA: every way of "no RDMA here" is a clean
//! `available() == false` with a reason, never a crash or a link failure.

use std::path::Path;
use std::process::Command;

use ib_verbs::rdma::{self, Unavailable, dl::LoadError};

fn has_rdma_device() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

fn libibverbs_installed() -> bool {
    rdma::probe_library(rdma::dl::LIBIBVERBS).is_ok()
}

#[test]
fn loader_missing_library_is_unavailable_not_a_crash() {
    match rdma::probe_library("libibverbs-not-installed.so.1") {
        Err(Unavailable::Library(LoadError::NoLibrary(msg))) => assert!(!msg.is_empty()),
        other => panic!("expected NoLibrary, got {other:?}"),
    }
}

#[test]
fn loader_library_without_verbs_symbols_is_unavailable() {
    // libc is loadable but is not libibverbs: the first missing symbol is named.
    match rdma::probe_library("libc.so.6") {
        Err(Unavailable::Library(LoadError::NoSymbol(s))) => assert!(s.starts_with("ibv_")),
        other => panic!("expected NoSymbol, got {other:?}"),
    }
}

#[test]
fn loader_no_device_is_unavailable_with_reason() {
    if has_rdma_device() {
        println!(
            "SKIP loader_no_device_is_unavailable_with_reason: this machine has an RDMA device"
        );
        return;
    }
    assert!(!rdma::available());
    let e = rdma::probe().unwrap_err();
    if libibverbs_installed() {
        // Present but no device: ENOSYS (no kernel support) or an empty list.
        assert!(matches!(e, Unavailable::NoDevice(_)), "{e:?}");
    } else {
        println!("note: libibverbs1 not installed, so only the missing-library path ran");
        assert!(matches!(e, Unavailable::Library(_)), "{e:?}");
    }
    assert!(e.to_string().starts_with("no-device"), "{e}");
    // Asked again (devices may appear): the same clean answer.
    assert!(!rdma::available());
}

#[test]
fn selftest_without_device_exits_77_no_device() {
    if has_rdma_device() {
        println!(
            "SKIP selftest_without_device_exits_77_no_device: this machine has an RDMA device"
        );
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rdma-selftest"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("no-device"), "{all}");
}

#[test]
fn libsdp_has_no_needed_rdma_library() {
    let so = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libsdp.so");
    if !so.exists() {
        println!(
            "SKIP libsdp_has_no_needed_rdma_library: {} not built",
            so.display()
        );
        return;
    }
    let out = match Command::new("readelf").arg("-d").arg(&so).output() {
        Ok(o) => o,
        Err(e) => {
            println!("SKIP libsdp_has_no_needed_rdma_library: no readelf ({e})");
            return;
        }
    };
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(NEEDED)"),
        "readelf output without NEEDED entries:\n{text}"
    );
    for l in text.lines().filter(|l| l.contains("(NEEDED)")) {
        assert!(
            !l.contains("ibverbs") && !l.contains("rdmacm"),
            "libsdp.so links an rdma library: {l}"
        );
    }
}
