//! Cameras, in a build without the `camera` feature: the same API as the
//! V4L2 module, every call saying that camera support was not compiled in.

use anyhow::{bail, Result};

use crate::source::FrameSource;

/// Whether this build can open cameras.
pub const AVAILABLE: bool = false;

const MISSING: &str = "this tern-device was built without camera support; \
rebuild with `cargo build --release -p tern-device --features camera` (needs libclang)";

/// What to open: `0`, `/dev/video2`, with an optional resolution and rate.
#[derive(Debug, Clone, Default)]
pub struct CameraSpec {
    /// Index or device path.
    pub device: String,
    /// Wanted resolution (width, height).
    pub resolution: Option<(u32, u32)>,
    /// Wanted frame rate.
    pub fps: Option<u32>,
}

/// A camera found on the system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CameraInfo {
    /// Index to pass to `--camera`.
    pub index: String,
    /// Human-readable name.
    pub name: String,
    /// Driver description.
    pub description: String,
    /// Supported formats, e.g. `MJPEG 1280x720@30`.
    pub formats: Vec<String>,
}

/// Lists the cameras (never succeeds in this build).
pub fn list() -> Result<Vec<CameraInfo>> {
    bail!(MISSING)
}

/// Opens a camera (never succeeds in this build).
pub fn open(_spec: &CameraSpec) -> Result<Box<dyn FrameSource>> {
    bail!(MISSING)
}
