//! Cameras through nokhwa's V4L2 backend (feature `camera`). Frames arrive
//! as MJPEG (decoded with the `image` crate) or YUYV (converted here).

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
};
use nokhwa::Camera;
use tern_model_format::preprocess::decode_image;

use super::{CameraInfo, CameraSpec};
use crate::source::{Frame, FrameSource, SourceError};

/// Whether this build can open cameras.
pub const AVAILABLE: bool = true;

/// Lists the V4L2 cameras and the formats each offers. No camera is an
/// empty list, not an error.
pub fn list() -> Result<Vec<CameraInfo>> {
    let found = match nokhwa::query(ApiBackend::Video4Linux) {
        Ok(f) => f,
        // nokhwa reports a missing /dev/video* as an error; that is "none".
        Err(e) if !has_video_devices() => {
            let _ = e;
            return Ok(Vec::new());
        }
        Err(e) => return Err(anyhow!("cannot list V4L2 cameras: {e}")),
    };
    let mut out = Vec::new();
    for info in found {
        let index = info.index().as_string();
        let formats =
            match Camera::new(info.index().clone(), RequestedFormat::new::<RgbFormat>(RequestedFormatType::None))
                .and_then(|mut c| c.compatible_camera_formats())
            {
                Ok(fs) => fs
                    .iter()
                    .map(|f| format!("{} {}x{}@{}", f.format(), f.width(), f.height(), f.frame_rate()))
                    .collect(),
                Err(e) => vec![format!("(cannot query formats: {e})")],
            };
        out.push(CameraInfo { index, name: info.human_name(), description: info.description().to_owned(), formats });
    }
    Ok(out)
}

fn has_video_devices() -> bool {
    std::fs::read_dir("/dev")
        .map_or(false, |d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("video")))
}

/// Parses `2` or `/dev/video2`.
fn index_of(device: &str) -> Result<u32> {
    let n = device.strip_prefix("/dev/video").unwrap_or(device);
    n.parse().map_err(|_| anyhow!("camera {device:?}: expected an index (0) or a device (/dev/video0)"))
}

/// Opens a camera and starts streaming.
pub fn open(spec: &CameraSpec) -> Result<Box<dyn FrameSource>> {
    let mut cam = V4lCamera { spec: spec.clone(), index: index_of(&spec.device)?, camera: None, frames: 0 };
    cam.reopen()?;
    Ok(Box::new(cam))
}

struct V4lCamera {
    spec: CameraSpec,
    index: u32,
    camera: Option<Camera>,
    frames: u64,
}

impl V4lCamera {
    fn request(&self) -> RequestedFormat<'static> {
        let kind = match (self.spec.resolution, self.spec.fps) {
            (Some((w, h)), fps) => RequestedFormatType::Closest(CameraFormat::new(
                Resolution::new(w, h),
                FrameFormat::MJPEG,
                fps.unwrap_or(30),
            )),
            (None, Some(fps)) => RequestedFormatType::HighestFrameRate(fps),
            (None, None) => RequestedFormatType::AbsoluteHighestFrameRate,
        };
        RequestedFormat::new::<RgbFormat>(kind)
    }
}

impl FrameSource for V4lCamera {
    fn describe(&self) -> String {
        match &self.camera {
            Some(c) => {
                let f = c.camera_format();
                format!(
                    "camera /dev/video{} ({} {}x{}@{})",
                    self.index,
                    f.format(),
                    f.width(),
                    f.height(),
                    f.frame_rate()
                )
            }
            None => format!("camera /dev/video{}", self.index),
        }
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let cam = self.camera.as_mut().ok_or_else(|| SourceError::Lost(anyhow!("camera not open")))?;
        let buf = match cam.frame() {
            Ok(b) => b,
            Err(e) => {
                // A read error means the device is gone or wedged: drop it so
                // that reopen starts from scratch.
                self.camera = None;
                let path = format!("/dev/video{}", self.index);
                let gone = if std::path::Path::new(&path).exists() { "" } else { " (device node is gone)" };
                return Err(SourceError::Lost(anyhow!("{path}: {e}{gone}")));
            }
        };
        let res = buf.resolution();
        let image = to_rgb(buf.source_frame_format(), res.width(), res.height(), buf.buffer())
            .map_err(SourceError::BadFrame)?;
        let index = self.frames;
        self.frames += 1;
        Ok(Some(Frame { index, image, captured: Instant::now(), name: None }))
    }

    fn reopen(&mut self) -> Result<()> {
        self.camera = None;
        let mut cam = Camera::new(CameraIndex::Index(self.index), self.request())
            .with_context(|| format!("cannot open /dev/video{}", self.index))?;
        cam.open_stream().with_context(|| format!("cannot start streaming from /dev/video{}", self.index))?;
        self.camera = Some(cam);
        Ok(())
    }
}

/// Converts one camera buffer to RGB.
pub fn to_rgb(format: FrameFormat, width: u32, height: u32, data: &[u8]) -> Result<RgbImage> {
    let pixels = width as usize * height as usize;
    match format {
        FrameFormat::MJPEG => Ok(decode_image(data).context("MJPEG frame")?.to_rgb8()),
        FrameFormat::YUYV => {
            if data.len() < pixels * 2 || width % 2 != 0 {
                bail!("YUYV frame of {} bytes for {width}x{height}", data.len());
            }
            let mut out = Vec::with_capacity(pixels * 3);
            for q in data[..pixels * 2].chunks_exact(4) {
                let (y0, u, y1, v) = (q[0], q[1], q[2], q[3]);
                out.extend_from_slice(&yuv_to_rgb(y0, u, v));
                out.extend_from_slice(&yuv_to_rgb(y1, u, v));
            }
            RgbImage::from_raw(width, height, out).context("YUYV frame size")
        }
        FrameFormat::RAWRGB => {
            RgbImage::from_raw(width, height, data.get(..pixels * 3).context("short RGB frame")?.to_vec())
                .context("RGB frame size")
        }
        FrameFormat::GRAY => {
            let g = data.get(..pixels).context("short gray frame")?;
            RgbImage::from_raw(width, height, g.iter().flat_map(|&v| [v, v, v]).collect()).context("gray frame size")
        }
        other => bail!("camera frame format {other} is not supported; ask for MJPEG or YUYV"),
    }
}

/// BT.601 limited-range YUV to RGB.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = f32::from(y) - 16.0;
    let d = f32::from(u) - 128.0;
    let e = f32::from(v) - 128.0;
    let clamp = |x: f32| x.round().clamp(0.0, 255.0) as u8;
    [clamp(1.164 * c + 1.596 * e), clamp(1.164 * c - 0.392 * d - 0.813 * e), clamp(1.164 * c + 2.017 * d)]
}
