//! The `rdma` transport's absence on an ordinary host (issue #7): with libibverbs absent, and
//! with libibverbs installed but no RDMA device (this machine and CI have none), programs under
//! the preload start as they do without it, connect over TCP to a peer that is not on this host
//! with fallback reason `no-device` recorded (`sdp stat`), and still ride SDP over `shm` to a
//! peer on this host.
//!
//! A peer "not on this host" needs a TCP server at an address that no interface of the host
//! has. Each scenario runs in a private network namespace (`unshare -n`) where 198.18.0.1 (a
//! benchmarking address, RFC 2544) is routed to `lo` as a local route only: the kernel accepts
//! connections to it, but `getifaddrs` (what the library asks "is it local?") does not list it.
//! "libibverbs absent" is made in a private mount namespace too: `/dev/null` is bind-mounted
//! over the library's file, so `dlopen("libibverbs.so.1")` fails as on a machine without
//! rdma-core (`LD_LIBRARY_PATH` cannot hide a library the loader finds through ld.so.cache).
//! Both namespaces die with the test; the host is not changed. Needs root or unprivileged user
//! namespaces (`unshare -r`), `ip` (iproute2), sockperf and python3 (to check the premise).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use libsdp_suite::{
    Mode, Outcome, Proc, StatRow, command, connections, free_port, groups_when, libsdp_so,
    require_tool, run, same_in_both_modes,
};

const T: Duration = Duration::from_secs(60);
/// An address no interface has, routed to `lo` inside the scenario's namespace.
const REMOTE: &str = "198.18.0.1";

/// How libibverbs looks to the programs of a scenario.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verbs {
    /// `dlopen("libibverbs.so.1")` fails.
    Absent,
    /// libibverbs loads and lists no device.
    NoDevice,
}

