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
pub fn open_image(path: &Path) -> Result<DynamicImage, FormatError> {
    let len = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?.len();
    if len > MAX_IMAGE_FILE_BYTES {
        return Err(FormatError::TooLarge { what: path.display().to_string(), size: len, limit: MAX_IMAGE_FILE_BYTES });
    }
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    decode_image(&bytes)
}

/// Decodes an encoded image (PNG, JPEG, ...) from memory, applying its
/// EXIF orientation.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, FormatError> {
    let err = |e: &dyn std::fmt::Display| FormatError::Image { detail: e.to_string() };
    if bytes.is_empty() {
        return Err(FormatError::Image { detail: "the file is empty".into() });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| err(&e))?;
    if reader.format().is_none() {
        return Err(FormatError::Image { detail: "not an image format this build can read".into() });
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
    match p.resize {
        ResizeMode::Stretch => {
            if (iw, ih) == (p.width, p.height) {
                return rgb.clone();
            }
            image::imageops::resize(rgb, p.width, p.height, FilterType::Triangle)
        }
        ResizeMode::CenterCrop { shorter_side } => {
            let s = f64::from(shorter_side) / f64::from(iw.min(ih).max(1));
            let nw = ((f64::from(iw) * s).round() as u32).max(p.width);
            let nh = ((f64::from(ih) * s).round() as u32).max(p.height);
            let scaled = image::imageops::resize(rgb, nw, nh, FilterType::Triangle);
            let x = (nw - p.width) / 2;
            let y = (nh - p.height) / 2;
            image::imageops::crop_imm(&scaled, x, y, p.width, p.height).to_image()
        }
    }
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
