//! Cameras, in a build without the `camera` feature: the same API as the
//! V4L2 module, every call saying that camera support was not compiled in.

use anyhow::{bail, Result};

use super::{CameraInfo, CameraSpec};
use crate::source::FrameSource;

/// Whether this build can open cameras.
pub const AVAILABLE: bool = false;

const MISSING: &str = "this tern-device was built without camera support; \
rebuild with `cargo build --release -p tern-device --features camera` (needs libclang)";

/// Lists the cameras (never succeeds in this build).
pub fn list() -> Result<Vec<CameraInfo>> {
    bail!(MISSING)
}

/// Opens a camera (never succeeds in this build).
pub fn open(_spec: &CameraSpec) -> Result<Box<dyn FrameSource>> {
    bail!(MISSING)
}
