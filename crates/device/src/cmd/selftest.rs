//! `tern-device selftest`: Tern's fused float and int8 kernels on this CPU
//! against plain reference loops.

use std::process::ExitCode;

use anyhow::{anyhow, Result};
use tern_device::{fused, int8};

/// Arguments of `selftest`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs every kernel case; fails on the first mismatch.
pub fn run(_: Args) -> Result<ExitCode> {
    let cases = fused::check::all().map_err(|e| anyhow!("fused kernel check failed: {e:#}"))?;
    outln!(
        "fused ops: {} kernels ({} in plans on this CPU); {cases} cases match plain reference loops",
        fused::kernel_isa(),
        if fused::supported() { "used" } else { "not used" }
    );
    let cases = int8::check::all().map_err(|e| anyhow!("int8 kernel check failed: {e:#}"))?;
    outln!("int8 ops: {} kernels; {cases} cases equal plain integer reference loops", int8::kernel_isa());
    outln!("int8 ops: {}", int8::check::variants());
    Ok(ExitCode::SUCCESS)
}
