//! Regions of interest: named rectangles of the frame (`--roi
//! NAME=x,y,w,h`, in pixels), each cropped and classified on its own, with
//! its own smoothing, hysteresis, events, GPIO rules and MQTT topic (two
//! parking spots, two bird feeders).
//!
//! A region name is 1 to [`MAX_NAME`] characters of `A-Z a-z 0-9 _ -`, so
//! that it is one MQTT topic level and one Home Assistant object id as it
//! stands. The frame size is known only once frames arrive: a region that
//! reaches past the edge of a frame is clamped to it, and one wholly
//! outside is not classified; both are reported once per frame size
//! ([`Region::fit`]).

use anyhow::{anyhow, bail, Result};
use image::RgbImage;

/// Longest region name.
pub const MAX_NAME: usize = 32;
/// Most regions.
pub const MAX_REGIONS: usize = 64;

/// One region of interest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Its name: a topic level, a key in events.
    pub name: String,
    /// Left edge, pixels.
    pub x: u32,
    /// Top edge, pixels.
    pub y: u32,
    /// Width, pixels (> 0).
    pub w: u32,
    /// Height, pixels (> 0).
    pub h: u32,
}

/// How a region lies in a frame of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Wholly inside: `(x, y, w, h)` as given.
    Inside((u32, u32, u32, u32)),
    /// Partly outside: the part inside.
    Clamped((u32, u32, u32, u32)),
    /// Wholly outside the frame.
    Outside,
}

/// Whether `name` is a valid region name (see the module docs).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Region {
    /// Parses `NAME=x,y,w,h` (pixels; width and height at least 1).
    pub fn parse(s: &str) -> Result<Region> {
        let (name, rect) =
            s.split_once('=').ok_or_else(|| anyhow!("--roi {s:?}: expected NAME=x,y,w,h (pixels of the frame)"))?;
        let name = name.trim();
        if !valid_name(name) {
            bail!(
                "--roi {s:?}: region name {name:?} must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 _ - \
                 (it becomes an MQTT topic level)"
            );
        }
        let parts: Vec<&str> = rect.split(',').map(str::trim).collect();
        let [x, y, w, h] = parts[..] else {
            bail!("--roi {s:?}: expected four numbers x,y,w,h after the name, found {}", parts.len());
        };
        let num = |v: &str, what: &str| -> Result<u32> {
            v.parse::<u32>().map_err(|_| anyhow!("--roi {s:?}: {what} {v:?} is not a whole number of pixels >= 0"))
        };
        let (x, y, w, h) = (num(x, "x")?, num(y, "y")?, num(w, "width")?, num(h, "height")?);
        if w == 0 || h == 0 {
            bail!("--roi {s:?}: width and height must be at least 1 pixel");
        }
        if x.checked_add(w).is_none() || y.checked_add(h).is_none() {
            bail!("--roi {s:?}: the region ends past 2^32 pixels");
        }
        Ok(Region { name: name.to_owned(), x, y, w, h })
    }

    /// Parses every `--roi` value and checks that the names are unique.
    pub fn parse_all(values: &[String]) -> Result<Vec<Region>> {
        if values.len() > MAX_REGIONS {
            bail!("--roi given {} times: at most {MAX_REGIONS} regions", values.len());
        }
        let mut regions: Vec<Region> = Vec::with_capacity(values.len());
        for v in values {
            let r = Region::parse(v)?;
            if regions.iter().any(|o| o.name == r.name) {
                bail!("--roi {v:?}: region name {:?} is used twice", r.name);
            }
            regions.push(r);
        }
        Ok(regions)
    }

    /// How this region lies in a `width` × `height` frame.
    pub fn fit(&self, width: u32, height: u32) -> Fit {
        if self.x >= width || self.y >= height {
            return Fit::Outside;
        }
        let w = self.w.min(width - self.x);
        let h = self.h.min(height - self.y);
        if (w, h) == (self.w, self.h) {
            Fit::Inside((self.x, self.y, w, h))
        } else {
            Fit::Clamped((self.x, self.y, w, h))
        }
    }

    /// The region's pixels of `frame` (clamped to it), or `None` when the
    /// region lies wholly outside.
    pub fn crop(&self, frame: &RgbImage) -> Option<RgbImage> {
        let (x, y, w, h) = match self.fit(frame.width(), frame.height()) {
            Fit::Inside(r) | Fit::Clamped(r) => r,
            Fit::Outside => return None,
        };
        Some(image::imageops::crop_imm(frame, x, y, w, h).to_image())
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={},{},{},{}", self.name, self.x, self.y, self.w, self.h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_regions() {
        let r = Region::parse("spot-1=10, 20,30,40").unwrap();
        assert_eq!(r, Region { name: "spot-1".into(), x: 10, y: 20, w: 30, h: 40 });
        assert_eq!(r.to_string(), "spot-1=10,20,30,40");
        for (bad, why) in [
            ("spot", "NAME=x,y,w,h"),
            ("=1,2,3,4", "region name"),
            ("a/b=1,2,3,4", "region name"),
            ("a+=1,2,3,4", "region name"),
            ("caf\u{e9}=1,2,3,4", "region name"),
            ("a=1,2,3", "four numbers"),
            ("a=1,2,3,4,5", "four numbers"),
            ("a=-1,2,3,4", "x \"-1\""),
            ("a=1,2,x,4", "width"),
            ("a=1,2,0,4", "at least 1"),
            ("a=4294967295,0,2,2", "2^32"),
        ] {
            let e = format!("{:#}", Region::parse(bad).unwrap_err());
            assert!(e.contains(why) && e.contains("--roi"), "{bad}: {e}");
        }
        let long = format!("{}=0,0,1,1", "n".repeat(MAX_NAME + 1));
        assert!(Region::parse(&long).is_err());
        let e = Region::parse_all(&["a=0,0,1,1".into(), "a=1,1,1,1".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("used twice"), "{e:#}");
        assert_eq!(Region::parse_all(&["a=0,0,1,1".into(), "b=1,1,1,1".into()]).unwrap().len(), 2);
    }

    #[test]
    fn regions_are_clamped_to_the_frame() {
        let r = Region::parse("a=30,20,20,20").unwrap();
        assert_eq!(r.fit(64, 48), Fit::Inside((30, 20, 20, 20)));
        assert_eq!(r.fit(40, 48), Fit::Clamped((30, 20, 10, 20)));
        assert_eq!(r.fit(30, 48), Fit::Outside);
        let mut frame = RgbImage::new(40, 30);
        frame.put_pixel(30, 20, image::Rgb([1, 2, 3]));
        let crop = r.crop(&frame).unwrap();
        assert_eq!(crop.dimensions(), (10, 10));
        assert_eq!(crop.get_pixel(0, 0).0, [1, 2, 3]);
        assert!(Region::parse("b=40,0,5,5").unwrap().crop(&frame).is_none());
    }
}
