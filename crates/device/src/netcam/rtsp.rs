//! RTSP cameras with H.264 (feature `rtsp`): retina speaks RTSP and
//! depacketizes RTP, interleaved over the RTSP TCP connection (no UDP ports,
//! no packet loss, through NAT and firewalls); OpenH264 decodes.
//!
//! retina is async: each camera owns a single-threaded tokio runtime and the
//! capture thread blocks on it, so the rest of the loop stays synchronous.
//! Frames come in Annex B form with the parameter sets before every key
//! frame (retina's `FrameFormat::SIMPLE`), which is what the decoder reads.
//!
//! Bounds: the connection and `DESCRIBE` are bounded by the connect plus the
//! read timeout, `SETUP` and `PLAY` by the read timeout, and each frame by
//! the read timeout as a whole (non-video items, frames before the first key
//! frame and frames the decoder holds back all count against it), so a
//! silent or vanished server is [`SourceError::Lost`] and reopened by the
//! run loop. The picture size the stream declares (its SPS) is checked
//! against [`MAX_PIXELS`] before the decoder sees a frame, and an encoded
//! frame over `max_frame` bytes is a bad frame, not decoded. retina's own
//! RTSP reader has no message-size limit (an RTP packet is at most 64 KiB,
//! but an RTSP response body is as long as its `Content-Length`): what it
//! buffers is bounded only by what the server sends within the timeouts.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use image::RgbImage;
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use retina::client::{
    Demuxed, PlayOptions, Session, SessionGroup, SessionOptions, SetupOptions, TcpTransportOptions, Transport,
};
use retina::codec::{CodecItem, FrameFormat, ParametersRef, VideoFrame};

use super::NetcamSettings;
use crate::source::{Frame, FrameSource, SourceError};

/// Largest picture accepted, in pixels (8K UHD).
pub const MAX_PIXELS: u64 = 7680 * 4320;

/// Longest wait for `TEARDOWN` when the camera is closed at the end of a run.
const TEARDOWN_WAIT: Duration = Duration::from_secs(1);

/// An RTSP camera: the first H.264 video stream of an `rtsp://` URL.
pub struct RtspCamera {
    url: url::Url,
    shown: String,
    settings: NetcamSettings,
    runtime: tokio::runtime::Runtime,
    group: Arc<SessionGroup>,
    playing: Option<Playing>,
    index: u64,
}

/// A session in the `PLAY` state and its decoder.
struct Playing {
    stream: Pin<Box<Demuxed>>,
    /// Index of the H.264 stream among the session's streams.
    video: usize,
    decoder: Decoder,
    /// Whether a key frame has been seen; frames before it cannot be
    /// decoded and are skipped.
    keyed: bool,
}

