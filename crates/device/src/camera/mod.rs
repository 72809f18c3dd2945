//! Local cameras: what to open ([`CameraSpec`]), what was found
//! ([`CameraInfo`]), and the backend chosen by the `camera` feature —
//! nokhwa's V4L2 (`v4l.rs`) or a stand-in with the same API that says the
//! binary was built without camera support (`none.rs`). [`nodes`] explains
//! the machine's V4L2 device nodes in either build.

#[cfg_attr(feature = "camera", path = "v4l.rs")]
#[cfg_attr(not(feature = "camera"), path = "none.rs")]
mod backend;

pub mod nodes;

pub use backend::{list, open, AVAILABLE};

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
