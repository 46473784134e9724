//! Process-model programs under the preload: fork-per-connection servers, exec'd
//! children (shell pipelines, bash's /dev/tcp, python subprocesses) and a Rust std
//! networking program behave exactly as without it.

use std::path::Path;
use std::time::Duration;

use libsdp_suite::{Proc, command, compile_c, free_port, run, same_in_both_modes, wait_listening};

const T: Duration = Duration::from_secs(30);

fn c_program(name: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name);
    compile_c(&src, Path::new(env!("CARGO_TARGET_TMPDIR")))
}

#[test]
fn fork_per_connection_server_serves_concurrent_forked_clients() {
    let exe = c_program("fork_echo.c");
    const N: &str = "8";
    same_in_both_modes("fork_echo", |mode| {
        let port = free_port().to_string();
        let mut srv = command(mode, &exe);
        srv.args(["server", &port, N]);
        let mut server = Proc::spawn(srv, "fork_echo server");
        wait_listening(&mut server, port.parse().unwrap());
        let mut cli = command(mode, &exe);
        cli.args(["client", &port, N]);
        let client = run(cli, "fork_echo client", T);
        let server = server.wait(T);
        // Forked clients finish in any order: compare the set of lines.
        let mut lines: Vec<String> = client.stdout.lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(lines.len(), 8, "{client:?}");
        (
            client.code,
            lines,
            server.code,
            server.stdout,
            server.stderr,
        )
    });
}

#[test]
fn shell_pipeline_of_execd_children_prints_the_same() {
    let out = same_in_both_modes("sh pipeline", |mode| {
        let mut sh = command(mode, "sh");
        sh.args([
            "-c",
            "seq 1 1000 | sort -rn | head -3; echo x | tr x y; ls / >/dev/null && echo ls-ok; exit 7",
        ]);
        run(sh, "sh -c pipeline", T)
    });
    assert_eq!(out.stdout, "1000\n999\n998\ny\nls-ok\n");
    assert_eq!(out.code, 7);
}

#[test]
fn execd_children_talk_tcp_through_bash_dev_tcp_and_python_subprocess() {
    libsdp_suite::require_tool("python3", "python3");
    libsdp_suite::require_tool("bash", "bash");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/exec_tcp.py");
    let out = same_in_both_modes("exec_tcp.py", |mode| {
        let mut py = command(mode, "python3");
        py.arg(&script);
        run(py, "python3 exec_tcp.py", T)
    });
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("bash got: HELLO FROM BASH exit 0"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("python got: HELLO FROM PYTHON exit 0"),
        "{out:?}"
    );
}

#[test]
fn rust_std_tcp_program_echoes_a_mebibyte_identically() {
    let out = same_in_both_modes("std_tcp_echo", |mode| {
        run(
            command(mode, env!("CARGO_BIN_EXE_std_tcp_echo")),
            "std_tcp_echo",
            T,
        )
    });
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "peer is loopback: true\nserver echoed 1048576 bytes\nnon-blocking read: WouldBlock\n\
         timed read: true\nclient peer_addr matches: true\necho intact: true\n"
    );
}
