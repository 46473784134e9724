//! CPU pinning of measured processes (what `taskset -c N` does, without the tool).

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The CPU measured processes run on: the highest-numbered CPU this process may use,
/// when there are at least two (CPU 0 tends to take the machine's interrupts and
/// housekeeping). `None` on a single-CPU machine or when the mask cannot be read.
pub fn measurement_cpu() -> Option<usize> {
    // SAFETY: `set` is a plain bitmask owned by this frame; sched_getaffinity writes at
    // most `size_of::<cpu_set_t>()` bytes into it, the size we pass.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: CPU_ISSET only reads the mask, for indices below CPU_SETSIZE.
    let allowed: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    if allowed.len() < 2 {
        return None;
    }
    allowed.last().copied()
}

/// The CPU for the server side of a client/server workload: the lowest-numbered allowed CPU
/// other than [`measurement_cpu`]; `None` when there is only one.
pub fn server_cpu() -> Option<usize> {
    let client = measurement_cpu()?;
    // SAFETY: as in `measurement_cpu`.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: CPU_ISSET only reads the mask.
    (0..libc::CPU_SETSIZE as usize).find(|&c| c != client && unsafe { libc::CPU_ISSET(c, &set) })
}

/// Makes the child run on `cpu` only, from before its `exec` on, so every thread it
/// ever creates inherits the mask.
pub fn pin_child(cmd: &mut Command, cpu: usize) {
    // SAFETY: the closure runs in the child between fork and exec; it only builds a
    // mask on the stack and makes one system call, both async-signal-safe, and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Moves the calling thread off `cpu` (onto every other CPU it may use), so helper
/// threads of the bench do not compete with the measured processes. Best effort.
pub fn pin_self_away_from(cpu: usize) {
    // SAFETY: as in `measurement_cpu` and `pin_child`: a mask on the stack, read and
    // written only through the libc macros and calls, with its own size. Pid 0 in
    // sched_setaffinity is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return;
        }
        libc::CPU_CLR(cpu, &mut set);
        if libc::CPU_COUNT(&set) > 0 {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}
