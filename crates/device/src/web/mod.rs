//! The live web view of `tern-device run --http ADDR:PORT`.
//!
//! The loop's side is a [`WebSink`]: on the inference thread it keeps the
//! newest frame (the shared `Arc`, never a copy of the pixels), its
//! probabilities, counters and the recent events, and does nothing slow.
//! The server runs on its own thread, on a one-thread tokio runtime, with
//! axum's router on hyper, accepted by [`start`]'s own loop so that each
//! connection gets hyper's header limits and a write timeout.
//!
//! Routes (all behind the same token check and client limit):
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page (embedded, no CDN): stream, label, top-k bars, figures, events |
//! | `GET /stream.mjpg` | the frames as MJPEG (`multipart/x-mixed-replace`) |
//! | `GET /api/status` | [`Status`] as JSON |
//! | `GET /snapshot.jpg` | the frame of the newest snapshot (`--snapshot-dir`) |
//! | `GET /api/events` | the loop's events as server-sent events |
//! | `POST /api/classify` | one image in the body, answered with [`Classified`] |
//! | `GET /metrics` | Prometheus text format |
//!
//! More routes (such as a review API of captured frames) are given to
//! [`start`] as an `axum::Router` and get the same protection.
//!
//! Protection: an optional token ([`WebSettings::token`], as
//! `Authorization: Bearer TOKEN` or `?token=TOKEN`, compared in constant
//! time); at most [`WebSettings::max_clients`] requests at once, streams
//! included (beyond: 503); at most four times as many open connections
//! (beyond: a 503 written straight to the socket); request headers up to
//! 16 KiB and 10 s to arrive; uploads up to [`WebSettings::max_upload`]
//! bytes (beyond: 413, before more is read) and 30 s to arrive; a client
//! that stops reading is dropped after [`WebSettings::write_timeout`].

mod classify;
mod metrics;
pub mod review;
mod state;
mod stream;

use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use image::codecs::jpeg::JpegEncoder;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_io_timeout::TimeoutStream;

pub use classify::{Classified, Loader};
pub use state::{MqttStatus, Score, SnapshotInfo, Status, WebSink};

use classify::{Failed, Worker};
use state::Shared;

use crate::mqtt::MqttMonitor;

/// The environment variable that holds the token when no file is given.
pub const TOKEN_ENV: &str = "TERN_HTTP_TOKEN";
/// Default bound on requests served at once ([`WebSettings::max_clients`]).
pub const DEFAULT_MAX_CLIENTS: usize = 8;
/// Default bound on an upload to `/api/classify`, bytes.
pub const DEFAULT_MAX_UPLOAD: usize = 8 << 20;
/// Largest request head (request line + headers) accepted, bytes.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// Labels in the answers' top lists.
const TOP_K: usize = 5;
/// Time for a request head to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for an upload to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How the server runs.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// Where to listen (`ADDR:PORT`; port 0 picks a free one, see
    /// [`WebServer::local_addr`]).
    pub addr: String,
    /// Token every request must carry (`None`: open to anyone who can reach
    /// the address).
    pub token: Option<String>,
    /// Requests served at once, streams included; beyond, 503.
    pub max_clients: usize,
    /// Highest frame rate of the MJPEG stream.
    pub fps: f64,
    /// JPEG quality of the stream (1–100).
    pub jpeg_quality: u8,
    /// Largest upload to `/api/classify`, bytes; beyond, 413.
    pub max_upload: usize,
    /// A client whose socket accepts nothing for this long is dropped.
    pub write_timeout: Duration,
    /// The run's MQTT sink, whose queue and counters `/metrics` and
    /// `/api/status` show.
    pub mqtt: Option<MqttMonitor>,
}

impl Default for WebSettings {
    fn default() -> Self {
        WebSettings {
            addr: "127.0.0.1:8080".into(),
            token: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            fps: 10.0,
            jpeg_quality: 80,
            max_upload: DEFAULT_MAX_UPLOAD,
            write_timeout: Duration::from_secs(10),
            mqtt: None,
        }
    }
}

/// The token from `file` (its first line, trimmed), else from `env`
/// (the value of [`TOKEN_ENV`]); `None` when neither is given. An empty
/// token is an error rather than no protection.
pub fn read_token(file: Option<&Path>, env: Option<String>) -> Result<Option<String>> {
    let (token, from) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("token file {}", path.display()))?;
            (text.lines().next().unwrap_or("").trim().to_owned(), format!("token file {}", path.display()))
        }
        None => match env {
            Some(v) => (v.trim().to_owned(), format!("${TOKEN_ENV}")),
            None => return Ok(None),
        },
    };
    if token.is_empty() {
        bail!("{from}: the token is empty");
    }
    if token.chars().any(|c| c.is_control() || c == ' ') {
        bail!("{from}: the token holds spaces or control characters");
    }
    Ok(Some(token))
}