impl RtspCamera {
    /// Connects to `url` (`rtsp://HOST[:PORT]/PATH`, no credentials in it)
    /// and plays its first H.264 video stream. Errors name the URL and what
    /// went wrong: refused connection, a timeout naming the request, an RTSP
    /// status (401, 404), no H.264 stream, a picture too large.
    pub fn open(url: &str, settings: NetcamSettings) -> Result<RtspCamera> {
        let parsed = url::Url::parse(url).with_context(|| format!("camera URL {url:?}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the RTSP client's runtime")?;
        let mut cam = RtspCamera {
            url: parsed,
            shown: url.to_owned(),
            settings,
            runtime,
            group: Arc::new(SessionGroup::default()),
            playing: None,
            index: 0,
        };
        cam.connect().with_context(|| cam.shown.clone())?;
        Ok(cam)
    }

    /// Drops the session inside the runtime (retina spawns its `TEARDOWN`
    /// there; it runs the next time the runtime is driven).
    fn close(&mut self) {
        let _inside = self.runtime.enter();
        self.playing = None;
    }

    /// `DESCRIBE`, `SETUP` of the first H.264 stream over TCP, `PLAY`.
    fn connect(&mut self) -> Result<()> {
        self.close();
        let creds = self.settings.credentials.as_ref().map(|c| retina::client::Credentials {
            username: c.username.clone(),
            password: c.password.expose().to_owned(),
        });
        let options = SessionOptions::default()
            .creds(creds)
            .user_agent(concat!("tern-device/", env!("CARGO_PKG_VERSION")).to_owned())
            .session_group(self.group.clone());
        let read = self.settings.read_timeout;
        let describe = self.settings.connect_timeout.saturating_add(read);
        let url = self.url.clone();
        let has_creds = self.settings.credentials.is_some();
        let failed = move |e: retina::Error| request_error(e, has_creds);
        let (stream, video) = self.runtime.block_on(async move {
            let mut session = tokio::time::timeout(describe, Session::describe(url, options))
                .await
                .map_err(|_| no_answer("DESCRIBE", describe))?
                .map_err(failed)?;
            let video = session
                .streams()
                .iter()
                .position(|s| s.media() == "video" && s.encoding_name().eq_ignore_ascii_case("h264"))
                .ok_or_else(|| {
                    let offered: Vec<String> =
                        session.streams().iter().map(|s| format!("{} {}", s.media(), s.encoding_name())).collect();
                    anyhow!(
                        "no H.264 video stream (the camera offers: {}); set the camera to H.264",
                        if offered.is_empty() { "nothing".to_owned() } else { offered.join(", ") }
                    )
                })?;
            if let Some(ParametersRef::Video(v)) = session.streams().get(video).and_then(|s| s.parameters()) {
                check_dimensions(v.pixel_dimensions())?;
            }
            let setup = SetupOptions::default()
                .transport(Transport::Tcp(TcpTransportOptions::default()))
                .frame_format(FrameFormat::SIMPLE);
            tokio::time::timeout(read, session.setup(video, setup))
                .await
                .map_err(|_| no_answer("SETUP", read))?
                .map_err(failed)?;
            let playing = tokio::time::timeout(read, session.play(PlayOptions::default()))
                .await
                .map_err(|_| no_answer("PLAY", read))?
                .map_err(failed)?;
            let demuxed = playing.demuxed().map_err(failed)?;
            Ok::<_, anyhow::Error>((Box::pin(demuxed), video))
        })?;
        // A fresh decoder: the new session starts with its own parameter sets.
        let decoder = Decoder::new().context("cannot start the H.264 decoder")?;
        self.playing = Some(Playing { stream, video, decoder, keyed: false });
        Ok(())
    }

    /// Waits for the next video frame of the H.264 stream, until `deadline`.
    fn next_video_frame(&mut self, deadline: tokio::time::Instant) -> Result<VideoFrame, SourceError> {
        let Some(playing) = self.playing.as_mut() else {
            return Err(SourceError::Lost(anyhow!("not connected")));
        };
        let read = self.settings.read_timeout;
        self.runtime.block_on(async {
            loop {
                let item = match tokio::time::timeout_at(deadline, playing.stream.next()).await {
                    Err(_) => {
                        return Err(SourceError::Lost(anyhow!(
                            "timed out: no picture received for {:.1} s",
                            read.as_secs_f64()
                        )))
                    }
                    Ok(None) => return Err(SourceError::Lost(anyhow!("the server ended the stream"))),
                    Ok(Some(Err(e))) => return Err(SourceError::Lost(anyhow!("{}", first_line(&e)))),
                    Ok(Some(Ok(item))) => item,
                };
                match item {
                    CodecItem::VideoFrame(f) if f.stream_id() == playing.video => return Ok(f),
                    _ => continue,
                }
            }
        })
    }
}

/// The error of a request left unanswered for `waited`.
fn no_answer(request: &str, waited: Duration) -> anyhow::Error {
    anyhow!("timed out: no answer to {request} within {:.1} s", waited.as_secs_f64())
}

/// retina's error, with what to do about a 401.
fn request_error(e: retina::Error, has_creds: bool) -> anyhow::Error {
    match e.status_code() {
        Some(401) if has_creds => anyhow!("RTSP 401, the camera refused the user name and password"),
        Some(401) => anyhow!(
            "RTSP 401, the camera wants a user name and password (--url-username and --url-password-file, \
             or TERN_URL_USERNAME and TERN_URL_PASSWORD)"
        ),
        _ => anyhow!("{}", first_line(&e)),
    }
}

/// The first line of retina's error: what went wrong. (The lines after it
/// are connection and byte positions, for a packet capture.)
fn first_line(e: &retina::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().to_owned()
}

/// Refuses a picture size of zero or over [`MAX_PIXELS`].
fn check_dimensions((w, h): (u32, u32)) -> Result<()> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 || pixels > MAX_PIXELS {
        bail!("the stream declares pictures of {w}x{h} pixels (at most {MAX_PIXELS} pixels accepted)");
    }
    Ok(())
}

