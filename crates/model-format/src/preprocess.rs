//! The one preprocessing function, used by host evaluation and device
//! inference alike, so that the two cannot drift.
//!
//! Any image the `image` crate decodes is accepted: grayscale, RGBA (alpha
//! dropped), 16-bit (scaled to 8 bits), palette, any size. JPEG, TIFF and
//! WebP EXIF orientation is applied before resizing.

use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::FormatError;
use crate::manifest::{Preprocessing, ResizeMode};

/// Largest image file read (256 MiB).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// Largest decoded image side, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most memory the decoder may allocate (1 GiB).
pub const MAX_DECODE_ALLOC: u64 = 1 << 30;

/// Reads and decodes the image at `path`, applying its EXIF orientation.
/// Only regular files are read (a FIFO or `/dev/zero` is refused before it
/// is opened), and never more than [`MAX_IMAGE_FILE_BYTES`].
pub fn open_image(path: &Path) -> Result<DynamicImage, FormatError> {
    let bytes = crate::files::read_regular(path, MAX_IMAGE_FILE_BYTES, "image")?;
    decode_image(&bytes)
}

/// Decodes an encoded image (PNG, JPEG, ...) from memory, applying its
/// EXIF orientation. A JPEG or PNG that ends early is an error, even where
/// the decoder would fill in the missing part.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, FormatError> {
    let err = |e: &dyn std::fmt::Display| FormatError::Image { detail: e.to_string() };
    if bytes.is_empty() {
        return Err(FormatError::Image { detail: "the file is empty".into() });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| err(&e))?;
    match reader.format() {
        None => return Err(FormatError::Image { detail: "not an image format this build can read".into() }),
        Some(image::ImageFormat::Jpeg) => check_jpeg_complete(bytes)?,
        Some(image::ImageFormat::Png) => check_png_complete(bytes)?,
        Some(_) => {}
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| err(&e))?;
    let orientation = decoder.orientation().map_err(|e| err(&e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| err(&e))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Refuses a JPEG whose entropy-coded data does not end with an EOI marker
/// (`FF D9`): a truncated file, which decoders fill with grey. The marker
/// segments before the first scan (SOS) are skipped by their lengths, so
/// the EOI of an EXIF thumbnail does not count; inside the scans a `FF D9`
/// can only be the end (data bytes `FF` are stuffed as `FF 00`).
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), FormatError> {
    let truncated = |why: &str| FormatError::Image { detail: format!("truncated JPEG: {why}") };
    let mut pos = 2; // after SOI
    loop {
        // Fill bytes (FF FF ...) may precede a marker.
        while bytes.get(pos) == Some(&0xFF) && bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return Err(truncated(&format!("no marker at byte {pos} of {}", bytes.len())));
        };
        pos += 2;
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            continue; // markers without a length
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return Err(truncated("ends inside a marker segment"));
        };
        pos += usize::from(u16::from_be_bytes([hi, lo]));
        if pos > bytes.len() {
            return Err(truncated("ends inside a marker segment"));
        }
        if marker == 0xDA {
            break; // the first scan
        }
        if marker == 0xD9 {
            return Err(truncated("no scan before the end marker"));
        }
    }
    if bytes[pos..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err(truncated("no end-of-image marker (FF D9) after the image data"))
    }
}

/// Refuses a PNG without its whole IEND chunk (length, type and CRC): a
/// file cut short.
fn check_png_complete(bytes: &[u8]) -> Result<(), FormatError> {
    const IEND: &[u8] = b"\0\0\0\0IEND\xAE\x42\x60\x82";
    if bytes.windows(IEND.len()).rev().any(|w| w == IEND) {
        Ok(())
    } else {
        Err(FormatError::Image { detail: "truncated PNG: no IEND chunk".into() })
    }
}

/// Most pixels of an image made on the way to the model input (the
/// resized image before a centre crop, and the resizer's vertical pass,
/// `source width × output height`). Beyond it — only for extreme aspect
/// ratios, or huge images into huge inputs — the input is sampled straight
/// from the source region instead (nearest pixel), so that no size of image
/// costs more than the output.
pub const MAX_RESIZE_PIXELS: u64 = 1 << 24;

