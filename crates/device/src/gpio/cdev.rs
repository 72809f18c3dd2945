//! GPIO pins through the Linux GPIO character device (`/dev/gpiochipN`),
//! with `linux-embedded-hal`'s `embedded-hal` 1.0 `OutputPin`.

use anyhow::{Context, Result};
use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};

/// Whether this build can drive GPIO pins.
pub const AVAILABLE: bool = true;

/// A GPIO output line.
pub type Pin = linux_embedded_hal::CdevPin;

/// Requests `line` of `chip` (e.g. `/dev/gpiochip0`) as an output, low.
/// The user needs write access to the chip (the `gpio` group on Raspberry
/// Pi OS; see deploy/README.md).
pub fn output(chip: &str, line: u32) -> Result<Pin> {
    let mut c = Chip::new(chip).with_context(|| format!("cannot open GPIO chip {chip}"))?;
    let l = c.get_line(line).with_context(|| format!("{chip} has no line {line}"))?;
    let handle = l
        .request(LineRequestFlags::OUTPUT, 0, "tern-device")
        .with_context(|| format!("cannot request {chip} line {line} as an output (in use, or no permission?)"))?;
    linux_embedded_hal::CdevPin::new(handle).with_context(|| format!("cannot read the state of {chip} line {line}"))
}
