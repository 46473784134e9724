//! `redis_get` and `redis_set`: redis-benchmark throughput against a redis-server the
//! bench starts on its own port, without persistence (`--save '' --appendonly no`).
//! Both processes run in the leg (both preloaded in the libsdp leg), on the same CPU.

use std::time::Duration;

use super::proc::{ChildGuard, Leg, wait_listening};
use super::workloads::Ctx;

/// Parallel connections of redis-benchmark (its default, and issue 6's definition of
/// the metric). No pipelining (`-P 1`): one request per round trip, the case a faster
/// transport should show.
const CLIENTS: &str = "50";

/// One repetition: a fresh server, one `redis-benchmark -t set,get` run; returns
/// `[get, set]` in requests per second.
pub fn get_set(ctx: &Ctx, leg: &Leg, port: u16) -> Result<Vec<f64>, String> {
    let port_s = port.to_string();
    let mut srv = leg.command("redis-server", ctx.server_cpu.or(ctx.cpu));
    srv.args([
        "--port",
        &port_s,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]);
    let mut server = ChildGuard::spawn(srv, "redis-server")?;
    wait_listening(&mut server, port, Duration::from_secs(10))?;
    // redis-benchmark's own default, in quick too: a run of 20,000 lasted 0.2 s, and the
    // setup of the 50 connections and their first requests weighed on it (SDP read 1.19-1.29x
    // in quick against 1.40-1.52x in full runs of the same build). About 1 s per test and leg.
    let requests = "100000";
    let mut cli = leg.command("redis-benchmark", ctx.cpu);
    cli.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port_s,
        "-t",
        "set,get",
        "-n",
        requests,
        "-c",
        CLIENTS,
        "-P",
        "1",
        "--csv",
    ]);
    let out = ChildGuard::spawn(cli, "redis-benchmark")?.wait_ok(Duration::from_secs(60))?;
    drop(server);
    match (rps(&out.stdout, "GET"), rps(&out.stdout, "SET")) {
        (Some(get), Some(set)) => Ok(vec![get, set]),
        _ => Err(format!(
            "no SET and GET rows in redis-benchmark's CSV: {}",
            out.stdout.trim()
        )),
    }
}

/// The rps column of `"GET","88888.89","0.301",…`.
fn rps(csv: &str, test: &str) -> Option<f64> {
    let head = format!("\"{test}\",\"");
    csv.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(&head)?;
        rest.split('"').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_are_parsed() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\"\n\
                   \"SET\",\"90909.09\",\"0.285\"\n\
                   \"GET\",\"88888.89\",\"0.301\"\n";
        assert_eq!(rps(out, "SET"), Some(90909.09));
        assert_eq!(rps(out, "GET"), Some(88888.89));
        assert_eq!(rps(out, "INCR"), None);
    }
}
