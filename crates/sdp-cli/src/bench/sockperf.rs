//! sockperf ping-pong latency over loopback TCP: 64-byte messages (`sockperf_p50_64`,
//! `sockperf_p99_64`) and 16 KiB messages (`sockperf_p50_16k`), where the copy of the
//! message, not the wake-up, starts to weigh.

use std::time::Duration;

use super::proc::{ChildGuard, Leg, wait_listening};
use super::workloads::Ctx;

/// One repetition with 64-byte messages: `[p50, p99]` in microseconds.
pub fn ping_pong_64(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    ping_pong(ctx, leg, port, 64)
}

/// One repetition with 16 KiB messages: `[p50]` in microseconds (its p99 is the machine's
/// scheduling noise more than libsdp's).
pub fn ping_pong_16k(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    Ok(vec![ping_pong(ctx, leg, port, 16 * 1024)?[0]])
}

/// One repetition: a fresh server on `port`, one client run with `size`-byte messages;
/// returns `[p50, p99]` in microseconds. Both processes run in `leg` (both preloaded in the
/// libsdp leg).
fn ping_pong(ctx: &Ctx, leg: &Leg, port: u16, size: usize) -> Result<Vec<f64>, String> {
    let port_n = port;
    let port = port.to_string();
    let mut srv = leg.command("sockperf", ctx.server_cpu.or(ctx.cpu));
    srv.args(["sr", "--tcp", "-i", "127.0.0.1", "-p", &port]);
    let mut server = ChildGuard::spawn(srv, "sockperf server")?;
    wait_listening(&mut server, port_n, Duration::from_secs(10))?;
    // sockperf already leaves the first 400 ms of a run out of its statistics; its own
    // warm-up stage only adds a fixed two-second sleep, hence --dontwarmup.
    let secs = if ctx.quick { "1" } else { "3" };
    let size = size.to_string();
    // On a loaded machine sockperf sometimes completes no round trip it keeps ("No valid
    // observations found", without libsdp as well): that run measured nothing, so the
    // client runs again, twice at most, against the same server.
    for attempt in 0.. {
        let mut cli = leg.command("sockperf", ctx.cpu);
        cli.args([
            "pp",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port,
            "-m",
            &size,
            "-t",
            secs,
            "--dontwarmup",
        ]);
        let out = ChildGuard::spawn(cli, "sockperf client")?.wait_ok(Duration::from_secs(30))?;
        let p50 = percentile(&out.stdout, "50.000");
        let p99 = percentile(&out.stdout, "99.000");
        match (p50, p99) {
            (Some(a), Some(b)) => return Ok(vec![a, b]),
            _ if attempt < 2 && out.stdout.contains("No valid observations") => {
                eprintln!(
                    "sdp bench: sockperf ({leg}): no valid observations; running the client again"
                );
            }
            _ => {
                return Err(format!(
                    "no percentiles in sockperf's output: {}",
                    out.stdout.lines().last().unwrap_or("")
                ));
            }
        }
    }
    unreachable!("the loop returns")
}

/// The value of `sockperf: ---> percentile 50.000 =   6.719` (microseconds).
fn percentile(output: &str, which: &str) -> Option<f64> {
    output.lines().find_map(|l| {
        let rest = l.split("percentile").nth(1)?;
        let (p, v) = rest.split_once('=')?;
        (p.trim() == which).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_lines_are_parsed() {
        let out = "sockperf: ---> <MAX> observation =  995.410\n\
                   sockperf: ---> percentile 99.999 =  995.410\n\
                   sockperf: ---> percentile 99.000 =   48.496\n\
                   sockperf: ---> percentile 50.000 =   27.625\n";
        assert_eq!(percentile(out, "50.000"), Some(27.625));
        assert_eq!(percentile(out, "99.000"), Some(48.496));
        assert_eq!(percentile(out, "90.000"), None);
    }
}
