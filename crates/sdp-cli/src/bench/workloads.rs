//! The workload table. One entry per workload; the driver in `bench.rs` does the rest
//! (tool checks, warm-up, alternation, medians, output).

use std::path::PathBuf;

use super::proc::Leg;
use super::verify::Expect;
use super::{BenchOpts, affinity, fdloop, idle, iperf3, loaded, redis, setup, sockperf};

/// A metric a workload reports: its `bench <name>` and its unit.
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
}

/// An external program a workload needs, and the apt package that ships it.
pub struct Tool {
    pub binary: &'static str,
    pub apt_package: &'static str,
}

/// Repetitions per leg, after the warm-up.
pub struct Reps {
    pub quick: usize,
    pub full: usize,
}

/// One benchmark workload.
pub struct Workload {
    pub name: &'static str,
    pub metrics: &'static [Metric],
    pub tools: &'static [Tool],
    pub reps: Reps,
    /// Run one discarded repetition per leg first. Off where the tool warms up by itself
    /// and a repetition is expensive.
    pub warmup: bool,
    /// For socket workloads, the programs at the two ends (`server`, `client`) as the
    /// policy names them: the libsdp leg is then checked in the statistics to run over
    /// SDP exactly when the policy offloads their connection. `None`: no socket.
    pub peers: Option<(&'static str, &'static str)>,
    /// One repetition in one leg: one value per entry of `metrics`, in that order. The
    /// port is free and fresh for every repetition; socket workloads serve on
    /// 127.0.0.1 there (the statistics are matched on it).
    pub run: fn(&Ctx, &Leg, u16) -> Result<Vec<f64>, String>,
}

impl Workload {
    /// Selected by `--only`-style filters: empty selects all; otherwise a filter must be
    /// part of the workload's name or of one of its metrics' names.
    pub fn selected_by(&self, only: &[String]) -> bool {
        only.is_empty()
            || only.iter().any(|f| {
                self.name.contains(f.as_str())
                    || self.metrics.iter().any(|m| m.name.contains(f.as_str()))
            })
    }
}

/// Everything a repetition needs to know about the run.
pub struct Ctx {
    pub quick: bool,
    /// Absolute path of libsdp.so for the libsdp leg.
    pub preload: PathBuf,
    pub conf: Option<PathBuf>,
    /// The `sdp` executable, for workloads that run inside it.
    pub sdp_exe: PathBuf,
    /// CPU the measured processes are pinned to (the client of a client/server pair).
    pub cpu: Option<usize>,
    /// CPU the server of a client/server pair is pinned to: another one than the client's,
    /// as on any deployment where two programs talk (on one CPU, kernel TCP's wake-up path is
    /// a function call, and every busy-polling transport is penalised).
    pub server_cpu: Option<usize>,
    /// What the libsdp leg's policy decides, to check the transport against.
    pub expect: Expect,
}

impl Ctx {
    pub fn new(opts: &BenchOpts) -> Result<Ctx, String> {
        let sdp_exe =
            std::env::current_exe().map_err(|e| format!("cannot find the sdp executable: {e}"))?;
        // The library next to the executable (target/release/{sdp,libsdp.so}); the
        // environment may name another one.
        let preload = match std::env::var_os("LIBSDP_SO") {
            Some(p) => PathBuf::from(p),
            None => sdp_exe
                .parent()
                .map(|d| d.join("libsdp.so"))
                .ok_or("the sdp executable has no parent directory")?,
        };
        // LD_PRELOAD must be absolute: a relative path breaks after a chdir.
        let preload = preload.canonicalize().map_err(|e| {
            format!(
                "libsdp.so not found at {} ({e}): build it first: cargo build --release --workspace",
                preload.display()
            )
        })?;
        let conf = match &opts.conf {
            Some(c) => Some(
                c.canonicalize()
                    .map_err(|e| format!("--conf {}: {e}", c.display()))?,
            ),
            None => None,
        };
        let expect = Expect::new(conf.as_deref());
        Ok(Ctx {
            quick: opts.quick,
            preload,
            sdp_exe,
            cpu: affinity::measurement_cpu(),
            server_cpu: if expect.all_tcp() {
                // A pass-through comparison measures the hooks' cost: both programs on one
                // CPU, where loopback TCP is steadiest.
                None
            } else {
                affinity::server_cpu()
            },
            expect,
            conf,
        })
    }

    pub fn base_leg(&self) -> Leg {
        Leg::Base
    }

    pub fn libsdp_leg(&self) -> Leg {
        Leg::Libsdp {
            so: self.preload.clone(),
            conf: self.conf.clone(),
        }
    }
}

