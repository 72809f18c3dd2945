//! Tern on the device: load a bundle once, classify images and frames with
//! tract on the CPU.
#![deny(missing_docs)]

pub mod actions;
#[cfg_attr(feature = "camera", path = "camera/v4l.rs")]
#[cfg_attr(not(feature = "camera"), path = "camera/none.rs")]
pub mod camera;
pub mod engine;
pub mod events;
#[cfg_attr(feature = "gpio", path = "gpio/cdev.rs")]
#[cfg_attr(not(feature = "gpio"), path = "gpio/none.rs")]
pub mod gpio;
pub mod kernels;
pub mod mqtt;
pub mod reload;
pub mod runloop;
pub mod smooth;
pub mod source;
pub mod trust;
pub mod web;
pub mod evaluate;
pub mod npy;
pub mod perf;
pub mod fused;

pub use engine::{Classifier, Kernels, LoadOptions, Output, Ranked};
