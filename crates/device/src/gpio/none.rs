//! GPIO pins, in a build without the `gpio` feature: the same API as the
//! cdev module, every call saying that GPIO support was not compiled in.

use anyhow::{bail, Result};

/// Whether this build can drive GPIO pins.
pub const AVAILABLE: bool = false;

/// A GPIO output line (never constructed in this build).
pub enum Pin {}

impl embedded_hal::digital::ErrorType for Pin {
    type Error = core::convert::Infallible;
}

impl embedded_hal::digital::OutputPin for Pin {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        match *self {}
    }

    fn set_high(&mut self) -> Result<(), Self::Error> {
        match *self {}
    }
}

/// Requests `line` of `chip` (e.g. `/dev/gpiochip0`) as an output, low
/// (never succeeds in this build).
pub fn output(_chip: &str, _line: u32) -> Result<Pin> {
    bail!(
        "this tern-device was built without GPIO support; \
         rebuild with `cargo build --release -p tern-device --features gpio`"
    )
}
