//! The MJPEG stream and the server-sent events.
//!
//! One encoder task turns the newest frame into a JPEG part, at most once
//! per classified frame and at most `fps` times a second, and only while
//! someone watches. Every viewer gets the same encoded bytes through a
//! `watch` channel, which holds only the newest part: a viewer that falls
//! behind skips frames instead of queueing them, and one that stops reading
//! is cut off by the connection's write timeout.

use std::convert::Infallible;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;
use tokio::sync::broadcast::error::RecvError;

use super::state::{Part, Shared};
use super::App;

/// The multipart boundary of `/stream.mjpg`.
pub(crate) const BOUNDARY: &str = "ternframe";

/// Encodes the newest frame for the viewers, as long as `shared` lives.
pub(crate) async fn encoder(shared: Arc<Shared>, fps: f64, quality: u8) {
    let period = Duration::from_secs_f64(1.0 / fps.max(0.01));
    let mut frames = shared.frames.subscribe();
    let mut viewers = shared.viewers.subscribe();
    let mut last = 0;
    loop {
        if viewers.wait_for(|n| *n > 0).await.is_err() || frames.changed().await.is_err() {
            return;
        }
        if *viewers.borrow() == 0 {
            continue;
        }
        let (seq, image) = {
            let live = shared.live();
            (live.seq, live.image.clone())
        };
        let Some(image) = image else { continue };
        if seq == last {
            continue;
        }
        let started = Instant::now();
        let part = match tokio::task::spawn_blocking(move || encode_part(&image, quality)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                eprintln!("tern-device: web view: cannot encode frame {seq} as JPEG: {e}");
                continue;
            }
            Err(_) => return,
        };
        last = seq;
        shared.parts.send_replace(Some(Part { seq, bytes: part }));
        tokio::time::sleep_until((started + period).into()).await;
    }
}

/// One multipart part: boundary, headers, JPEG, CRLF.
fn encode_part(image: &RgbImage, quality: u8) -> image::ImageResult<Bytes> {
    let mut jpeg = Vec::with_capacity(image.len() / 8 + 1024);
    JpegEncoder::new_with_quality(&mut Cursor::new(&mut jpeg), quality).encode_image(image)?;
    let head =
        format!("--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", jpeg.len());
    let mut part = Vec::with_capacity(head.len() + jpeg.len() + 2);
    part.extend_from_slice(head.as_bytes());
    part.extend_from_slice(&jpeg);
    part.extend_from_slice(b"\r\n");
    Ok(Bytes::from(part))
}

/// Counts a viewer for as long as its stream lives.
struct Viewer(Arc<Shared>);

impl Viewer {
    fn new(shared: Arc<Shared>) -> Viewer {
        shared.viewers.send_modify(|n| *n += 1);
        shared.metrics.viewers.inc();
        Viewer(shared)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.viewers.send_modify(|n| *n = n.saturating_sub(1));
        self.0.metrics.viewers.dec();
    }
}

/// `GET /stream.mjpg`.
pub(crate) async fn mjpeg(State(app): State<App>) -> Response {
    let viewer = Viewer::new(Arc::clone(&app.shared));
    let mut parts = app.shared.parts.subscribe();
    parts.mark_changed();
    let body = stream::unfold((parts, viewer, 0u64), |(mut parts, viewer, mut sent)| async move {
        loop {
            if parts.changed().await.is_err() {
                return None;
            }
            let part = parts.borrow_and_update().clone();
            if let Some(p) = part.filter(|p| p.seq != sent) {
                sent = p.seq;
                return Some((Ok::<_, Infallible>(p.bytes), (parts, viewer, sent)));
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, format!("multipart/x-mixed-replace; boundary={BOUNDARY}")),
            (header::CACHE_CONTROL, "no-cache, no-store".to_owned()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// `GET /api/events`: the recent events, then each new one, as JSON in the
/// `data` of unnamed server-sent events (`frame` events are left out).
pub(crate) async fn events(State(app): State<App>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = app.shared.events.subscribe();
    let recent: Vec<Arc<str>> = app.shared.live().recent.iter().cloned().collect();
    let replay = stream::iter(recent).map(|j| Ok(SseEvent::default().data(&*j)));
    let live = stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(j) => return Some((Ok(SseEvent::default().data(&*j)), rx)),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(replay.chain(live)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