/// A private network (and, for [`Verbs::Absent`], mount) namespace, held by a sleeping
/// process; commands enter it with `nsenter`.
struct Namespace {
    holder: Proc,
    user_ns: bool,
    dir: PathBuf,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Namespace {
    fn new(verbs: Verbs) -> Namespace {
        require_tool("unshare", "util-linux");
        require_tool("nsenter", "util-linux");
        require_tool("ip", "iproute2");
        let dir = scratch(&format!("ns-{verbs:?}"));
        let ready = dir.join("ready");
        let hide: Vec<PathBuf> = match verbs {
            Verbs::Absent => libibverbs_files(),
            Verbs::NoDevice => Vec::new(),
        };
        // SAFETY: geteuid has no preconditions.
        let user_ns = unsafe { libc::geteuid() } != 0;
        let mut cmd = Command::new("unshare");
        if user_ns {
            cmd.arg("-r");
        }
        cmd.args(["-m", "-n", "sh", "-c"])
            .arg(
                "set -e; ip link set lo up; ip route add local \"$1\"/32 dev lo; ready=$2; \
                 shift 2; for f in \"$@\"; do mount --bind /dev/null \"$f\"; done; \
                 touch \"$ready\"; exec sleep 600",
            )
            .arg("namespace")
            .arg(REMOTE)
            .arg(&ready)
            .args(&hide)
            .env_remove("LD_PRELOAD");
        let mut holder = Proc::spawn(cmd, "unshare (scenario namespace)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ready.exists() {
            if !holder.running() {
                let o = holder.wait(T);
                panic!(
                    "cannot make a private network namespace (needs root or user namespaces): \
                     code {}\n{}",
                    o.code, o.stderr
                );
            }
            assert!(Instant::now() < deadline, "namespace setup hangs");
            std::thread::sleep(Duration::from_millis(10));
        }
        Namespace {
            holder,
            user_ns,
            dir,
        }
    }

    /// `program` in `mode`, run inside the namespace.
    fn command(&self, mode: Mode, program: &str, args: &[&str]) -> Command {
        let mut cmd = command(mode, "nsenter");
        cmd.arg("-t").arg(self.holder.id().to_string());
        if self.user_ns {
            cmd.args(["-U", "--preserve-credentials"]);
        }
        cmd.args(["-m", "-n", "--"]).arg(program).args(args);
        cmd
    }
}

/// Every file the loader would open for `libibverbs.so.1` (ld.so.cache entries, resolved).
fn libibverbs_files() -> Vec<PathBuf> {
    let o = Command::new("ldconfig")
        .arg("-p")
        .output()
        .or_else(|_| Command::new("/sbin/ldconfig").arg("-p").output())
        .expect("run ldconfig -p");
    let mut files: Vec<PathBuf> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("libibverbs.so.1 "))
        .filter_map(|l| l.rsplit_once("=> ").map(|(_, p)| PathBuf::from(p.trim())))
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    files.sort();
    files.dedup();
    files
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("libsdp-rdma-host-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// What `dlopen("libibverbs.so.1")` and `ibv_get_device_list` say inside the namespace:
/// "absent" or "devices N". (Without the kernel's uverbs support the list is NULL with ENOSYS:
/// no device either.)
fn verbs_seen(ns: &Namespace) -> String {
    require_tool("python3", "python3");
    let probe = "import ctypes\n\
        try:\n  v = ctypes.CDLL('libibverbs.so.1')\n\
        except OSError:\n  print('absent'); raise SystemExit\n\
        n = ctypes.c_int(-1)\n\
        v.ibv_get_device_list.restype = ctypes.c_void_p\n\
        l = v.ibv_get_device_list(ctypes.byref(n))\n\
        print('devices', n.value if l else 0)\n";
    let o = run(
        ns.command(Mode::Base, "python3", &["-c", probe]),
        "python3 libibverbs probe",
        T,
    );
    assert_eq!(o.code, 0, "libibverbs probe: {o:?}");
    o.stdout.trim().to_string()
}

/// Checks the scenario's premise, or fails saying how to get it.
fn assert_premise(ns: &Namespace, verbs: Verbs) {
    let seen = verbs_seen(ns);
    match verbs {
        Verbs::Absent => assert_eq!(
            seen,
            "absent",
            "libibverbs still loads with its files hidden ({:?})",
            libibverbs_files()
        ),
        Verbs::NoDevice => assert_eq!(
            seen, "devices 0",
            "want libibverbs installed and no RDMA device: apt-get install -y libibverbs1 \
             ibverbs-providers (a machine with RDMA devices cannot run this test)"
        ),
    }
}

/// Waits until the server `pid` listens on `port` in its own network namespace.
fn wait_listening_in(server: &mut Proc, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let needle = format!(":{port:04X}");
    let pid = server.id();
    loop {
        let listening = ["tcp", "tcp6"].iter().any(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).is_ok_and(|text| {
                text.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[3] == "0A" && f[1].ends_with(&needle)
                })
            })
        });
        if listening {
            return;
        }
        assert!(server.running(), "the server exited before listening");
        assert!(
            Instant::now() < deadline,
            "the server did not listen on {port} within 15 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What one sockperf ping-pong run over `addr` showed: the client's outcome (exit code and
/// which statistics it printed) and, under the preload, the client's and the server's
/// connection rows while it ran.
struct PingPong {
    client: (i32, Vec<String>),
    client_rows: Vec<StatRow>,
    server_rows: Vec<StatRow>,
}

fn sockperf_ping_pong(ns: &Namespace, mode: Mode, addr: &str, want_bytes: bool) -> PingPong {
    let port = free_port();
    let p = port.to_string();
    let mut server = Proc::spawn(
        ns.command(mode, "sockperf", &["sr", "--tcp", "-i", addr, "-p", &p]),
        "sockperf sr",
    );
    wait_listening_in(&mut server, port);
    let client = Proc::spawn(
        ns.command(
            mode,
            "sockperf",
            &[
                "pp",
                "--tcp",
                "-i",
                addr,
                "-p",
                &p,
                "-m",
                "64",
                "-t",
                "2",
                "--dontwarmup",
            ],
        ),
        "sockperf pp",
    );
    let (mut client_rows, mut server_rows) = (Vec::new(), Vec::new());
    if mode == Mode::Preload {
        let has = |bytes: bool| {
            move |rows: &[StatRow]| {
                connections(rows)
                    .iter()
                    .any(|r| !bytes || r.bytes_tx + r.bytes_rx > 0)
            }
        };
        let mut both = groups_when(
            &[client.id(), server.id()],
            Duration::from_secs(20),
            has(want_bytes),
        );
        server_rows = both.pop().unwrap_or_default();
        client_rows = both.pop().unwrap_or_default();
    }
    let client = client.wait(T);
    server.stop();
    let keys = client
        .stdout
        .lines()
        .filter_map(|l| l.split_once("--->").map(|(_, r)| r))
        .filter_map(|r| r.split('=').next())
        .map(|k| k.trim().to_string())
        .collect::<Vec<_>>();
    assert!(
        client.code == 0 && keys.contains(&"percentile 50.000".to_string()),
        "sockperf pp over {addr} ({mode:?}): {client:?}"
    );
    PingPong {
        client: (client.code, keys),
        client_rows,
        server_rows,
    }
}

/// The one connection of `rows` as (role, transport, reason).
fn one(rows: &[StatRow], what: &str) -> (String, String, String) {
    let c = connections(rows);
    assert_eq!(
        c.len(),
        1,
        "{what}: want one connection:\n{}",
        libsdp_suite::show_rows(rows)
    );
    (
        c[0].role.clone(),
        c[0].transport.clone(),
        c[0].fallback_reason.clone(),
    )
}

/// A program that opens no socket starts, prints and exits exactly as without the preload.
fn startup_unchanged(ns: &Namespace) {
    same_in_both_modes("sh -c under the preload", |mode| {
        let o: Outcome = run(
            ns.command(
                mode,
                "sh",
                &["-c", "echo started \"$0\"; echo to-stderr >&2; exit 3", "x"],
            ),
            "sh -c",
            T,
        );
        (o.code, o.stdout, o.stderr)
    });
}

/// A peer not on this host: TCP in both modes, the same client outcome, and under the preload
/// both ends on kernel TCP; the client (whose connect would take the rdma path) records
/// `no-device`, the server sees a plain client.
fn remote_peer_is_tcp_with_no_device(ns: &Namespace) {
    let out = same_in_both_modes("sockperf to a peer not on this host", |mode| {
        let run = sockperf_ping_pong(ns, mode, REMOTE, false);
        if mode == Mode::Preload {
            let client = one(&run.client_rows, "client");
            assert_eq!(
                client,
                ("client".into(), "tcp".into(), "no-device".into()),
                "client rows:\n{}",
                libsdp_suite::show_rows(&run.client_rows)
            );
            let server = one(&run.server_rows, "server");
            assert_eq!(
                server,
                ("server".into(), "tcp".into(), "plain-client".into()),
                "server rows:\n{}",
                libsdp_suite::show_rows(&run.server_rows)
            );
        }
        run.client
    });
    assert_eq!(out.0, 0);
}

/// A peer on this host still rides SDP over shm, bytes counted on both ends.
fn local_peer_rides_shm(ns: &Namespace) {
    let run = sockperf_ping_pong(ns, Mode::Preload, "127.0.0.1", true);
    for (side, rows) in [("client", &run.client_rows), ("server", &run.server_rows)] {
        let c = connections(rows);
        assert!(
            c.len() == 1 && c[0].transport == "shm" && c[0].bytes_tx + c[0].bytes_rx > 0,
            "{side}: want one shm connection with bytes:\n{}",
            libsdp_suite::show_rows(rows)
        );
    }
}

/// `rdma-selftest` (built by the rdma provider) says "no device" (exit 77) here.
fn selftest_reports_no_device(ns: &Namespace) {
    let exe = libsdp_so().with_file_name("rdma-selftest");
    if !exe.exists() {
        eprintln!(
            "note: {} not built; its no-device exit not checked",
            exe.display()
        );
        return;
    }
    let o = run(
        ns.command(Mode::Base, path_str(&exe), &[]),
        "rdma-selftest",
        T,
    );
    assert_eq!(o.code, 77, "rdma-selftest without a device: {o:?}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn scenario(verbs: Verbs) {
    require_tool("sockperf", "sockperf");
    let ns = Namespace::new(verbs);
    assert_premise(&ns, verbs);
    startup_unchanged(&ns);
    remote_peer_is_tcp_with_no_device(&ns);
    local_peer_rides_shm(&ns);
    selftest_reports_no_device(&ns);
}

#[test]
fn libibverbs_absent_programs_unchanged_remote_tcp_no_device_local_shm() {
    scenario(Verbs::Absent);
}

#[test]
fn libibverbs_without_device_programs_unchanged_remote_tcp_no_device_local_shm() {
    scenario(Verbs::NoDevice);
}
