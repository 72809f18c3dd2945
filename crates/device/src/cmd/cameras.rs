//! `tern-device cameras`: the V4L2 device nodes of this machine, whether
//! each can be read and if not why and the fix, and their formats.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use tern_device::camera::{self, nodes};

/// Arguments of `cameras`.
#[derive(clap::Args)]
pub struct Args {
    /// One JSON object per device node instead of text.
    #[arg(long)]
    json: bool,
    /// Where the device nodes are (tests point it elsewhere).
    #[arg(long, default_value = "/dev", hide = true)]
    dev_dir: PathBuf,
}

/// Lists the device nodes; none found, or none usable, is not an error.
pub fn run(a: Args) -> Result<ExitCode> {
    let found = nodes::scan(&a.dev_dir).with_context(|| format!("cannot read {}", a.dev_dir.display()))?;
    // nokhwa's view (resolutions and rates), in camera builds.
    let modes = if camera::AVAILABLE { camera::list().unwrap_or_default() } else { Vec::new() };
    let missing = "this tern-device was built without camera support, so `run --camera` will not work; \
                   rebuild with `cargo build --release -p tern-device --features camera`";
    if a.json {
        for n in &found {
            outln!("{}", serde_json::to_string(n)?);
        }
        if !camera::AVAILABLE {
            eprintln!("note: {missing}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if found.is_empty() {
        outln!(
            "no cameras: no video* device nodes in {} (is a camera plugged in? see `dmesg | tail`); \
             network cameras work without one: run --url",
            a.dev_dir.display()
        );
    }
    for n in &found {
        let what = match (&n.driver, &n.card) {
            (Some(d), Some(c)) => format!(" {c} ({d}),"),
            _ => String::new(),
        };
        match &n.status {
            nodes::Status::Ready => outln!("{}:{what} ready", n.path.display()),
            nodes::Status::Problem { reason, fix } => {
                outln!("{}:{what} {reason}", n.path.display());
                outln!("    fix: {fix}");
            }
        }
        if !n.formats.is_empty() {
            outln!("    formats: {}", n.formats.join(", "));
        }
        let index = n.path.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_prefix("video")).unwrap_or("");
        for m in modes.iter().filter(|m| m.index == index) {
            for f in &m.formats {
                outln!("    {f}");
            }
        }
    }
    if !camera::AVAILABLE {
        outln!("note: {missing}");
    }
    Ok(ExitCode::SUCCESS)
}
