//! Proof that the libsdp leg measured what it claims: while a socket workload runs in
//! the libsdp leg, its connected sockets are looked up in the statistics `sdp stat`
//! reads (one file per libsdp process in shared memory), and every run is classified
//! as over SDP (`shm`), over TCP (with the fallback reasons the library recorded), or
//! unverified (no socket of the workload ever showed up).
//!
//! What to expect comes from the policy the children get (`--conf FILE`, or the
//! default resolution of the library), decided for the workload's server and client
//! programs on `127.0.0.1:<port>`: SDP unless either end's verdict is `tcp`. A fallback
//! where SDP was expected, or SDP where the policy said TCP, is printed as a
//! `bench <name> note: …` line next to the metric, so it can never pass silently.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use conf::{LoadedBy, Mode, Policy, Role};

/// How often the statistics are read during a run. A read is a directory listing and
/// a few small files in /dev/shm (tens of microseconds), done on a CPU the measured
/// processes do not run on.
const POLL: Duration = Duration::from_millis(10);

/// The policy a preloaded child of this bench resolves: `conf` if given, otherwise
/// what the library itself would read (`LIBSDP_CONFIG_FILE` is cleared for children,
/// so that is /etc/libsdp.conf, or `both` everywhere without it).
pub struct Expect {
    policy: Policy,
    active: bool,
}

impl Expect {
    pub fn new(conf: Option<&Path>) -> Expect {
        let conf_s = conf.map(|c| c.display().to_string());
        let act = conf::activation(
            |k| {
                if k == "LIBSDP_CONFIG_FILE" {
                    conf_s.clone()
                } else {
                    std::env::var(k).ok()
                }
            },
            LoadedBy::LdPreload,
        );
        let resolved = Policy::resolve(&act, |p| {
            std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned())
        });
        Expect {
            policy: resolved.policy,
            active: act.active,
        }
    }

    /// Whether the policy keeps every connection on kernel TCP (a pass-through comparison).
    pub fn all_tcp(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        !self.active
            || (self.policy.decide("*", Role::Server, &addr).mode == Mode::Tcp
                && self.policy.decide("*", Role::Client, &addr).mode == Mode::Tcp
                && self
                    .policy
                    .rules(Role::Server)
                    .iter()
                    .all(|r| r.mode == Mode::Tcp)
                && self
                    .policy
                    .rules(Role::Client)
                    .iter()
                    .all(|r| r.mode == Mode::Tcp))
    }

    /// Should a `server` ↔ `client` connection on 127.0.0.1:`port` go over SDP?
    pub fn offload(&self, server: &str, client: &str, port: u16) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        self.active
            && self.policy.decide(server, Role::Server, &addr).mode != Mode::Tcp
            && self.policy.decide(client, Role::Client, &addr).mode != Mode::Tcp
    }
}

/// One connected socket as seen in the statistics.
#[derive(Clone)]
struct Sock {
    program: String,
    transport: &'static str,
    reason: &'static str,
}

/// Reads the statistics every [`POLL`] in a thread until [`finish`](Self::finish),
/// keeping every connected socket whose local or remote port is the workload's port.
/// Dropping it unfinished stops the thread too.
pub struct Watch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(Vec<Sock>, usize)>>,
    port: u16,
}

