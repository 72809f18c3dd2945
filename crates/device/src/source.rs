//! Frame sources behind one trait: a camera ([`crate::camera`]), a folder of
//! images, a numbered image sequence, an MJPEG video file, and a synthetic
//! source for tests and soaks.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use tern_model_format::preprocess::{decode_image, open_image};

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Frame number, counted by the source from 0.
    pub index: u64,
    /// The pixels.
    pub image: RgbImage,
    /// When the frame was captured.
    pub captured: Instant,
    /// A name for the frame (its file), if it has one.
    pub name: Option<String>,
}

/// Why a source gave no frame.
#[derive(Debug)]
pub enum SourceError {
    /// This frame is unusable (a corrupt file, a garbled camera buffer);
    /// the next one may be fine.
    BadFrame(anyhow::Error),
    /// The source is gone (camera unplugged); it must be reopened.
    Lost(anyhow::Error),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::BadFrame(e) => write!(f, "bad frame: {e:#}"),
            SourceError::Lost(e) => write!(f, "source lost: {e:#}"),
        }
    }
}

impl std::error::Error for SourceError {}

/// Something that produces frames.
pub trait FrameSource {
    /// What this source is, for logs (`folder data/frames`, `camera /dev/video0`).
    fn describe(&self) -> String;

    /// The next frame; `Ok(None)` at the end of a finite source.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;

    /// Opens the source again after [`SourceError::Lost`].
    fn reopen(&mut self) -> Result<()> {
        Err(anyhow!("{} cannot be reopened", self.describe()))
    }
}

/// Image files, read in order: a folder's images or a numbered sequence.
pub struct ImageFiles {
    what: String,
    files: Vec<PathBuf>,
    next: usize,
    index: u64,
    repeat: bool,
    pace: Option<Pace>,
}

/// File name extensions read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pnm"];

