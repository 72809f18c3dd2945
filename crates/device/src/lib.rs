//! Tern on the device: load a bundle once, classify images and frames with
//! tract on the CPU.
#![deny(missing_docs)]

pub mod engine;
pub mod npy;

pub use engine::{Classifier, Output, Ranked};
