//! `sdp bench`: every workload twice in one run, without libsdp (`base`) and with it
//! (`libsdp`), and one line per metric:
//!
//! ```text
//! bench <name> base=<v> libsdp=<v> ratio=<libsdp/base> unit=<u>
//! ```
//!
//! Noise control is the point of this module, since the pass-through bar is 2%:
//! - the two legs alternate within one run, in ABBA order (`base libsdp`, then
//!   `libsdp base`, …), so a slow drift of the machine (thermal, a neighbour's build)
//!   weighs on both legs alike instead of on whichever leg ran last;
//! - one discarded warm-up repetition per leg fills page caches and wakes the CPU;
//! - every figure is a median over repetitions, and workloads that can, report a median
//!   over batches inside one repetition as well;
//! - measured processes are pinned to one CPU (the last one we may use). Ping-pong
//!   latency across the two vCPUs of a small VM is dominated by cross-CPU wake-ups
//!   (about 30 us ± 10% here); on one CPU it is a context switch (about 7 us ± 0.5%),
//!   and the cost the hooks add is a larger, steadier share of it.
//!
//! The legs: `base` runs every process of a workload without libsdp (kernel TCP);
//! `libsdp` runs every one of them, server and client alike, under the preload, with
//! `--conf FILE` as `LIBSDP_CONFIG_FILE` if given and the default policy otherwise
//! (SDP over `shm` between two preloaded processes on one host). During every
//! libsdp-leg run of a socket workload, the statistics `sdp stat` shows are read to
//! check which transport carried it ([`verify`]); a fallback to TCP where the policy
//! offloads is printed as `bench <name> note: libsdp leg ran over tcp (reason …)`.
//!
//! A workload is one entry in [`workloads::ALL`]: its metric names and units, the tools
//! it needs (with their apt package), repetition counts, the programs at its two ends,
//! and a function that performs one repetition for one leg and returns one value per
//! metric. Adding a workload is adding an entry there.

use std::path::PathBuf;

mod affinity;
mod fdloop;
mod idle;
mod iperf3;
mod loaded;
mod proc;
mod redis;
mod setup;
mod sockperf;
mod stats;
mod verify;
mod workloads;

pub use proc::Leg;

/// Options of `sdp bench`, filled by the command line in `main.rs`.
#[derive(Debug, Clone, Default)]
pub struct BenchOpts {
    /// Short run (under five minutes in all): fewer repetitions, shorter ones.
    pub quick: bool,
    /// Policy file for the libsdp leg (`LIBSDP_CONFIG_FILE`); default policy if none.
    pub conf: Option<PathBuf>,
    /// Run only workloads whose name, or one of whose metrics' names, contains one of
    /// these strings; everything if empty.
    pub only: Vec<String>,
}

