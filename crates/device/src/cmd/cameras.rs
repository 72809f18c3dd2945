//! `tern-device cameras`: the cameras this machine has, and their formats.

use std::process::ExitCode;

use anyhow::Result;
use tern_device::camera;

/// Arguments of `cameras`.
#[derive(clap::Args)]
pub struct Args {
    /// One JSON object per camera instead of text.
    #[arg(long)]
    json: bool,
}

/// Lists the cameras; none found is not an error.
pub fn run(a: Args) -> Result<ExitCode> {
    let cams = camera::list()?;
    if a.json {
        for c in &cams {
            outln!("{}", serde_json::to_string(c)?);
        }
    } else if cams.is_empty() {
        outln!("no cameras found (no /dev/video* device this user can open)");
    } else {
        for c in &cams {
            outln!("{}: {} ({})", c.index, c.name, c.description);
            for f in &c.formats {
                outln!("    {f}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
