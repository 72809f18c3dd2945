//! `tern-device`: classify images with a Tern bundle.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// Runs Tern bundles on the device with tract.
#[derive(Parser)]
#[command(name = "tern-device", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify image files.
    Classify(cmd::classify::Args),
    /// Accuracy on a labelled ImageFolder (the split `tern-host train` used).
    Eval(cmd::eval::Args),
    /// Print a bundle's manifest.
    Info(cmd::info::Args),
    /// Classify a camera, video, image folder or synthetic source
    /// continuously: smoothing, thresholds, events, GPIO, MQTT, hot reload.
    Run(cmd::run::Args),
    /// Review captured frames (`run --capture DIR`): list, confirm, move, delete.
    Review(cmd::review::Args),
    /// List the cameras and their formats.
    Cameras(cmd::cameras::Args),
    /// Measure a bundle: cold start, latency percentiles, throughput, peak
    /// memory, size; optionally a per-operator profile.
    Bench(cmd::bench::Args),
    /// Check Tern's fused kernels on this CPU against plain reference loops.
    Selftest(cmd::selftest::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Classify(a) => cmd::classify::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Review(a) => cmd::review::run(a),
        Command::Cameras(a) => cmd::cameras::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Selftest(a) => cmd::selftest::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", tern_device::events::escape_for_terminal(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
