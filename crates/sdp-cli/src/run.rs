//! `sdp run [--conf FILE] [--lib PATH] -- PROG ARGS…`: exec a program with libsdp preloaded.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use conf::{LoadError, Policy};

pub fn run(conf_file: Option<PathBuf>, lib: Option<PathBuf>, command: Vec<OsString>) -> ExitCode {
    match prepare(conf_file, lib, command) {
        Ok(mut cmd) => {
            // exec only returns on failure; on success the program replaces us, keeping the pid.
            let err = cmd.exec();
            let prog = cmd.get_program().to_string_lossy().into_owned();
            eprintln!("sdp run: cannot run {prog}: {err}");
            // The shell's conventions: 127 not found, 126 found but not runnable.
            ExitCode::from(if err.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
        Err(msg) => {
            eprintln!("sdp run: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the command: everything but the exec, so it can fail with a clear message first.
fn prepare(
    conf_file: Option<PathBuf>,
    lib: Option<PathBuf>,
    command: Vec<OsString>,
) -> Result<Command, String> {
    let mut args = command.into_iter();
    let prog = args
        .next()
        .ok_or("no program given: sdp run [--conf FILE] -- PROG ARGS...")?;

    let lib = library_path(lib)?;
    let mut cmd = Command::new(&prog);
    cmd.args(args);
    let existing = std::env::var_os("LD_PRELOAD");
    cmd.env("LD_PRELOAD", ld_preload(&lib, existing.as_deref()));

    if let Some(file) = conf_file {
        let abs = absolute(&file)?;
        match Policy::load(&abs) {
            Ok(_) => {}
            Err(e @ LoadError::Io { .. }) => return Err(format!("--conf: {e}")),
            Err(LoadError::Parse(errors)) => {
                // Still run: that is what the library does with a broken file (every socket
                // stays TCP), and what a user testing that behaviour wants.
                eprintln!("{errors}");
                eprintln!(
                    "sdp run: warning: {} has errors; libsdp will keep every socket on TCP",
                    file.display()
                );
            }
        }
        cmd.env("LIBSDP_CONFIG_FILE", abs);
    }
    Ok(cmd)
}

/// The absolute path of libsdp.so: `--lib`, or the one next to this executable.
/// LINUX: ld.so resolves a relative LD_PRELOAD entry against the cwd of every exec, so a
/// relative path breaks as soon as the program changes directory.
fn library_path(lib: Option<PathBuf>) -> Result<PathBuf, String> {
    let path = match lib {
        Some(l) => absolute(&l)?,
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find the sdp executable: {e}"))?;
            let dir = exe.parent().ok_or("the sdp executable has no directory")?;
            let so = dir.join("libsdp.so");
            if !so.is_file() {
                return Err(format!(
                    "libsdp.so not found next to the sdp executable ({}); build it with \
                     `cargo build --release` or pass --lib PATH",
                    so.display()
                ));
            }
            so
        }
    };
    if !path.is_file() {
        return Err(format!("--lib {}: no such file", path.display()));
    }
    Ok(path)
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// `lib` first, then the entries already there (without a second copy of `lib`).
fn ld_preload(lib: &Path, existing: Option<&OsStr>) -> OsString {
    let mut out = OsString::from(lib.as_os_str());
    if let Some(existing) = existing {
        for entry in existing
            .as_bytes()
            .split(|&b| b == b':' || b == b' ')
            .filter(|e| !e.is_empty())
        {
            if entry != lib.as_os_str().as_bytes() {
                out.push(":");
                out.push(OsStr::from_bytes(entry));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ld_preload_prepends_and_dedups() {
        let lib = Path::new("/opt/libsdp.so");
        assert_eq!(ld_preload(lib, None), "/opt/libsdp.so");
        assert_eq!(ld_preload(lib, Some(OsStr::new(""))), "/opt/libsdp.so");
        assert_eq!(
            ld_preload(lib, Some(OsStr::new("/a.so"))),
            "/opt/libsdp.so:/a.so"
        );
        assert_eq!(
            ld_preload(lib, Some(OsStr::new("/a.so /b.so"))),
            "/opt/libsdp.so:/a.so:/b.so"
        );
        assert_eq!(
            ld_preload(lib, Some(OsStr::new("/opt/libsdp.so:/a.so"))),
            "/opt/libsdp.so:/a.so"
        );
    }
}