/// Every workload, in output order.
///
/// Budget of `--quick` (must stay under five minutes in all): roughly
/// (1 warm-up + reps) × 2 legs × the duration of one repetition. Measured shares on a
/// 2-vCPU VM with today's library: sockperf 34 s, iperf3 15 s over TCP (up to 30 s
/// while SDP streams slower than TCP), pipe_rw and file_rw 8 s, redis 35 s,
/// setup_rate 10 s (slower connection setup over SDP stretches it), sockperf_16k 24 s,
/// iperf3_8stream 25 s, idle_conn_mem 10 s, loaded 20 s.
pub static ALL: &[Workload] = &[
    Workload {
        name: "sockperf",
        metrics: &[
            Metric {
                name: "sockperf_p50_64",
                unit: "us",
            },
            Metric {
                name: "sockperf_p99_64",
                unit: "us",
            },
        ],
        tools: &[Tool {
            binary: "sockperf",
            apt_package: "sockperf",
        }],
        // About 3.4 s (quick) / 5.4 s (full) per repetition: sockperf's client sleeps
        // two seconds after connecting whatever the options. Its p50 varies by well
        // under 1% between runs when pinned, so few repetitions do.
        reps: Reps { quick: 5, full: 15 },
        // sockperf drops the first 400 ms of every run from its statistics.
        warmup: false,
        peers: Some(("sockperf", "sockperf")),
        run: sockperf::ping_pong_64,
    },
    Workload {
        name: "sockperf_16k",
        metrics: &[Metric {
            name: "sockperf_p50_16k",
            unit: "us",
        }],
        tools: &[Tool {
            binary: "sockperf",
            apt_package: "sockperf",
        }],
        // As the 64-byte run; a 16 KiB message costs a few microseconds of copying more.
        reps: Reps { quick: 3, full: 9 },
        warmup: false,
        peers: Some(("sockperf", "sockperf")),
        run: sockperf::ping_pong_16k,
    },
    Workload {
        name: "iperf3",
        metrics: &[Metric {
            name: "iperf3_1stream",
            unit: "Gbit/s",
        }],
        tools: &[Tool {
            binary: "iperf3",
            apt_package: "iperf3",
        }],
        // Loopback throughput in a small VM wanders by ±10% over fractions of a second,
        // so many short alternating transfers (256 MiB, about 0.25 s with setup, in
        // quick; 1 GiB in full) beat a few long ones. The median of 40 keeps a
        // TCP-against-TCP ratio within about 2%.
        reps: Reps {
            quick: 40,
            full: 120,
        },
        warmup: true,
        peers: Some(("iperf3", "iperf3")),
        run: iperf3::one_stream,
    },
    Workload {
        name: "iperf3_8stream",
        metrics: &[Metric {
            name: "iperf3_8stream",
            unit: "Gbit/s",
        }],
        tools: &[Tool {
            binary: "iperf3",
            apt_package: "iperf3",
        }],
        // Eight connections share the same bytes as the one-stream run (256 MiB in quick,
        // 1 GiB in full, in all), so a repetition lasts about as long.
        reps: Reps { quick: 9, full: 60 },
        warmup: true,
        peers: Some(("iperf3", "iperf3")),
        run: iperf3::eight_streams,
    },
    Workload {
        name: "pipe_rw",
        metrics: &[Metric {
            name: "pipe_rw",
            unit: "ns/op",
        }],
        tools: &[],
        reps: Reps {
            quick: 11,
            full: 25,
        },
        warmup: true,
        peers: None,
        run: fdloop::pipe,
    },
    Workload {
        name: "file_rw",
        metrics: &[Metric {
            name: "file_rw",
            unit: "ns/op",
        }],
        tools: &[],
        reps: Reps {
            quick: 11,
            full: 25,
        },
        warmup: true,
        peers: None,
        run: fdloop::file,
    },
    Workload {
        name: "redis",
        metrics: &[
            Metric {
                name: "redis_get",
                unit: "req/s",
            },
            Metric {
                name: "redis_set",
                unit: "req/s",
            },
        ],
        tools: &[
            Tool {
                binary: "redis-server",
                apt_package: "redis-server",
            },
            Tool {
                binary: "redis-benchmark",
                apt_package: "redis-tools",
            },
        ],
        // About 2 s per repetition (server start, 100,000 SETs and GETs).
        reps: Reps { quick: 7, full: 11 },
        warmup: true,
        peers: Some(("redis-server", "redis-benchmark")),
        run: redis::get_set,
    },
    Workload {
        name: "setup_rate",
        metrics: &[Metric {
            name: "setup_rate",
            unit: "conn/s",
        }],
        tools: &[],
        // About 0.35 s per repetition in quick (0.25 s of connections).
        reps: Reps { quick: 7, full: 15 },
        warmup: true,
        peers: Some(("sdp", "sdp")),
        run: setup::rate,
    },
    Workload {
        name: "idle_conn_mem",
        metrics: &[Metric {
            name: "idle_conn_mem",
            unit: "bytes",
        }],
        tools: &[],
        // About 2 s per repetition in quick (2,000 connections set up, one byte each way).
        // The slab part of the figure is machine-wide: the median of a few damps others' noise.
        reps: Reps { quick: 5, full: 7 },
        warmup: false,
        peers: Some(("sdp", "sdp")),
        run: idle::per_connection,
    },
    Workload {
        name: "loaded",
        metrics: &[
            Metric {
                name: "loaded_p50_64",
                unit: "x_unloaded",
            },
            Metric {
                name: "loaded_p99_64",
                unit: "x_unloaded",
            },
        ],
        tools: &[],
        // About 1.5 s per repetition in quick (a thousand connections set up, two ping-pong
        // runs of 10,000 round trips).
        reps: Reps { quick: 5, full: 9 },
        warmup: true,
        peers: Some(("sdp", "sdp")),
        run: loaded::p50_p99,
    },
];