impl Watch {
    pub fn start(port: u16, measured_cpu: Option<usize>) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            if let Some(cpu) = measured_cpu {
                super::affinity::pin_self_away_from(cpu);
            }
            let mut seen: HashMap<(u64, i64, Option<SocketAddr>), Sock> = HashMap::new();
            let mut looks = 0usize;
            loop {
                looks += 1;
                // One more look after the stop request: short runs get at least one.
                let last = flag.load(Ordering::Acquire);
                let look = std::time::Instant::now();
                for r in crate::stat::collect() {
                    let ours = r.remote.is_some()
                        && [r.local, r.remote]
                            .iter()
                            .flatten()
                            .any(|a| a.port() == port);
                    if ours {
                        seen.insert(
                            (r.pid, r.fd, r.local),
                            Sock {
                                program: r.program,
                                transport: r.transport,
                                reason: r.reason,
                            },
                        );
                    }
                }
                if last {
                    break;
                }
                // A look reads every statistics file on the machine in full (3.4 MiB each)
                // and takes tens of milliseconds with two libsdp processes alive. The watch
                // runs on the server's CPU (it keeps off the client's): resting only as long
                // as a look took gave it half of that CPU in the libsdp leg and none in the
                // base leg (no statistics files), which made redis look 0.8x. Once the
                // workload's sockets were seen, rest 20 times as long (at most 5% of a CPU);
                // before, as long as a look took, so that they are seen early.
                let rest = if seen.is_empty() { 1 } else { 20 };
                std::thread::sleep(POLL.max(look.elapsed() * rest));
            }
            (seen.into_values().collect(), looks)
        });
        Watch {
            stop,
            handle: Some(handle),
            port,
        }
    }

    /// The sockets seen, and how many times the statistics were read.
    fn finish(mut self) -> (Vec<Sock>, usize) {
        self.stop.store(true, Ordering::Release);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Outcome of the libsdp-leg runs of one workload.
#[derive(Default)]
pub struct Tally {
    runs: usize,
    shm: usize,
    /// Runs with at least one TCP socket where SDP was expected.
    tcp: usize,
    /// `reason: program` of the TCP sockets of those runs.
    reasons: BTreeSet<String>,
    /// Runs where no socket of the workload showed up in the statistics.
    unseen: usize,
    /// Runs over SDP where the policy said TCP.
    unexpected_shm: usize,
    expected_offload: Option<bool>,
}

impl Tally {
    /// Classifies one run from what `watch` saw.
    pub fn record(&mut self, watch: Watch, expect_offload: bool) {
        let port = watch.port;
        let (socks, looks) = watch.finish();
        self.runs += 1;
        self.expected_offload = Some(expect_offload);
        if socks.is_empty() {
            if expect_offload {
                self.unseen += 1;
                eprintln!(
                    "sdp bench: no connected socket on port {port} in {looks} looks at the statistics"
                );
            }
            return;
        }
        let tcp: Vec<&Sock> = socks.iter().filter(|s| s.transport != "shm").collect();
        if expect_offload {
            if tcp.is_empty() {
                self.shm += 1;
            } else {
                self.tcp += 1;
                for s in tcp {
                    let reason = if s.reason == "-" {
                        "none recorded"
                    } else {
                        s.reason
                    };
                    self.reasons
                        .insert(format!("{reason}: {} {}", s.program, s.transport));
                }
            }
        } else if tcp.len() < socks.len() {
            self.unexpected_shm += 1;
        }
    }

    /// `bench <metric> note: …` lines for stdout; empty when every run was as expected.
    pub fn notes(&self, metric: &str) -> Vec<String> {
        let mut out = Vec::new();
        let n = self.runs;
        if self.tcp > 0 {
            let reasons: Vec<&str> = self.reasons.iter().map(String::as_str).collect();
            out.push(format!(
                "bench {metric} note: libsdp leg ran over tcp (reason {}) in {} of {n} runs",
                reasons.join(", "),
                self.tcp
            ));
        }
        if self.unseen > 0 {
            out.push(format!(
                "bench {metric} note: libsdp leg ran over tcp (reason unverified: no socket of the workload in sdp stat) in {} of {n} runs",
                self.unseen
            ));
        }
        if self.unexpected_shm > 0 {
            out.push(format!(
                "bench {metric} note: libsdp leg ran over shm although the policy says tcp in {} of {n} runs",
                self.unexpected_shm
            ));
        }
        out
    }

    /// One line for the progress log on stderr.
    pub fn summary(&self) -> String {
        match self.expected_offload {
            None => "no libsdp-leg run".to_string(),
            Some(true) => format!(
                "libsdp leg over shm (checked in sdp stat) in {} of {} runs",
                self.shm, self.runs
            ),
            Some(false) => format!(
                "policy says tcp; libsdp leg over shm in {} of {} runs",
                self.unexpected_shm, self.runs
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_of(socks: Vec<Sock>) -> Watch {
        Watch {
            stop: Arc::new(AtomicBool::new(false)),
            handle: Some(std::thread::spawn(move || (socks, 1))),
            port: 1,
        }
    }

    fn sock(t: &'static str, reason: &'static str) -> Sock {
        Sock {
            program: "prog".into(),
            transport: t,
            reason,
        }
    }

    #[test]
    fn fallback_and_unseen_runs_are_noted() {
        let mut t = Tally::default();
        t.record(watch_of(vec![sock("shm", "-"), sock("shm", "-")]), true);
        t.record(
            watch_of(vec![sock("shm", "-"), sock("tcp", "peer-not-sdp")]),
            true,
        );
        t.record(watch_of(vec![]), true);
        let notes = t.notes("x");
        assert_eq!(notes.len(), 2);
        assert!(notes[0].starts_with(
            "bench x note: libsdp leg ran over tcp (reason peer-not-sdp: prog tcp) in 1 of 3 runs"
        ));
        assert!(notes[1].contains("unverified"));
        assert_eq!(t.reasons.len(), 1);
    }

    #[test]
    fn tcp_policy_expects_tcp() {
        let mut t = Tally::default();
        t.record(watch_of(vec![sock("tcp", "policy")]), false);
        t.record(watch_of(vec![]), false);
        assert!(t.notes("x").is_empty());
        t.record(watch_of(vec![sock("shm", "-")]), false);
        assert!(t.notes("x")[0].contains("although the policy says tcp"));
    }

    #[test]
    fn use_tcp_file_means_no_offload() {
        let dir = std::env::temp_dir().join(format!("sdp-verify-{}", std::process::id()));
        std::fs::write(&dir, "use tcp server * *:*\nuse tcp client * *:*\n").unwrap();
        let e = Expect::new(Some(&dir));
        let _ = std::fs::remove_file(&dir);
        assert!(!e.offload("sockperf", "sockperf", 5000));
    }
}
