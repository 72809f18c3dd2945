//! Choosing where tch computes.

use anyhow::{bail, Result};

/// `--device` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    Auto,
    /// Always the CPU.
    Cpu,
    /// The first CUDA GPU; an error when none is usable.
    Cuda,
}

/// Resolves `choice` to a tch device.
pub fn select(choice: DeviceChoice) -> Result<tch::Device> {
    match choice {
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Auto => Ok(tch::Device::cuda_if_available()),
        DeviceChoice::Cuda => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: libtorch sees no usable CUDA device (tch::Cuda::is_available() is false)");
            }
            Ok(tch::Device::Cuda(0))
        }
    }
}
