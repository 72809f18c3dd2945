//! Flags of `run` for regions of interest, flattened into
//! [`super::run::Args`].

use anyhow::Result;
use tern_device::roi::Region;

/// Regions of interest.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RoiArgs {
    /// A region of the frame classified on its own, with its own smoothing,
    /// events and GPIO rules (`--gpio NAME:LABEL=LINE`):
    /// `NAME=x,y,w,h` in pixels (repeatable). NAME: 1-32 of A-Z a-z 0-9 _ -.
    #[arg(long = "roi", value_name = "NAME=x,y,w,h")]
    pub roi: Vec<String>,
}

impl RoiArgs {
    /// The regions, checked (names unique and topic-safe, sizes > 0).
    pub fn regions(&self) -> Result<Vec<Region>> {
        Region::parse_all(&self.roi)
    }
}