/// Turns a decoded image into the model input: `[1, 3, height, width]`
/// values in NCHW order, RGB, `(x / 255 − mean) / std`.
pub fn preprocess(img: &DynamicImage, p: &Preprocessing) -> Vec<f32> {
    let rgb = match img {
        DynamicImage::ImageRgb8(rgb) => std::borrow::Cow::Borrowed(rgb),
        other => std::borrow::Cow::Owned(other.to_rgb8()),
    };
    preprocess_rgb8(&rgb, p)
}

/// [`preprocess`] for an RGB frame (e.g. from a camera).
pub fn preprocess_rgb8(rgb: &RgbImage, p: &Preprocessing) -> Vec<f32> {
    let resized = resize(rgb, p);
    let (w, h) = (p.width as usize, p.height as usize);
    let plane = w * h;
    let mut out = vec![0f32; 3 * plane];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * p.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| p.mean[c] / p.std[c]);
    for (i, px) in resized.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(px.0[c]) * scale[c] - shift[c];
        }
    }
    out
}

fn resize(rgb: &RgbImage, p: &Preprocessing) -> RgbImage {
    let (iw, ih) = rgb.dimensions();
    let fits = |w: u32, h: u32| u64::from(w) * u64::from(h) <= MAX_RESIZE_PIXELS;
    if iw == 0 || ih == 0 {
        return RgbImage::new(p.width, p.height);
    }
    match p.resize {
        ResizeMode::Stretch => {
            if (iw, ih) == (p.width, p.height) {
                return rgb.clone();
            }
            if !fits(iw, p.height) {
                return sample(rgb, [0.0, 0.0, f64::from(iw), f64::from(ih)], p.width, p.height);
            }
            image::imageops::resize(rgb, p.width, p.height, FilterType::Triangle)
        }
        ResizeMode::CenterCrop { shorter_side } => {
            let s = f64::from(shorter_side) / f64::from(iw.min(ih));
            // Saturating float → int casts: an absurd size fails `fits`.
            let nw = ((f64::from(iw) * s).round() as u32).max(p.width);
            let nh = ((f64::from(ih) * s).round() as u32).max(p.height);
            let x = (nw - p.width) / 2;
            let y = (nh - p.height) / 2;
            if !fits(nw, nh) || !fits(iw, nh) {
                let (sx, sy) = (f64::from(nw) / f64::from(iw), f64::from(nh) / f64::from(ih));
                let region = [f64::from(x) / sx, f64::from(y) / sy, f64::from(p.width) / sx, f64::from(p.height) / sy];
                return sample(rgb, region, p.width, p.height);
            }
            let scaled = image::imageops::resize(rgb, nw, nh, FilterType::Triangle);
            image::imageops::crop_imm(&scaled, x, y, p.width, p.height).to_image()
        }
    }
}