/// Entry point of `sdp bench`.
///
/// The same entry point also serves the bench's own child processes: when the
/// environment carries [`fdloop::LOOP_ENV`], this process *is* the measured read/write
/// loop (started by a parent `sdp bench` with or without `LD_PRELOAD`), runs it, prints
/// its figure and exits; with [`setup::SETUP_ENV`] it is one end of the connection
/// setup loop. That keeps the loops inside the `sdp` binary without another
/// subcommand to wire.
pub fn run(opts: &BenchOpts) -> Result<(), String> {
    if let Some(spec) = std::env::var_os(fdloop::LOOP_ENV) {
        return fdloop::child_main(&spec.to_string_lossy());
    }
    if let Some(spec) = std::env::var_os(setup::SETUP_ENV) {
        return setup::child_main(&spec.to_string_lossy());
    }
    if let Some(spec) = std::env::var_os(idle::IDLE_ENV) {
        return idle::child_main(&spec.to_string_lossy());
    }
    if let Some(spec) = std::env::var_os(loaded::LOADED_ENV) {
        return loaded::child_main(&spec.to_string_lossy());
    }
    let selected: Vec<&workloads::Workload> = workloads::ALL
        .iter()
        .filter(|w| w.selected_by(&opts.only))
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "no workload matches {:?}; workloads: {}",
            opts.only,
            workloads::ALL
                .iter()
                .map(|w| w.name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // Every missing tool at once, before anything runs.
    let mut missing: Vec<String> = Vec::new();
    for w in &selected {
        for t in w.tools {
            if proc::find_in_path(t.binary).is_none() {
                let m = format!("`{}` (apt-get install {})", t.binary, t.apt_package);
                if !missing.contains(&m) {
                    missing.push(m);
                }
            }
        }
    }
    if !missing.is_empty() {
        return Err(format!("missing tools: {}", missing.join(", ")));
    }
    if let Some(conf) = &opts.conf
        && !conf.is_file()
    {
        return Err(format!("--conf {}: no such file", conf.display()));
    }
    let ctx = workloads::Ctx::new(opts)?;
    eprintln!(
        "sdp bench: {} run, libsdp = {}, policy = {}, measured on cpu {}",
        if opts.quick { "quick" } else { "full" },
        ctx.preload.display(),
        opts.conf
            .as_ref()
            .map_or("default".to_string(), |c| c.display().to_string()),
        ctx.cpu.map_or("any".to_string(), |c| c.to_string()),
    );
    for w in selected {
        run_workload(&ctx, w)?;
    }
    Ok(())
}

/// Runs one workload's warm-up and its alternating repetitions, then prints its lines.
fn run_workload(ctx: &workloads::Ctx, w: &workloads::Workload) -> Result<(), String> {
    let reps = if ctx.quick { w.reps.quick } else { w.reps.full };
    let legs = [ctx.base_leg(), ctx.libsdp_leg()];
    let started = std::time::Instant::now();
    let tally = std::cell::RefCell::new(verify::Tally::default());
    let one = |leg: &Leg| -> Result<Vec<f64>, String> {
        let port = proc::free_port()?;
        // Watched in both legs alike (the base leg finds nothing), so the reads of the
        // statistics cost both legs the same.
        let watch = w.peers.map(|_| verify::Watch::start(port, ctx.cpu));
        let values = (w.run)(ctx, leg, port).map_err(|e| format!("{} ({leg}): {e}", w.name));
        if let (Some((server, client)), Some(watch), Leg::Libsdp { .. }) = (w.peers, watch, leg) {
            tally
                .borrow_mut()
                .record(watch, ctx.expect.offload(server, client, port));
        }
        let values = values?;
        if values.len() != w.metrics.len() {
            return Err(format!(
                "{}: returned {} values for {} metrics",
                w.name,
                values.len(),
                w.metrics.len()
            ));
        }
        Ok(values)
    };
    if w.warmup {
        for leg in &legs {
            one(leg)?; // discarded
        }
    }
    // samples[leg][metric] = values over repetitions
    let mut samples = vec![vec![Vec::with_capacity(reps); w.metrics.len()]; 2];
    for rep in 0..reps {
        // ABBA: even repetitions run base first, odd ones libsdp first.
        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for li in order {
            for (m, v) in one(&legs[li])?.into_iter().enumerate() {
                samples[li][m].push(v);
            }
        }
    }
    let tally = tally.into_inner();
    eprintln!(
        "sdp bench: {} done: {} repetitions per leg in {:.1} s{}",
        w.name,
        reps,
        started.elapsed().as_secs_f64(),
        if w.peers.is_some() {
            format!("; {}", tally.summary())
        } else {
            String::new()
        }
    );
    for (m, metric) in w.metrics.iter().enumerate() {
        let (base, lib) = (&samples[0][m], &samples[1][m]);
        eprintln!(
            "sdp bench: {}: base {} libsdp {}",
            metric.name,
            stats::spread(base),
            stats::spread(lib),
        );
        println!(
            "{}",
            stats::line(
                metric.name,
                stats::median(base),
                stats::median(lib),
                metric.unit
            )
        );
        for note in tally.notes(metric.name) {
            println!("{note}");
        }
    }
    Ok(())
}
