//! `sdp`: the command-line companion of libsdp.so.
//!
//! - `sdp run` starts a program with libsdp preloaded;
//! - `sdp explain` says what the policy decides for one socket, and why;
//! - `sdp check` validates a policy file;
//! - `sdp stat` shows the offloaded sockets of running processes;
//! - `sdp bench` compares workloads with and without libsdp.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod explain;
mod run;
mod stat;

#[derive(Parser)]
#[command(
    name = "sdp",
    version,
    about = "Run programs over the Sockets Direct Protocol with libsdp, and inspect its policy",
    long_about = "libsdp.so moves the TCP stream sockets of unmodified programs onto the Sockets \
                  Direct Protocol and falls back to TCP when SDP cannot serve a connection. \
                  Which sockets it moves is decided by /etc/libsdp.conf (or LIBSDP_CONFIG_FILE).\n\n\
                  Environment read by the library: LIBSDP_CONFIG_FILE (policy file), \
                  LIBSDP_ENABLE (0 turns libsdp off; 1 turns it on when it is loaded from \
                  /etc/ld.so.preload), SIMPLE_LIBSDP / ALWAYS_USE_SDP (SDP for every stream socket)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a program with libsdp preloaded.
    #[command(
        long_about = "Runs PROG with LD_PRELOAD set to the absolute path of libsdp.so (prepended to \
                      any LD_PRELOAD already set) and, with --conf, LIBSDP_CONFIG_FILE set to the \
                      absolute path of FILE. The program replaces sdp (exec): its pid and exit code \
                      are the program's.\n\n\
                      libsdp.so is looked for next to the sdp executable unless --lib is given.",
        after_help = "Example:\n  sdp run --conf ./memcached.conf -- memcached -p 11211"
    )]
    Run {
        /// Policy file for the program (sets LIBSDP_CONFIG_FILE).
        #[arg(long, value_name = "FILE")]
        conf: Option<PathBuf>,
        /// libsdp.so to preload [default: libsdp.so next to the sdp executable].
        #[arg(long, value_name = "PATH")]
        lib: Option<PathBuf>,
        /// The program and its arguments (put them after `--`).
        #[arg(
            value_name = "PROG ARGS",
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<OsString>,
    },

    /// Show what the policy decides for a program's socket, and which rule decided.
    #[command(
        long_about = "Prints the decision (sdp, tcp or both) for PROG acting as a server (listening \
                      on ADDR:PORT) or as a client (connecting to ADDR:PORT), with the rule and \
                      its line that made it, or the default that applied and why.\n\n\
                      Without --conf the policy is found as the library finds it: \
                      SIMPLE_LIBSDP / ALWAYS_USE_SDP, else LIBSDP_CONFIG_FILE, else \
                      /etc/libsdp.conf, else no file (both everywhere). A broken file is \
                      reported and sdp exits with status 1.",
        after_help = "Examples:\n  sdp explain memcached server 0.0.0.0:11211\n  \
                      sdp explain --conf ./my.conf ssh client 10.1.2.3:22\n  \
                      sdp explain curl client [2001:db8::1]:443"
    )]
    Explain {
        /// Policy file to explain instead of the one the library would read.
        #[arg(long, value_name = "FILE")]
        conf: Option<PathBuf>,
        /// Program name (the rules match its name without the directory).
        #[arg(value_name = "PROG")]
        program: String,
        /// server (or listen) or client (or connect).
        #[arg(value_name = "ROLE", value_parser = explain::parse_role)]
        role: conf::Role,
        /// Local address for a server, remote address for a client: 10.0.0.1:80 or [::1]:80.
        #[arg(value_name = "ADDR:PORT", value_parser = explain::parse_addr)]
        addr: std::net::SocketAddr,
    },

    /// Check a policy file and list every mistake in it.
    #[command(
        long_about = "Parses FILE with the grammar of the library. Prints `FILE: N rules OK` and \
                      exits 0, or prints every error as `file:line:column: expected ..., found ...` \
                      on its own line and exits 1."
    )]
    Check {
        /// The policy file, e.g. /etc/libsdp.conf.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },

    /// Show the sockets that running libsdp processes have offloaded.
    #[command(
        long_about = "Lists, for every process running with libsdp, its stream sockets: transport \
                      (SDP or TCP), state, bytes and messages each way, credits, sends that waited \
                      for credits, receives satisfied while busy-polling, ZCopy bytes, and why a \
                      socket fell back to TCP; then the sockets each process decided by fallback \
                      reason (since it started, and live) and its busy-poll counters.\n\n\
                      Columns and counters: docs/OBSERVABILITY.md."
    )]
    Stat {
        /// One JSON object per socket, one per line, then the summary objects.
        #[arg(long)]
        json: bool,
        /// Print the listing again every SECONDS seconds, like watch(1).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
        watch: Option<u64>,
        /// With --watch: stop after N listings.
        #[arg(long, value_name = "N", requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },

    /// Compare workloads without and with libsdp, side by side in one run.
    #[command(
        long_about = "Runs each workload alternately without libsdp and with libsdp (under --conf, \
                      or the default policy) and prints one line per metric:\n  \
                      bench <name> base=<v> libsdp=<v> ratio=<libsdp/base> unit=<u>\n\n\
                      Needs libsdp.so next to the sdp executable, and the workloads' tools \
                      (sockperf, iperf3)."
    )]
    Bench {
        /// Short run, under five minutes in all on an idle machine.
        #[arg(long)]
        quick: bool,
        /// Policy file for the libsdp leg.
        #[arg(long, value_name = "FILE")]
        conf: Option<PathBuf>,
        /// Run only workloads or metrics whose name contains NAME (repeatable).
        #[arg(long, value_name = "NAME")]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { conf, lib, command } => run::run(conf, lib, command),
        Command::Explain {
            conf,
            program,
            role,
            addr,
        } => explain::explain(conf.as_deref(), &program, role, &addr),
        Command::Check { file } => check::check(&file),
        Command::Stat { json, watch, count } => stat::stat(stat::StatOpts { json, watch, count }),
        Command::Bench { quick, conf, only } => {
            match bench::run(&bench::BenchOpts { quick, conf, only }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sdp bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