impl Drop for RtspCamera {
    fn drop(&mut self) {
        self.close();
        // Give the TEARDOWN a moment; a camera that does not answer only
        // keeps the session until it expires.
        // (The timer is made inside the runtime: it needs its clock.)
        let group = self.group.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(TEARDOWN_WAIT, group.await_teardown()).await;
        });
    }
}

impl FrameSource for RtspCamera {
    fn describe(&self) -> String {
        format!("rtsp {}", self.shown)
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let deadline = tokio::time::Instant::now() + self.settings.read_timeout;
        loop {
            let frame = match self.next_video_frame(deadline) {
                Ok(f) => f,
                Err(e) => {
                    self.close();
                    return Err(e);
                }
            };
            let Some(playing) = self.playing.as_mut() else {
                return Err(SourceError::Lost(anyhow!("not connected")));
            };
            let declared = match playing.stream.streams().get(playing.video).and_then(|s| s.parameters()) {
                Some(ParametersRef::Video(v)) if frame.has_new_parameters() => check_dimensions(v.pixel_dimensions()),
                _ => Ok(()),
            };
            if let Err(e) = declared {
                self.close();
                return Err(SourceError::Lost(e));
            }
            if !playing.keyed {
                if !frame.is_random_access_point() {
                    continue;
                }
                playing.keyed = true;
            }
            let index = self.index;
            let data = frame.data();
            if data.len() > self.settings.max_frame {
                self.index += 1;
                return Err(SourceError::BadFrame(anyhow!(
                    "{}: frame {index}: {} bytes is over the limit of {} bytes (--url-max-frame-mib)",
                    self.shown,
                    data.len(),
                    self.settings.max_frame
                )));
            }
            match decode(&mut playing.decoder, data) {
                Ok(Some(image)) => {
                    self.index += 1;
                    return Ok(Some(Frame { index, image, captured: Instant::now(), name: None }));
                }
                // The decoder holds the frame back (it needs more); the
                // deadline still runs.
                Ok(None) => continue,
                Err(e) => {
                    self.index += 1;
                    return Err(SourceError::BadFrame(e.context(format!("{}: frame {index}", self.shown))));
                }
            }
        }
    }

    fn reopen(&mut self) -> Result<()> {
        self.connect().with_context(|| self.shown.clone())
    }
}

/// Decodes one access unit into RGB; `None` while the decoder needs more.
fn decode(decoder: &mut Decoder, data: &[u8]) -> Result<Option<RgbImage>> {
    let Some(yuv) = decoder.decode(data).map_err(|e| anyhow!("H.264: {e}"))? else {
        return Ok(None);
    };
    let (w, h) = yuv.dimensions();
    let (w32, h32) = (u32::try_from(w)?, u32::try_from(h)?);
    check_dimensions((w32, h32))?;
    let mut rgb = vec![0u8; w * h * 3];
    yuv.write_rgb8(&mut rgb);
    RgbImage::from_raw(w32, h32, rgb).map(Some).context("decoded picture size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picture_sizes_are_bounded() {
        assert!(check_dimensions((1920, 1080)).is_ok());
        assert!(check_dimensions((7680, 4320)).is_ok());
        assert!(check_dimensions((7681, 4320)).unwrap_err().to_string().contains("7681x4320"));
        assert!(check_dimensions((0, 1080)).is_err());
        assert!(check_dimensions((u32::MAX, u32::MAX)).is_err());
    }

    #[test]
    fn a_refused_connection_is_an_error_naming_the_url() {
        // A loopback port just freed: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("rtsp://127.0.0.1:{port}/stream");
        let settings = NetcamSettings { read_timeout: Duration::from_secs(2), ..NetcamSettings::default() };
        let e = format!("{:#}", RtspCamera::open(&url, settings).err().unwrap());
        assert!(e.contains(&url), "{e}");
    }
}
