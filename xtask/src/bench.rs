//! `cargo xtask bench ...`: figures as ratios to a baseline taken in the same run.
use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// ns per call of a probed function: no probe, afetm event path, bpftrace, for an entry
    /// instruction the kernel emulates and one it single-steps; and events/s end to end.
    Probe,
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Probe => bail!("not yet"),
    }
}