/// The `[x, y, width, height]` region of `rgb` (source pixels) brought to
/// `w × h` by taking the source pixel under each output pixel's centre.
fn sample(rgb: &RgbImage, region: [f64; 4], w: u32, h: u32) -> RgbImage {
    let (iw, ih) = rgb.dimensions();
    let [x0, y0, rw, rh] = region;
    let at = |o: u32, n: u32, start: f64, len: f64, max: u32| -> u32 {
        let v = (start + (f64::from(o) + 0.5) * len / f64::from(n)).floor();
        (v.max(0.0) as u32).min(max - 1)
    };
    RgbImage::from_fn(w, h, |ox, oy| *rgb.get_pixel(at(ox, w, x0, rw, iw), at(oy, h, y0, rh, ih)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgba};

    fn pre(resize: ResizeMode) -> Preprocessing {
        Preprocessing { width: 8, height: 6, resize, mean: [0.5, 0.5, 0.5], std: [0.5, 0.25, 0.5] }
    }

    fn encode_png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn normalises_per_channel_in_chw_order() {
        let img = RgbImage::from_pixel(8, 6, image::Rgb([255, 0, 51]));
        let x = preprocess_rgb8(&img, &pre(ResizeMode::Stretch));
        assert_eq!(x.len(), 3 * 48);
        assert!((x[0] - 1.0).abs() < 1e-6); // (1 - 0.5) / 0.5
        assert!((x[48] + 2.0).abs() < 1e-6); // (0 - 0.5) / 0.25
        assert!((x[96] + 0.6).abs() < 1e-6); // (0.2 - 0.5) / 0.5
    }

    #[test]
    fn odd_formats_decode_to_the_same_input() {
        let p = pre(ResizeMode::CenterCrop { shorter_side: 7 });
        let gray = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(20, 13, Luma([100u8])));
        let gray16 = DynamicImage::ImageLuma16(ImageBuffer::from_pixel(20, 13, Luma([100u16 * 257])));
        let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_pixel(20, 13, Rgba([100u8, 100, 100, 7])));
        let want = preprocess(&gray, &p);
        for img in [gray16, rgba] {
            let decoded = decode_image(&encode_png(&img)).unwrap();
            assert_eq!(preprocess(&decoded, &p), want);
        }
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(decode_image(b"").is_err());
        assert!(decode_image(b"hello, not an image").is_err());
        let png = encode_png(&DynamicImage::ImageRgb8(RgbImage::new(50, 50)));
        assert!(decode_image(&png[..png.len() / 2]).is_err());
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img.clone()).write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
        out
    }

    #[test]
    fn truncated_jpegs_and_pngs_are_errors() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        let whole = jpeg(&img);
        decode_image(&whole).unwrap();
        // Trailing bytes after the end marker are tolerated.
        let mut padded = whole.clone();
        padded.extend_from_slice(b"\0\0trailer");
        decode_image(&padded).unwrap();
        for cut in [whole.len() - 2, whole.len() * 3 / 4, whole.len() / 2, 200, 20, 3] {
            let err = decode_image(&whole[..cut]).unwrap_err().to_string();
            assert!(err.contains("truncated JPEG") || err.contains("cannot decode"), "{cut}: {err}");
        }
        let png = encode_png(&DynamicImage::ImageRgb8(img));
        decode_image(&png).unwrap();
        for cut in [png.len() - 12, png.len() - 1] {
            let err = decode_image(&png[..cut]).unwrap_err().to_string();
            assert!(err.contains("truncated PNG"), "{cut}: {err}");
        }
    }

    #[test]
    fn extreme_aspect_ratios_stay_bounded() {
        // 1 × 16384: scaled to a shorter side of 4096 it would be 4096 ×
        // 67 million pixels (over 800 GB).
        let tall = RgbImage::from_fn(1, 16_384, |_, y| image::Rgb([if y < 8192 { 255 } else { 0 }, 0, 0]));
        let p = Preprocessing {
            width: 16,
            height: 16,
            resize: ResizeMode::CenterCrop { shorter_side: 4096 },
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let t = std::time::Instant::now();
        let x = preprocess_rgb8(&tall, &p);
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(x.len(), 3 * 256);
        // The centre of the column: red above the middle, black below.
        assert!(x[0] > 0.99 && x[255] < 0.01, "{} {}", x[0], x[255]);
        let wide = RgbImage::new(16_384, 1);
        let stretch = Preprocessing { width: 4096, height: 4096, resize: ResizeMode::Stretch, ..p };
        assert_eq!(preprocess_rgb8(&wide, &stretch).len(), 3 * 4096 * 4096);
        assert_eq!(preprocess_rgb8(&RgbImage::new(0, 0), &p).len(), 3 * 256);
    }

    #[test]
    fn center_crop_keeps_the_middle() {
        // Red and blue bands at the ends of a 5:1 image, green between; the
        // square centre crop (source columns 200..300) must be all green.
        let img = RgbImage::from_fn(500, 100, |x, _| match x {
            0..100 => image::Rgb([255, 0, 0]),
            100..400 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        let p = Preprocessing {
            width: 10,
            height: 10,
            resize: ResizeMode::CenterCrop { shorter_side: 10 },
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let x = preprocess_rgb8(&img, &p);
        assert!(x[..100].iter().all(|v| *v < 0.01), "red leaked into the crop");
        assert!(x[100..200].iter().all(|v| *v > 0.99));
    }
}
