//! `pipe_rw` and `file_rw`: a tight loop of 64-byte `write` + `read` pairs on a pipe and
//! on a file, timed inside a child `sdp` process started with or without the preload.
//! It is the cost every non-socket fd pays for passing through the hooks.
//!
//! The child is this same executable, re-run as `sdp bench` with [`LOOP_ENV`] set to
//! `<pipe|file>:<pairs per batch>:<batches>`; it prints `ns_per_op=<median over
//! batches>` and exits. std's `File`, `PipeReader` and `PipeWriter` call libc's `read`
//! and `write`, the symbols the preload interposes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::proc::{ChildGuard, Leg};
use super::stats::median;
use super::workloads::Ctx;

/// Environment variable that turns `sdp bench` into the measured loop.
pub const LOOP_ENV: &str = "__SDP_BENCH_FDLOOP";

const BUF: usize = 64;

/// No socket: the port the driver hands every workload is unused.
pub fn pipe(ctx: &Ctx, leg: &Leg, _port: u16) -> Result<Vec<f64>, String> {
    run_child(ctx, leg, "pipe")
}

pub fn file(ctx: &Ctx, leg: &Leg, _port: u16) -> Result<Vec<f64>, String> {
    run_child(ctx, leg, "file")
}

fn run_child(ctx: &Ctx, leg: &Leg, kind: &str) -> Result<Vec<f64>, String> {
    // quick: ~0.15 s of looping per repetition; full: ~0.5 s.
    let (pairs, batches) = if ctx.quick {
        (10_000, 15)
    } else {
        (20_000, 25)
    };
    let mut cmd = leg.command(&ctx.sdp_exe, ctx.cpu);
    cmd.arg("bench")
        .env(LOOP_ENV, format!("{kind}:{pairs}:{batches}"));
    let out =
        ChildGuard::spawn(cmd, &format!("sdp {kind} loop"))?.wait_ok(Duration::from_secs(60))?;
    let v = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ns_per_op="))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "the {kind} loop child printed no ns_per_op (is `sdp bench` wired to bench::run?): {}",
                out.stdout.trim()
            )
        })?;
    Ok(vec![v])
}

/// Body of the child process. `spec` is `<pipe|file>:<pairs>:<batches>`.
pub fn child_main(spec: &str) -> Result<(), String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (kind, pairs, batches) = match parts.as_slice() {
        [k, p, b] => (
            *k,
            p.parse::<usize>().map_err(|e| format!("{LOOP_ENV}: {e}"))?,
            b.parse::<usize>().map_err(|e| format!("{LOOP_ENV}: {e}"))?,
        ),
        _ => {
            return Err(format!(
                "{LOOP_ENV}: expected kind:pairs:batches, got {spec}"
            ));
        }
    };
    let mut per_op = Vec::with_capacity(batches);
    match kind {
        "pipe" => {
            let (mut r, mut w) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
            // One discarded batch first: faults in pages, warms caches and branch
            // predictors for both legs alike.
            for i in 0..=batches {
                let t = pipe_batch(&mut r, &mut w, pairs)?;
                if i > 0 {
                    per_op.push(t.as_nanos() as f64 / pairs as f64);
                }
            }
        }
        "file" => {
            let path = scratch_file();
            let opened = open_pair(&path);
            let _ = std::fs::remove_file(&path);
            let (mut w, mut r) = opened?;
            for i in 0..=batches {
                let t = file_batch(&mut r, &mut w, pairs)?;
                if i > 0 {
                    per_op.push(t.as_nanos() as f64 / pairs as f64);
                }
            }
        }
        other => return Err(format!("{LOOP_ENV}: unknown loop {other}")),
    }
    println!("ns_per_op={:.3}", median(&per_op));
    Ok(())
}

fn pipe_batch(
    r: &mut std::io::PipeReader,
    w: &mut std::io::PipeWriter,
    pairs: usize,
) -> Result<Duration, String> {
    let out = [0x5au8; BUF];
    let mut inb = [0u8; BUF];
    let t = Instant::now();
    for _ in 0..pairs {
        // One write(2) and one read(2) per pair: 64 bytes always fit a pipe whole.
        let n = w.write(&out).map_err(|e| format!("pipe write: {e}"))?;
        let m = r.read(&mut inb).map_err(|e| format!("pipe read: {e}"))?;
        if n != BUF || m != BUF {
            return Err(format!("short pipe transfer: wrote {n}, read {m}"));
        }
    }
    Ok(t.elapsed())
}

/// Two descriptions of the same file, each with its own offset: the writer appends
/// 64 bytes, the reader reads them back. Every 1024 pairs both rewind, so the file stays
/// 64 KiB (and the two `lseek`s are 0.2% of the calls).
fn file_batch(r: &mut File, w: &mut File, pairs: usize) -> Result<Duration, String> {
    let out = [0xa5u8; BUF];
    let mut inb = [0u8; BUF];
    let t = Instant::now();
    for i in 0..pairs {
        if i % 1024 == 0 {
            w.seek(SeekFrom::Start(0))
                .map_err(|e| format!("seek: {e}"))?;
            r.seek(SeekFrom::Start(0))
                .map_err(|e| format!("seek: {e}"))?;
        }
        let n = w.write(&out).map_err(|e| format!("file write: {e}"))?;
        let m = r.read(&mut inb).map_err(|e| format!("file read: {e}"))?;
        if n != BUF || m != BUF {
            return Err(format!("short file transfer: wrote {n}, read {m}"));
        }
    }
    Ok(t.elapsed())
}

/// tmpfs when there is one: no journal or writeback in the measured loop.
fn scratch_file() -> PathBuf {
    let dir = ["/dev/shm", "/run/shm"]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("sdp-bench-fdloop-{}", std::process::id()))
}

/// Writer (creates and truncates) and reader of `path`.
fn open_pair(path: &Path) -> Result<(File, File), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    let r = File::open(path).map_err(err)?;
    Ok((w, r))
}
