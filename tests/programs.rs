//! Unmodified network programs under the preload behave exactly as without it: python's
//! http.server with curl, redis-server with redis-cli and redis-benchmark, iperf3,
//! sockperf. In the preloaded run, servers and clients are both preloaded.
//!
//! A missing tool fails the test with the apt package to install (CI installs the
//! packages of `tests/APT-PACKAGES`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use libsdp_suite::{
    Mode, Proc, command, free_port, require_tool, run, same_in_both_modes, wait_listening,
};

const T: Duration = Duration::from_secs(30);

/// A fresh directory under the target's scratch space.
fn scratch_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

#[test]
fn python_http_server_answers_curl_identically() {
    require_tool("python3", "python3");
    require_tool("curl", "curl");
    let root = scratch_dir("http");
    std::fs::write(root.join("hello.txt"), "hello libsdp\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/a.txt"), "a").unwrap();
    let got = same_in_both_modes("http.server + curl", |mode| {
        let port = free_port();
        let mut srv = command(mode, "python3");
        srv.args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(&root);
        let mut server = Proc::spawn(srv, "python3 -m http.server");
        wait_listening(&mut server, port);
        let url = |p: &str| format!("http://127.0.0.1:{port}/{p}");
        let curl = |args: &[&str]| {
            let mut c = command(mode, "curl");
            c.args(["-s", "-S"]).args(args);
            let o = run(c, "curl", T);
            (o.code, o.stdout, o.stderr)
        };
        let results = vec![
            curl(&["-w", "\n%{http_code}", &url("hello.txt")]),
            curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                &url("big.bin"),
            ]),
            curl(&["-w", "\n%{http_code}", &url("sub/")]),
            curl(&["-o", "/dev/null", "-w", "%{http_code}", &url("missing")]),
            curl(&[
                "-I",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url("hello.txt"),
            ]),
        ];
        let server = server.stop();
        // The server's log has times and ports; its exit code must match.
        (results, server.code)
    });
    assert_eq!(got.0[0], (0, "hello libsdp\n\n200".into(), String::new()));
    assert_eq!(got.0[1].1, "200 3000000");
    assert!(got.0[2].1.contains("a.txt"), "{:?}", got.0[2]);
    assert_eq!(got.0[3].1, "404");
}

/// The names of the tests redis-benchmark -q reported ("SET", "GET", …).
fn benchmark_tests(out: &str) -> Vec<String> {
    out.split(['\r', '\n'])
        .filter(|l| l.contains("requests per second"))
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn redis_server_answers_cli_and_benchmark_identically() {
    require_tool("redis-server", "redis-server");
    require_tool("redis-cli", "redis-tools");
    require_tool("redis-benchmark", "redis-tools");
    let dir = scratch_dir("redis");
    let got = same_in_both_modes("redis", |mode| {
        let port = free_port();
        let p = port.to_string();
        let mut srv = command(mode, "redis-server");
        srv.args([
            "--port",
            &p,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--daemonize", "no", "--protected-mode", "no", "--dir"])
        .arg(&dir);
        let mut server = Proc::spawn(srv, "redis-server");
        wait_listening(&mut server, port);
        let cli = |args: &[&str]| {
            let mut c = command(mode, "redis-cli");
            c.args(["-h", "127.0.0.1", "-p", &p]).args(args);
            let o = run(c, "redis-cli", T);
            (o.code, o.stdout, o.stderr)
        };
        let mut results = vec![
            cli(&["PING"]),
            cli(&["SET", "greeting", "hello libsdp"]),
            cli(&["GET", "greeting"]),
            cli(&["INCR", "n"]),
            cli(&["INCR", "n"]),
            cli(&["RPUSH", "l", "a", "b", "c"]),
            cli(&["LRANGE", "l", "0", "-1"]),
            cli(&["GET", "missing"]),
            cli(&["NOSUCHCOMMAND"]),
        ];
        let mut bench = command(mode, "redis-benchmark");
        bench
            .args(["-h", "127.0.0.1", "-p", &p, "-n", "2000", "-c", "10", "-q"])
            .args(["-t", "set,get,incr,lpush"]);
        let b = run(bench, "redis-benchmark", T);
        results.push((b.code, benchmark_tests(&b.stdout).join(","), String::new()));
        results.push(cli(&["DBSIZE"]));
        results.push(cli(&["GET", "greeting"]));
        let server = server.stop();
        (results, server.code)
    });
    let r = &got.0;
    assert_eq!(r[0].1, "PONG\n");
    assert_eq!(r[2].1, "hello libsdp\n");
    assert_eq!(r[4].1, "2\n");
    assert_eq!(r[9], (0, "SET,GET,INCR,LPUSH".into(), String::new()));
    assert_eq!(r[11].1, "hello libsdp\n");
}

#[test]
fn iperf3_one_second_run_completes_with_a_valid_report() {
    require_tool("iperf3", "iperf3");
    require_tool("python3", "python3");
    same_in_both_modes("iperf3", |mode| {
        let port = free_port();
        let p = port.to_string();
        let mut srv = command(mode, "iperf3");
        srv.args(["-s", "-1", "-p", &p]);
        let mut server = Proc::spawn(srv, "iperf3 -s");
        wait_listening(&mut server, port);
        let mut cli = command(mode, "iperf3");
        cli.args(["-c", "127.0.0.1", "-p", &p, "-t", "1", "-J"]);
        let client = run(cli, "iperf3 -c", T);
        let server = server.wait(T);
        // The report must parse and show data received, whatever the rate.
        let dir = scratch_dir("iperf3");
        let json = dir.join("report.json");
        std::fs::write(&json, &client.stdout).unwrap();
        let mut check = command(Mode::Base, "python3");
        check.arg("-c").arg(
            "import json,sys; d=json.load(open(sys.argv[1])); e=d['end']; \
             print('error' in d, e['sum_received']['bytes'] > 0, e['sum_sent']['bytes'] > 0, \
             d['start']['test_start']['num_streams'])",
        );
        check.arg(&json);
        let parsed = run(check, "python3 json check", T);
        assert_eq!(
            parsed.stdout, "False True True 1\n",
            "{client:?} {parsed:?}"
        );
        (client.code, parsed.stdout, server.code)
    });
}

#[test]
fn sockperf_ping_pong_completes_with_percentiles() {
    require_tool("sockperf", "sockperf");
    same_in_both_modes("sockperf", |mode| {
        let port = free_port();
        let p = port.to_string();
        let mut srv = command(mode, "sockperf");
        srv.args(["sr", "--tcp", "-i", "127.0.0.1", "-p", &p]);
        let mut server = Proc::spawn(srv, "sockperf sr");
        wait_listening(&mut server, port);
        let mut cli = command(mode, "sockperf");
        cli.args([
            "pp",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &p,
            "-m",
            "64",
            "-t",
            "1",
        ])
        .arg("--dontwarmup");
        let client = run(cli, "sockperf pp", T);
        let server = server.stop();
        // Which statistics were printed, not their values.
        let keys: Vec<String> = client
            .stdout
            .lines()
            .filter_map(|l| l.split_once("--->").map(|(_, r)| r))
            .filter_map(|r| r.split('=').next())
            .map(|k| k.trim().to_string())
            .collect();
        assert!(
            keys.contains(&"percentile 50.000".to_string()),
            "{client:?}"
        );
        let dropped = client
            .stdout
            .lines()
            .find(|l| l.contains("dropped messages"))
            .map(str::to_owned);
        (client.code, keys, dropped, server.code)
    });
}
