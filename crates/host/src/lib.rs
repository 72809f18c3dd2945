//! Tern on the workstation: the pretrained backbone in tch, transfer
//! learning of a new head, and export of bundles through the format crate.
#![deny(missing_docs)]

pub mod backbone;
pub mod data;
pub mod device;
pub mod metrics;
pub mod plot;
pub mod pretrained;
pub mod quantize;
pub mod signing;
pub mod train;
pub mod viz;
