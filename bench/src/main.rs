//! `msharefs-bench`: the evidence, side by side, in one run (docs/BENCHMARKS.md).
//!
//! A tool of its own, not part of the product: it drives msharefs only as a user would,
//! through the `msharefs` binary's command line (`mount`, `stat --json`, `umount --purge`)
//! and libmshare, and never links the daemon.
//!
//! ```text
//! msharefs-bench [--attachers N] [--size-gib G] [--configs a,b] [--storm N] [--lock PATH]
//!                [--msharefs PATH] [--json F] [--csv F] [--plot F.svg] [--quick] ...
//! ```
//!
//! Modules: `run` (the order of a run, the memory guard, time budgets, clean-up on
//! signals), `storm` (`--storm`: N attachers released at once), `attacher` (the hidden
//! `attacher` process), `fleet` (starting attachers and talking to them), `setup` (each
//! configuration's memory and the bench's own mounts), `mem` (mapping at kernel-chosen
//! addresses with memmap2, and the loops that touch and sweep mapped memory), `report`
//! (table, JSON, CSV, SVG).

mod attacher;
mod fleet;
mod mem;
mod report;
mod run;
mod setup;
mod storm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// msharefs-bench: page tables, faults, attach time and bandwidth of msharefs against
/// plain shared memory, side by side; `--storm N` releases N attachers at once.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    bench: run::BenchArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// One attacher process of the bench (internal).
    #[command(hide = true)]
    Attacher(attacher::AttacherArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Attacher(args)) => attacher::run(args),
        None => run::run(cli.bench),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msharefs-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
