//! `loadgen`: open-loop load generator for Shoal (scenarios arrive with the
//! loadgen issue; this binary already builds against the protocol crate).

use clap::Parser;

/// Shoal load generator.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Opt {}

fn main() -> anyhow::Result<()> {
    let _opt = Opt::parse();
    Ok(())
}