impl ImageFiles {
    /// Every image in `dir` (by extension), sorted by file name.
    pub fn folder(dir: &Path) -> Result<ImageFiles> {
        let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
        let mut files = Vec::new();
        for e in entries {
            let path = e.with_context(|| format!("cannot read folder {}", dir.display()))?.path();
            let ext = path.extension().and_then(|x| x.to_str()).map(str::to_ascii_lowercase);
            if path.is_file() && ext.is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.as_str())) {
                files.push(path);
            }
        }
        if files.is_empty() {
            bail!("no images ({}) in {}", IMAGE_EXTENSIONS.join(", "), dir.display());
        }
        files.sort();
        Ok(ImageFiles::from_files(format!("folder {}", dir.display()), files))
    }

    /// A numbered sequence such as `frames/%05d.png`: numbers from 0 (or
    /// from 1 if there is no 0) up to the first missing file.
    pub fn sequence(pattern: &str) -> Result<ImageFiles> {
        let name = |n: u64| -> Result<PathBuf> { Ok(PathBuf::from(format_number(pattern, n)?)) };
        let first = if name(0)?.is_file() { 0 } else { 1 };
        let mut files = Vec::new();
        let mut n = first;
        while name(n)?.is_file() {
            files.push(name(n)?);
            n += 1;
        }
        if files.is_empty() {
            bail!("no file matches {pattern} (tried {} and {})", name(0)?.display(), name(1)?.display());
        }
        Ok(ImageFiles::from_files(format!("sequence {pattern}"), files))
    }

    /// The given files, in this order.
    pub fn from_files(what: String, files: Vec<PathBuf>) -> ImageFiles {
        ImageFiles { what, files, next: 0, index: 0, repeat: false, pace: None }
    }

    /// Starts again at the first file after the last one.
    pub fn repeat(mut self, yes: bool) -> Self {
        self.repeat = yes;
        self
    }

    /// Gives at most `fps` frames per second, like a camera would.
    pub fn fps(mut self, fps: Option<f64>) -> Self {
        self.pace = fps.map(Pace::new);
        self
    }

    /// How many files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl FrameSource for ImageFiles {
    fn describe(&self) -> String {
        format!("{} ({} images)", self.what, self.files.len())
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.next == self.files.len() {
            if !self.repeat || self.files.is_empty() {
                return Ok(None);
            }
            self.next = 0;
        }
        if let Some(p) = &mut self.pace {
            p.wait();
        }
        let path = &self.files[self.next];
        self.next += 1;
        let index = self.index;
        self.index += 1;
        let img = open_image(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(SourceError::BadFrame)?;
        Ok(Some(Frame {
            index,
            image: img.to_rgb8(),
            captured: Instant::now(),
            name: Some(path.display().to_string()),
        }))
    }

    fn reopen(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Widest number of a sequence pattern (`%020d`: every u64 fits).
pub const MAX_SEQUENCE_WIDTH: usize = 20;

/// Replaces the one `%d` / `%0Nd` in `pattern` with `n`.
fn format_number(pattern: &str, n: u64) -> Result<String> {
    let start = pattern.find('%').ok_or_else(|| anyhow!("sequence pattern {pattern:?} has no %d or %05d"))?;
    let rest = &pattern[start + 1..];
    let d = rest.find('d').ok_or_else(|| anyhow!("sequence pattern {pattern:?}: expected %d or %0Nd"))?;
    let spec = &rest[..d];
    let width: usize = if spec.is_empty() {
        0
    } else if spec.starts_with('0') && spec.len() > 1 {
        match spec[1..].parse() {
            Ok(w) if w <= MAX_SEQUENCE_WIDTH => w,
            _ => bail!("sequence pattern {pattern:?}: width {spec:?} is not a number up to {MAX_SEQUENCE_WIDTH}"),
        }
    } else {
        bail!("sequence pattern {pattern:?}: expected %d or %0Nd")
    };
    if rest[d + 1..].contains('%') {
        bail!("sequence pattern {pattern:?} has more than one %");
    }
    Ok(format!("{}{n:0width$}{}", &pattern[..start], &rest[d + 1..]))
}

/// Largest frame accepted in an MJPEG file (32 MiB).
pub const MAX_MJPEG_FRAME: usize = 32 << 20;

/// A Motion-JPEG file: JPEG images one after another, as written by
/// `ffmpeg -i video.mp4 -f mjpeg video.mjpeg` or by many IP cameras.
pub struct MjpegFile {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    eof: bool,
    index: u64,
    repeat: bool,
    pace: Option<Pace>,
}

impl MjpegFile {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<MjpegFile> {
        let file = File::open(path).with_context(|| format!("cannot open video {}", path.display()))?;
        Ok(MjpegFile { path: path.to_owned(), file, buf: Vec::new(), eof: false, index: 0, repeat: false, pace: None })
    }

    /// Starts again at the first frame after the last one.
    pub fn repeat(mut self, yes: bool) -> Self {
        self.repeat = yes;
        self
    }

    /// Gives at most `fps` frames per second.
    pub fn fps(mut self, fps: Option<f64>) -> Self {
        self.pace = fps.map(Pace::new);
        self
    }

    /// The bytes of the next JPEG, or `None` at the end of the file.
    fn next_jpeg(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            // A frame runs from SOI (FF D8) to an EOI (FF D9) followed by the
            // next SOI or the end of the file, so that a thumbnail inside a
            // frame does not end it.
            if let Some(start) = find(&self.buf, &[0xFF, 0xD8], 0) {
                let mut from = start + 2;
                while let Some(end) = find(&self.buf, &[0xFF, 0xD9], from) {
                    let after = end + 2;
                    let next_is_soi = self.buf.get(after..after + 2) == Some(&[0xFF, 0xD8][..]);
                    if next_is_soi || (self.eof && self.buf[after..].iter().all(|b| b.is_ascii_whitespace() || *b == 0))
                    {
                        let frame = self.buf[start..after].to_vec();
                        self.buf.drain(..after);
                        return Ok(Some(frame));
                    }
                    if after + 2 > self.buf.len() && !self.eof {
                        break; // need more bytes to know what follows
                    }
                    from = after;
                }
            } else if self.buf.len() > 1 {
                // Keep a possible half marker.
                let keep = self.buf.len() - 1;
                self.buf.drain(..keep);
            }
            if self.eof {
                if self.buf.iter().any(|&b| b != 0) && find(&self.buf, &[0xFF, 0xD8], 0).is_some() {
                    let n = self.buf.len();
                    self.buf.clear();
                    bail!("{}: the last frame ({n} bytes) is truncated", self.path.display());
                }
                return Ok(None);
            }
            if self.buf.len() > MAX_MJPEG_FRAME {
                let n = self.buf.len();
                self.buf.clear();
                bail!("{}: no frame end within {n} bytes (not MJPEG?)", self.path.display());
            }
            let mut chunk = vec![0u8; 1 << 16];
            let n = self.file.read(&mut chunk).with_context(|| format!("cannot read {}", self.path.display()))?;
            if n == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

impl FrameSource for MjpegFile {
    fn describe(&self) -> String {
        format!("mjpeg {}", self.path.display())
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let jpeg = match self.next_jpeg().map_err(SourceError::BadFrame)? {
            Some(j) => j,
            None if self.repeat && self.index > 0 => {
                self.reopen().map_err(SourceError::Lost)?;
                match self.next_jpeg().map_err(SourceError::BadFrame)? {
                    Some(j) => j,
                    None => return Ok(None),
                }
            }
            None => return Ok(None),
        };
        if let Some(p) = &mut self.pace {
            p.wait();
        }
        let index = self.index;
        self.index += 1;
        let img = decode_image(&jpeg)
            .with_context(|| format!("{}: frame {index}", self.path.display()))
            .map_err(SourceError::BadFrame)?;
        Ok(Some(Frame { index, image: img.to_rgb8(), captured: Instant::now(), name: None }))
    }

    fn reopen(&mut self) -> Result<()> {
        self.file = File::open(&self.path).with_context(|| format!("cannot open video {}", self.path.display()))?;
        self.buf.clear();
        self.eof = false;
        Ok(())
    }
}

/// Keeps a steady frame rate.
#[derive(Debug)]
pub(crate) struct Pace {
    period: Duration,
    next: Option<Instant>,
}

impl Pace {
    pub(crate) fn new(fps: f64) -> Pace {
        let period = if fps > 0.0 && fps.is_finite() { Duration::from_secs_f64(1.0 / fps) } else { Duration::ZERO };
        Pace { period, next: None }
    }

    pub(crate) fn wait(&mut self) {
        let now = Instant::now();
        let due = self.next.unwrap_or(now);
        if due > now {
            std::thread::sleep(due - now);
        }
        // Late frames do not accumulate a debt.
        self.next = Some(due.max(now) + self.period);
    }
}

/// A named colour of the synthetic source.
pub fn color(name: &str) -> Option<[u8; 3]> {
    Some(match name {
        "red" => [220, 30, 30],
        "green" => [30, 200, 40],
        "blue" => [30, 40, 220],
        "black" => [0, 0, 0],
        "white" => [255, 255, 255],
        "gray" | "grey" => [128, 128, 128],
        "yellow" => [230, 220, 30],
        "cyan" => [30, 210, 220],
        "magenta" => [220, 30, 210],
        hex if hex.len() == 7 && hex.starts_with('#') => {
            let v = u32::from_str_radix(&hex[1..], 16).ok()?;
            [(v >> 16) as u8, (v >> 8) as u8, v as u8]
        }
        _ => return None,
    })
}

/// Frames of solid colours with a little noise, from a script such as
/// `red*20,green,red*20`: for tests, soaks and demos without a camera.
#[derive(Debug, Clone)]
pub struct Synthetic {
    script: Vec<[u8; 3]>,
    width: u32,
    height: u32,
    noise: u8,
    repeat: bool,
    limit: Option<u64>,
    pace: Option<Duration>,
    lose: Option<LoseAfter>,
    next: usize,
    index: u64,
    rng: u64,
    last: Option<Instant>,
}

/// Makes a [`Synthetic`] source behave like an unplugged camera.
#[derive(Debug, Clone, Copy)]
pub struct LoseAfter {
    /// Frames given before the source is lost.
    pub frames: u64,
    /// How many reopen attempts fail before one succeeds.
    pub failed_reopens: u32,
}

impl Synthetic {
    /// Parses a script: comma-separated `COLOUR` or `COLOUR*N`, where
    /// COLOUR is a name ([`color`]) or `#rrggbb`.
    pub fn parse(script: &str) -> Result<Synthetic> {
        let mut frames = Vec::new();
        for item in script.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, n) = match item.split_once('*') {
                Some((c, n)) => {
                    let n: usize = n.trim().parse().map_err(|_| anyhow!("synthetic script: bad count in {item:?}"))?;
                    (c.trim(), n)
                }
                None => (item, 1),
            };
            let c = color(name).ok_or_else(|| anyhow!("synthetic script: unknown colour {name:?}"))?;
            if frames.len() + n > 10_000_000 {
                bail!("synthetic script: more than 10 000 000 frames; use --loop");
            }
            frames.extend(std::iter::repeat_n(c, n));
        }
        if frames.is_empty() {
            bail!("synthetic script {script:?} has no frames");
        }
        Ok(Synthetic {
            script: frames,
            width: 64,
            height: 48,
            noise: 24,
            repeat: false,
            limit: None,
            pace: None,
            lose: None,
            next: 0,
            index: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            last: None,
        })
    }

    /// Frame size (default 64×48).
    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.width = width.max(1);
        self.height = height.max(1);
        self
    }

    /// Noise amplitude added to each channel (default 24).
    pub fn noise(mut self, amplitude: u8) -> Self {
        self.noise = amplitude;
        self
    }

    /// Starts the script again after its end.
    pub fn repeat(mut self, yes: bool) -> Self {
        self.repeat = yes;
        self
    }

    /// Ends after `n` frames in all.
    pub fn limit(mut self, n: Option<u64>) -> Self {
        self.limit = n;
        self
    }

    /// Produces frames at `fps`, like a camera.
    pub fn fps(mut self, fps: Option<f64>) -> Self {
        self.pace = fps.filter(|f| *f > 0.0 && f.is_finite()).map(|f| Duration::from_secs_f64(1.0 / f));
        self
    }

    /// Simulates an unplugged camera.
    pub fn lose_after(mut self, lose: Option<LoseAfter>) -> Self {
        self.lose = lose;
        self
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: deterministic noise, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl FrameSource for Synthetic {
    fn describe(&self) -> String {
        format!(
            "synthetic ({} frames{}, {}x{})",
            self.script.len(),
            if self.repeat { ", looped" } else { "" },
            self.width,
            self.height
        )
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.limit.is_some_and(|l| self.index >= l) {
            return Ok(None);
        }
        if let Some(l) = self.lose {
            if self.index >= l.frames {
                return Err(SourceError::Lost(anyhow!("synthetic camera unplugged after {} frames", l.frames)));
            }
        }
        if self.next == self.script.len() {
            if !self.repeat {
                return Ok(None);
            }
            self.next = 0;
        }
        if let Some(period) = self.pace {
            if let Some(last) = self.last {
                let due = last + period;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            self.last = Some(Instant::now());
        }
        let base = self.script[self.next];
        self.next += 1;
        let mut img = RgbImage::new(self.width, self.height);
        let amp = i32::from(self.noise);
        for px in img.pixels_mut() {
            let r = self.random();
            for (c, v) in px.0.iter_mut().enumerate() {
                let n = if amp == 0 { 0 } else { ((r >> (c * 16)) % (2 * amp as u64 + 1)) as i32 - amp };
                *v = (i32::from(base[c]) + n).clamp(0, 255) as u8;
            }
        }
        let index = self.index;
        self.index += 1;
        Ok(Some(Frame { index, image: img, captured: Instant::now(), name: None }))
    }

    fn reopen(&mut self) -> Result<()> {
        if let Some(l) = &mut self.lose {
            if l.failed_reopens > 0 {
                l.failed_reopens -= 1;
                bail!("synthetic camera still unplugged");
            }
            self.lose = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_script() {
        let mut s = Synthetic::parse("red*2, #0000ff").unwrap().noise(0).size(4, 3);
        let colours: Vec<[u8; 3]> =
            std::iter::from_fn(|| s.next_frame().unwrap()).map(|f| f.image.get_pixel(1, 1).0).collect();
        assert_eq!(colours, vec![[220, 30, 30], [220, 30, 30], [0, 0, 255]]);
        assert!(Synthetic::parse("red*x").is_err());
        assert!(Synthetic::parse("mauve").is_err());
        assert!(Synthetic::parse(" , ").is_err());
    }

    #[test]
    fn synthetic_loss_and_reopen() {
        let mut s =
            Synthetic::parse("red").unwrap().repeat(true).lose_after(Some(LoseAfter { frames: 2, failed_reopens: 1 }));
        assert!(s.next_frame().unwrap().is_some());
        assert!(s.next_frame().unwrap().is_some());
        assert!(matches!(s.next_frame(), Err(SourceError::Lost(_))));
        assert!(s.reopen().is_err());
        s.reopen().unwrap();
        assert_eq!(s.next_frame().unwrap().unwrap().index, 2);
    }

    #[test]
    fn sequence_patterns() {
        assert_eq!(format_number("f/%05d.png", 42).unwrap(), "f/00042.png");
        assert_eq!(format_number("f%d.jpg", 7).unwrap(), "f7.jpg");
        assert_eq!(format_number("%020d", u64::MAX).unwrap(), "18446744073709551615");
        for bad in ["f.png", "f%5d.png", "%d%d", "f%x", "f%021d.png", "f%099999999999d.png", "f%0999999999999999999999d"] {
            assert!(format_number(bad, 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn mjpeg_frames_are_split_at_their_markers() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for c in [[255u8, 0, 0], [0, 0, 255]] {
            let img = image::RgbImage::from_pixel(16, 8, image::Rgb(c));
            let mut jpeg = Vec::new();
            image::DynamicImage::ImageRgb8(img)
                .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
                .unwrap();
            bytes.extend_from_slice(&jpeg);
        }
        let path = dir.path().join("v.mjpeg");
        std::fs::write(&path, &bytes).unwrap();
        let mut src = MjpegFile::open(&path).unwrap();
        let a = src.next_frame().unwrap().unwrap();
        let b = src.next_frame().unwrap().unwrap();
        assert!(src.next_frame().unwrap().is_none());
        assert!(a.image.get_pixel(8, 4).0[0] > 200 && b.image.get_pixel(8, 4).0[2] > 200);
        // A truncated last frame is a bad frame, not a panic.
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        let mut src = MjpegFile::open(&path).unwrap();
        assert!(src.next_frame().unwrap().is_some());
        assert!(matches!(src.next_frame(), Err(SourceError::BadFrame(_))));
        assert!(src.next_frame().unwrap().is_none());
    }
}
