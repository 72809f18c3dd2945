//! `tern-host`: train, export and inspect Tern models on a workstation.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// Transfer learning of MobileNet-family classifiers with libtorch.
#[derive(Parser)]
#[command(name = "tern-host", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the pretrained backbone with its ImageNet head as a bundle.
    ExportPretrained(cmd::export_pretrained::Args),
    /// Classify images with the pretrained network in libtorch (a reference
    /// for the device's results).
    Predict(cmd::predict::Args),
    /// Feature maps of chosen layers for one photo, as PNG grids.
    Features(cmd::features::Args),
    /// An "ideal" image of a class by gradient ascent with a total-variation penalty.
    Dream(cmd::dream::Args),
    /// A targeted (or untargeted) adversarial example within an L∞ budget.
    Attack(cmd::attack::Args),
    /// Transfer learning on an ImageFolder: frozen pretrained backbone, new
    /// head, optional fine-tuning; writes the float bundle and a report.
    Train(cmd::train::Args),
    /// A bundle's accuracy through tract (the device's code path), checked
    /// against the host's own predictions.
    Eval(cmd::eval::Args),
    /// Static post-training int8 quantization of a bundle, calibrated on
    /// real images, compared with float on held-out ones.
    Quantize(cmd::quantize::Args),
    /// A key pair for signing bundles: KEY (secret) and KEY.pub (for the
    /// devices' `--trust`).
    Keygen(cmd::keygen::Args),
    /// Sign bundles in place with a secret key.
    Sign(cmd::sign::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::ExportPretrained(a) => cmd::export_pretrained::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Features(a) => cmd::features::run(a),
        Command::Dream(a) => cmd::dream::run(a),
        Command::Attack(a) => cmd::attack::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Sign(a) => cmd::sign::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
