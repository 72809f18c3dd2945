//! Tern on the device: load a bundle once, classify images and frames with
//! tract on the CPU.
#![deny(missing_docs)]

pub mod actions;
pub mod camera;
pub mod capture;
pub mod engine;
pub mod events;
#[cfg_attr(feature = "gpio", path = "gpio/cdev.rs")]
#[cfg_attr(not(feature = "gpio"), path = "gpio/none.rs")]
pub mod gpio;
pub mod ha;
pub mod kernels;
pub mod mqtt;
pub mod netcam;
pub mod reload;
pub mod roi;
pub mod runloop;
pub mod secret;
pub mod smooth;
pub mod snapshot;
pub mod source;
pub mod trust;
pub mod web;
pub mod evaluate;
pub mod npy;
pub mod perf;
pub mod fused;
pub mod int8;
pub mod threads;

pub use engine::{Classifier, Kernels, LoadOptions, Output, Ranked};
