//! iperf3 TCP throughput over loopback: one stream (`iperf3_1stream`) and eight parallel
//! streams of one client process (`iperf3_8stream`, `-P 8`: eight connections served by one
//! server thread, as many connections per process scale).

use std::time::Duration;

use super::proc::{ChildGuard, Leg, wait_listening};
use super::workloads::Ctx;

/// One repetition of one stream: Gbit/s.
pub fn one_stream(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    transfer(ctx, leg, port, 1)
}

/// One repetition of eight parallel streams: the sum of their throughput, Gbit/s.
pub fn eight_streams(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    transfer(ctx, leg, port, 8)
}

/// One repetition: a one-shot server (`-1`) and a client with `-J` and `streams` parallel
/// connections; returns the receiver's total throughput in Gbit/s. Both processes run in
/// `leg`. The byte count is for all streams together.
fn transfer(ctx: &Ctx, leg: &Leg, port: u16, streams: u32) -> Result<Vec<f64>, String> {
    let port_n = port;
    let port = port.to_string();
    let mut srv = leg.command("iperf3", ctx.server_cpu.or(ctx.cpu));
    srv.args(["-s", "-1", "-p", &port]);
    let mut server = ChildGuard::spawn(srv, "iperf3 server")?;
    wait_listening(&mut server, port_n, Duration::from_secs(10))?;
    // A byte count rather than a duration: iperf3's -t takes whole seconds only.
    let bytes = if ctx.quick { "256M" } else { "1G" };
    let mut cli = leg.command("iperf3", ctx.cpu);
    cli.args(["-c", "127.0.0.1", "-p", &port, "-n", bytes, "-J"]);
    if streams > 1 {
        cli.args(["-P", &streams.to_string()]);
    }
    let out = ChildGuard::spawn(cli, "iperf3 client")?.wait_ok(Duration::from_secs(30))?;
    // The one-shot server exits by itself after the test; the guard kills it otherwise.
    let _ = server.wait(Duration::from_secs(5));
    let bps = received_bits_per_second(&out.stdout)
        .ok_or("no end.sum_received.bits_per_second in iperf3's JSON")?;
    Ok(vec![bps / 1e9])
}

/// `end.sum_received.bits_per_second` of iperf3's `-J` report. The key order of that
/// object is fixed by iperf3, so a scan is enough and spares a JSON dependency.
fn received_bits_per_second(json: &str) -> Option<f64> {
    // Only the final report has a "sum_received" (intervals have "sum").
    let sum = json.rfind("\"sum_received\"")?;
    let obj = &json[sum..sum + json[sum..].find('}')?];
    let key = "\"bits_per_second\"";
    let v = &obj[obj.find(key)? + key.len()..];
    let v = v.trim_start().strip_prefix(':')?.trim_start();
    let n = v
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
        .unwrap_or(v.len());
    v[..n].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_rate_is_found() {
        let j = r#"{"start":{},"intervals":[{"sum":{"bits_per_second":1}}],
            "end":{"streams":[],"sum_sent":{"bytes":9,"bits_per_second":2.25e10,"retransmits":0},
            "sum_received":{"start":0,"end":1.0006,"bytes":9,"bits_per_second":	22000000000.5,"sender":true},
            "cpu_utilization_percent":{}}}"#;
        assert_eq!(received_bits_per_second(j), Some(22000000000.5));
        assert_eq!(received_bits_per_second("{}"), None);
    }
}