/// State of every handler.
#[derive(Clone)]
pub(crate) struct App {
    shared: Arc<Shared>,
    worker: Option<Arc<Worker>>,
    token: Option<Arc<str>>,
    max_clients: usize,
    max_upload: usize,
}

/// The running server. Dropping it stops the server (the sink goes on
/// working, unread).
pub struct WebServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WebServer {
    /// The address the server listens on (with the port picked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the server on `settings.addr` and returns it with the sink to
/// give the loop. `loader` gives `/api/classify` its classifier (`None`:
/// the route answers 503). `extra` holds more routes, served behind the
/// same token check and client limit (`Router::new()` for none).
pub fn start(settings: WebSettings, loader: Option<Loader>, extra: Router) -> Result<(WebServer, WebSink)> {
    if settings.max_clients == 0 {
        bail!("the web view needs at least one client (--http-max-clients)");
    }
    if !(settings.fps.is_finite() && settings.fps > 0.0) {
        bail!("the stream's frame rate must be > 0 (--http-fps), not {}", settings.fps);
    }
    let addrs: Vec<SocketAddr> = settings
        .addr
        .to_socket_addrs()
        .with_context(|| format!("--http {}: expected ADDR:PORT", settings.addr))?
        .collect();
    let std_listener =
        StdListener::bind(&addrs[..]).with_context(|| format!("cannot listen on {} (--http)", settings.addr))?;
    std_listener.set_nonblocking(true).context("web view: cannot make the socket non-blocking")?;
    let addr = std_listener.local_addr().context("web view: no local address")?;

    let shared = Arc::new(Shared::new(settings.mqtt.clone()));
    let app = App {
        shared: Arc::clone(&shared),
        worker: loader.map(|l| Arc::new(Worker::new(l, Arc::clone(&shared)))),
        token: settings.token.as_deref().map(Arc::from),
        max_clients: settings.max_clients,
        max_upload: settings.max_upload,
    };
    let router = router(app, extra);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(settings.max_clients + 2)
        .thread_name("tern-web-blocking")
        .build()
        .context("web view: cannot start the tokio runtime")?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(std_listener).context("web view: cannot register the socket")?
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let encoder = stream::encoder(Arc::clone(&shared), settings.fps, settings.jpeg_quality.clamp(1, 100));
    let limits = Limits { max_connections: settings.max_clients * 4, write_timeout: settings.write_timeout };
    let thread = std::thread::Builder::new()
        .name("tern-web".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::spawn(encoder);
                serve(listener, router, limits, stop_rx).await;
            });
            runtime.shutdown_timeout(Duration::from_secs(2));
        })
        .context("web view: cannot start the server thread")?;
    Ok((WebServer { addr, stop: Some(stop_tx), thread: Some(thread) }, WebSink::new(shared)))
}

fn router(app: App, extra: Router) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/stream.mjpg", get(stream::mjpeg))
        .route("/api/status", get(status))
        .route("/snapshot.jpg", get(snapshot))
        .route("/api/events", get(stream::events))
        .route("/api/classify", post(classify))
        .route("/metrics", get(metrics))
        .with_state(app.clone())
        .merge(extra)
        .layer(middleware::from_fn_with_state(app, guard))
}

struct Limits {
    max_connections: usize,
    write_timeout: Duration,
}

/// Accepts connections until `stop`, each served by hyper on its own task.
async fn serve(listener: TcpListener, router: Router, limits: Limits, mut stop: oneshot::Receiver<()>) {
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let tcp = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    // Out of descriptors, or a connection reset while queued:
                    // wait a little rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if connections.load(Ordering::Relaxed) >= limits.max_connections {
            tokio::spawn(refuse(tcp));
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let counted = Counted::new(Arc::clone(&connections));
        let mut io = TimeoutStream::new(tcp);
        io.set_write_timeout(Some(limits.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _counted = counted;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(io, service);
            // A client that goes away or misbehaves only ends its own connection.
            let _ = conn.await;
        });
    }
}

/// A connection beyond the bound: a short 503 if the socket takes it now,
/// then closed.
async fn refuse(mut tcp: TcpStream) {
    let msg = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(msg)).await;
}

struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(n: Arc<AtomicUsize>) -> Counted {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Constant-time equality of two byte strings (the length is not hidden).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request, token: &str) -> bool {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()));
    bearer
        || Query::<TokenQuery>::try_from_uri(req.uri())
            .ok()
            .and_then(|q| q.0.token)
            .is_some_and(|t| same(t.as_bytes(), token.as_bytes()))
}

/// Token check, then the client limit; the client's slot is held until its
/// response body ends (a stream holds it while it streams).
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        if !authorized(&req, token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tern\""))],
                "a token is needed: Authorization: Bearer TOKEN, or ?token=TOKEN\n",
            )
                .into_response();
        }
    }
    let Some(slot) = Slot::take(&app) else {
        app.shared.metrics.rejected.inc();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("5"))],
            format!("too many clients (at most {} at once)\n", app.max_clients),
        )
            .into_response();
    };
    let response = next.run(req).await;
    response.map(|inner| Body::new(Held { inner, _slot: slot }))
}

/// One of the `max_clients` slots.
struct Slot(Arc<Shared>);

impl Slot {
    fn take(app: &App) -> Option<Slot> {
        let clients = &app.shared.clients;
        let mut n = clients.load(Ordering::Relaxed);
        loop {
            if n >= app.max_clients {
                return None;
            }
            match clients.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        app.shared.metrics.clients.inc();
        Some(Slot(Arc::clone(&app.shared)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.clients.dec();
    }
}

/// A response body that holds its client's slot until it ends or is dropped.
struct Held {
    inner: Body,
    _slot: Slot,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], PAGE)
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], SCRIPT)
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], STYLE)
}

async fn status(State(app): State<App>) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Json(app.shared.status(TOP_K)))
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        app.shared.metrics.encode(app.shared.mqtt.as_ref().map(MqttMonitor::stats)),
    )
}

/// `GET /snapshot.jpg`: the frame of the newest snapshot, encoded off the
/// inference thread by the first request for it and kept for the rest;
/// 404 before the first.
async fn snapshot(State(app): State<App>) -> Response {
    let Some(latest) = app.shared.live().snapshot.clone() else {
        return error(StatusCode::NOT_FOUND, "no snapshot yet (run with --snapshot-dir; one is taken when the label changes)");
    };
    let jpeg = match latest.jpeg.get() {
        Some(jpeg) => jpeg.clone(),
        None => {
            let image = Arc::clone(&latest.image);
            let encoded = tokio::task::spawn_blocking(move || {
                let mut jpeg = Vec::with_capacity(image.len() / 8 + 1024);
                JpegEncoder::new_with_quality(&mut std::io::Cursor::new(&mut jpeg), 85).encode_image(&*image).map(|()| jpeg)
            })
            .await;
            match encoded {
                // Two first requests at once may both encode; one result is kept.
                Ok(Ok(jpeg)) => latest.jpeg.get_or_init(|| Bytes::from(jpeg)).clone(),
                Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the snapshot: {e}")),
                Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "the encoding task failed"),
            }
        }
    };
    ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "no-cache")], jpeg).into_response()
}

fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": detail.into() }))).into_response()
}

/// `POST /api/classify`: the body is the image file itself (any format the
/// build decodes; `curl --data-binary @photo.jpg`).
async fn classify(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let Some(worker) = app.worker.clone() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this server has no classifier for uploads");
    };
    let too_big = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("the upload is larger than {} bytes", app.max_upload));
    match headers.get(header::CONTENT_LENGTH).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok())) {
        Some(None) => return error(StatusCode::BAD_REQUEST, "bad Content-Length"),
        Some(Some(n)) if n > app.max_upload as u64 => return too_big(),
        _ => {}
    }
    // Read through a limit (chunked uploads carry no length): never more
    // than `max_upload` bytes are held.
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, app.max_upload)).await {
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "the upload did not arrive in time"),
        Ok(Err(e)) => {
            let limit = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if limit { too_big() } else { error(StatusCode::BAD_REQUEST, format!("cannot read the upload: {e}")) };
        }
        Ok(Ok(b)) => b,
    };
    if bytes.is_empty() {
        return error(StatusCode::BAD_REQUEST, "the upload is empty: send the image file as the request body");
    }
    match tokio::task::spawn_blocking(move || worker.classify(&bytes, TOP_K)).await {
        Ok(Ok(c)) => Json(c).into_response(),
        Ok(Err(Failed::BadImage(e))) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(Failed::Internal(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the classification task failed"),
    }
}
