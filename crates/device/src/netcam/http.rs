//! HTTP cameras through `ureq`: a Motion-JPEG stream
//! (`multipart/x-mixed-replace`, what most IP cameras and mjpg-streamer
//! serve) read part by part, or a snapshot URL (one `image/jpeg` per
//! request) polled at `--fps`.
//!
//! Every read has a timeout, so a server that goes silent is lost rather
//! than a stalled loop. A part's size is checked before it is read (its
//! `Content-Length`, or the bytes seen before the next boundary when it has
//! none), header lines and their number are bounded, and an oversized part
//! is skipped without being kept.

use std::io::{self, BufRead, BufReader, Read};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use tern_model_format::preprocess::decode_image;

use super::NetcamSettings;
use crate::source::{Frame, FrameSource, Pace, SourceError};

/// Longest header line of a part.
pub const MAX_HEADER_LINE: usize = 8 * 1024;
/// Most header lines of a part.
pub const MAX_HEADER_LINES: usize = 64;
/// Most bytes skipped while looking for a boundary line.
pub const MAX_SKIP: u64 = 1 << 20;
/// Snapshot requests per second when `--fps` is not given.
pub const DEFAULT_SNAPSHOT_FPS: f64 = 2.0;

/// An HTTP camera: a Motion-JPEG stream or a snapshot URL.
pub struct HttpCamera {
    url: String,
    agent: ureq::Agent,
    settings: NetcamSettings,
    mode: Mode,
    index: u64,
    pace: Pace,
}

enum Mode {
    /// Reading the parts of a multipart stream.
    Stream(Multipart<BufReader<ureq::BodyReader<'static>>>),
    /// One picture per request; the first one, already read, is pending.
    Snapshot(Option<Vec<u8>>),
    /// Lost; waiting for [`FrameSource::reopen`].
    Closed,
}

impl HttpCamera {
    /// Connects to `url` and reads the response head: a multipart stream or
    /// a single picture. Errors name the URL and what went wrong (refused
    /// connection, timeout, HTTP status, a content type that is no picture).
    pub fn open(url: &str, settings: NetcamSettings) -> Result<HttpCamera> {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_recv_response(Some(settings.read_timeout))
            .timeout_per_read(Some(settings.read_timeout))
            .timeout_per_write(Some(settings.read_timeout))
            .max_redirects(3)
            .proxy(None)
            .user_agent(concat!("tern-device/", env!("CARGO_PKG_VERSION")))
            .build();
        let fps = settings.fps.unwrap_or(DEFAULT_SNAPSHOT_FPS);
        let mut cam = HttpCamera {
            url: url.to_owned(),
            agent: ureq::Agent::new_with_config(config),
            settings,
            mode: Mode::Closed,
            index: 0,
            pace: Pace::new(fps),
        };
        cam.mode = cam.connect().with_context(|| cam.url.clone())?;
        Ok(cam)
    }

    /// Makes the request and reads the response head.
    fn connect(&self) -> Result<Mode> {
        let response = self.get().map_err(|e| self.request_error(e))?;
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if mime.starts_with("multipart/") {
            let boundary = boundary_of(&content_type)
                .ok_or_else(|| anyhow!("{content_type:?} names no boundary"))?;
            let reader = BufReader::with_capacity(64 * 1024, response.into_body().into_reader());
            Ok(Mode::Stream(Multipart::new(reader, &boundary, self.settings.max_frame)))
        } else if mime.starts_with("image/") || mime.is_empty() || mime == "application/octet-stream" {
            let picture = self.read_snapshot(response)?;
            Ok(Mode::Snapshot(Some(picture)))
        } else {
            bail!(
                "the server sent {content_type:?}, not an MJPEG stream (multipart/x-mixed-replace) \
                 or a picture (image/jpeg); check the camera's stream URL"
            )
        }
    }

    /// One GET of the URL, with basic authentication when there are
    /// credentials.
    fn get(&self) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut request = self.agent.get(&self.url);
        if let Some(c) = &self.settings.credentials {
            let token = BASE64.encode(format!("{}:{}", c.username, c.password.expose()));
            request = request.header("Authorization", format!("Basic {token}"));
        }
        request.call()
    }

    fn read_snapshot(&self, response: ureq::http::Response<ureq::Body>) -> Result<Vec<u8>> {
        let max = self.settings.max_frame;
        if let Some(n) = response.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
            if n > max as u64 {
                bail!("a picture of {n} bytes is over the limit of {max} bytes");
            }
        }
        response.into_body().into_with_config().limit(max as u64).read_to_vec().map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => anyhow!("a picture over the limit of {max} bytes"),
            e => self.request_error(e),
        })
    }

    /// What went wrong with a request or a read, in words (the URL is
    /// added by the caller, or by the loop's description of the source).
    fn request_error(&self, e: ureq::Error) -> anyhow::Error {
        let read = self.settings.read_timeout.as_secs_f64();
        match e {
            ureq::Error::StatusCode(401) if self.settings.credentials.is_some() => {
                anyhow!("HTTP 401, the camera refused the user name and password")
            }
            ureq::Error::StatusCode(401) => anyhow!(
                "HTTP 401, the camera wants a user name and password \
                 (--url-username and --url-password-file, or TERN_URL_USERNAME and TERN_URL_PASSWORD)"
            ),
            ureq::Error::StatusCode(code) => anyhow!("HTTP status {code}"),
            ureq::Error::Timeout(ureq::Timeout::Connect) => anyhow!(
                "timed out: no connection within {:.1} s",
                self.settings.connect_timeout.as_secs_f64()
            ),
            ureq::Error::Timeout(ureq::Timeout::RecvResponse) => {
                anyhow!("timed out: connected, but no answer within {read:.1} s")
            }
            ureq::Error::Timeout(t) => anyhow!("timed out ({t}): nothing received for {read:.1} s"),
            ureq::Error::Io(io) if matches!(io.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                anyhow!("timed out: nothing received for {read:.1} s")
            }
            ureq::Error::Io(io) => anyhow!("{io}"),
            e => anyhow!("{e}"),
        }
    }

    fn lost(&mut self, e: anyhow::Error) -> SourceError {
        self.mode = Mode::Closed;
        SourceError::Lost(e)
    }

    fn decode(&mut self, bytes: &[u8]) -> Result<Option<Frame>, SourceError> {
        let index = self.index;
        self.index += 1;
        let image = decode_image(bytes)
            .with_context(|| format!("{}: picture {index} ({} bytes)", self.url, bytes.len()))
            .map_err(SourceError::BadFrame)?;
        Ok(Some(Frame { index, image: image.to_rgb8(), captured: Instant::now(), name: None }))
    }
}

impl FrameSource for HttpCamera {
    fn describe(&self) -> String {
        match self.mode {
            Mode::Stream(_) => format!("mjpeg stream {}", self.url),
            Mode::Snapshot(_) => format!("snapshots {}", self.url),
            Mode::Closed => format!("http camera {}", self.url),
        }
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        match &mut self.mode {
            Mode::Closed => Err(SourceError::Lost(anyhow!("not connected"))),
            Mode::Stream(parts) => match parts.next_part() {
                Ok(Some(Part::Picture(bytes))) => self.decode(&bytes),
                Ok(Some(Part::TooLarge(n))) => Err(SourceError::BadFrame(anyhow!(
                    "{}: a part of {n} bytes is over the limit of {} bytes",
                    self.url,
                    self.settings.max_frame
                ))),
                Ok(Some(Part::Malformed(why))) => Err(SourceError::BadFrame(anyhow!("{}: {why}", self.url))),
                Ok(None) => Err(self.lost(anyhow!("the server ended the stream"))),
                Err(e) => {
                    let e = self.request_error(ureq::Error::from(e));
                    Err(self.lost(e))
                }
            },
            Mode::Snapshot(pending) => {
                let bytes = match pending.take() {
                    Some(b) => b,
                    None => {
                        self.pace.wait();
                        let response = match self.get() {
                            Ok(r) => r,
                            Err(e) => {
                                let e = self.request_error(e);
                                return Err(self.lost(e));
                            }
                        };
                        // An oversized picture is a bad frame; the next request may be fine.
                        let url = &self.url;
                        self.read_snapshot(response).with_context(|| url.clone()).map_err(SourceError::BadFrame)?
                    }
                };
                self.decode(&bytes)
            }
        }
    }

    fn reopen(&mut self) -> Result<()> {
        self.mode = Mode::Closed;
        self.mode = self.connect()?;
        Ok(())
    }
}

/// The `boundary` parameter of a multipart content type, without quotes.
fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.trim_start_matches('-').is_empty()).then(|| v.to_owned())
    })
}

/// One part of a multipart stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    /// The part's body (a picture, if the server is well behaved).
    Picture(Vec<u8>),
    /// A part over the size limit, skipped; its size in bytes.
    TooLarge(u64),
    /// Headers that break the bounds or cannot be read; what is wrong.
    Malformed(String),
}

/// The parts of a `multipart/x-mixed-replace` body, read with bounded
/// memory.
///
/// Parts are delimited by boundary lines. Servers differ in how they write
/// them: `--BOUNDARY` as RFC 2046 says, or the boundary parameter itself
/// when it already starts with dashes; so a boundary line is any line of
/// one or more dashes followed by the boundary without its leading dashes.
/// A part's `Content-Length`, when given, is used (and checked against the
/// limit before anything is read); without it the body runs to the next
/// boundary line.
pub struct Multipart<R> {
    reader: R,
    /// The boundary without its leading dashes.
    name: Vec<u8>,
    max: usize,
    /// Right after a boundary line: the next line is a part header.
    at_headers: bool,
    /// The closing boundary (`--BOUNDARY--`) was read.
    ended: bool,
}

impl<R: BufRead> Multipart<R> {
    /// Reads parts from `reader`, delimited by `boundary` (the content
    /// type's parameter), each at most `max` bytes.
    pub fn new(reader: R, boundary: &str, max: usize) -> Multipart<R> {
        let name = boundary.trim_start_matches('-').as_bytes().to_vec();
        Multipart { reader, name, max, at_headers: false, ended: false }
    }

    /// The next part; `None` after the closing boundary. An I/O error (a
    /// timeout, the connection closed) means the stream is gone.
    pub fn next_part(&mut self) -> io::Result<Option<Part>> {
        if self.ended {
            return Ok(None);
        }
        if !self.at_headers {
            let mut skipped = 0u64;
            loop {
                let (line, n) = self.read_line(MAX_HEADER_LINE)?;
                skipped += n as u64;
                if let Some(l) = &line {
                    match self.boundary_line(l) {
                        Some(true) => {
                            self.ended = true;
                            return Ok(None);
                        }
                        Some(false) => break,
                        None => {}
                    }
                }
                if skipped > MAX_SKIP {
                    return Ok(Some(Part::Malformed(format!("no boundary line within {skipped} bytes"))));
                }
            }
            self.at_headers = true;
        }
        // Whatever happens to this part, the next one starts by looking for
        // a boundary line, unless the body below ends at one.
        self.at_headers = false;
        let mut length = None;
        let mut lines = 0;
        loop {
            let (line, _) = self.read_line(MAX_HEADER_LINE)?;
            let Some(line) = line else {
                return Ok(Some(Part::Malformed(format!("a part header line over {MAX_HEADER_LINE} bytes"))));
            };
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if line.is_empty() {
                break;
            }
            lines += 1;
            if lines > MAX_HEADER_LINES {
                return Ok(Some(Part::Malformed(format!("more than {MAX_HEADER_LINES} part header lines"))));
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    match v.trim().parse::<u64>() {
                        Ok(n) => length = Some(n),
                        Err(_) => return Ok(Some(Part::Malformed(format!("bad part Content-Length {:?}", v.trim())))),
                    }
                }
            }
        }
        match length {
            Some(n) if n > self.max as u64 => {
                let skipped = io::copy(&mut (&mut self.reader).take(n), &mut io::sink())?;
                if skipped < n {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a part"));
                }
                Ok(Some(Part::TooLarge(n)))
            }
            Some(n) => {
                // n <= max: the allocation is bounded.
                let mut body = vec![0; n as usize];
                self.reader.read_exact(&mut body)?;
                Ok(Some(Part::Picture(body)))
            }
            None => self.body_to_boundary(),
        }
    }

    /// Whether `line` is a boundary line: `Some(true)` for the closing one.
    fn boundary_line(&self, line: &[u8]) -> Option<bool> {
        let line = line.trim_ascii();
        let rest = line.strip_prefix(b"-")?;
        let rest = &rest[rest.iter().take_while(|&&b| b == b'-').count()..];
        let tail = rest.strip_prefix(self.name.as_slice())?;
        match tail {
            b"" => Some(false),
            b"--" => Some(true),
            _ => None,
        }
    }

    /// One line, without its end: `(None, n)` when it is longer than `max`
    /// (the line is read to its end, or [`MAX_SKIP`] bytes of it, and
    /// dropped); `n` is the bytes read.
    fn read_line(&mut self, max: usize) -> io::Result<(Option<Vec<u8>>, usize)> {
        let mut line = Vec::new();
        let mut read = 0;
        let mut too_long = false;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the stream"));
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if !too_long {
                if line.len() + take > max + 2 {
                    too_long = true;
                    line = Vec::new();
                } else {
                    line.extend_from_slice(&buf[..take]);
                }
            }
            self.reader.consume(take);
            read += take;
            // A "line" of garbage without line breaks stops being read here,
            // so that a caller's skip bound is checked.
            if done || (too_long && read as u64 > MAX_SKIP) {
                break;
            }
        }
        if too_long {
            return Ok((None, read));
        }
        while line.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
            line.pop();
        }
        Ok((Some(line), read))
    }

    /// A body without `Content-Length`: the bytes up to the line break
    /// before the next boundary line.
    fn body_to_boundary(&mut self) -> io::Result<Option<Part>> {
        let n = self.name.len();
        let keep = n + 64;
        let mut acc: Vec<u8> = Vec::new();
        let mut dropped = 0u64;
        let mut from = 0;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a part"));
            }
            let old = acc.len();
            let len = buf.len();
            acc.extend_from_slice(buf);
            let mut found = None;
            while let Some(p) = find(&acc, &self.name, from) {
                if let Some(end) = line_start_before_dashes(&acc, p) {
                    found = Some((end, p + n));
                    break;
                }
                from = p + 1;
            }
            let Some((end, after)) = found else {
                self.reader.consume(len);
                from = acc.len().saturating_sub(n);
                if acc.len() > self.max + keep {
                    let cut = acc.len() - keep;
                    acc.drain(..cut);
                    dropped += cut as u64;
                    from = from.saturating_sub(cut);
                }
                continue;
            };
            self.reader.consume(after.saturating_sub(old).min(len));
            // The rest of the boundary line: `--` ends the stream.
            let (rest, _) = self.read_line(MAX_HEADER_LINE)?;
            match rest {
                Some(r) if r.trim_ascii().starts_with(b"--") => self.ended = true,
                _ => self.at_headers = true,
            }
            let mut body_end = end;
            if body_end > 0 && acc[body_end - 1] == b'\r' {
                body_end -= 1;
            }
            let size = dropped + body_end as u64;
            if size > self.max as u64 {
                return Ok(Some(Part::TooLarge(size)));
            }
            acc.truncate(body_end);
            return Ok(Some(Part::Picture(acc)));
        }
    }
}

/// Where the body ends if the boundary name found at `p` is a boundary line:
/// one or more dashes right before `p`, preceded by a line break (or the
/// start of the body). Returns the index of that line break (0 at the start).
fn line_start_before_dashes(acc: &[u8], p: usize) -> Option<usize> {
    let dashes = acc[..p].iter().rev().take_while(|&&b| b == b'-').count();
    if dashes == 0 {
        return None;
    }
    let start = p - dashes;
    if start == 0 {
        return Some(0);
    }
    (acc[start - 1] == b'\n').then_some(start - 1)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(stream: &[u8], boundary: &str, max: usize) -> Vec<io::Result<Option<Part>>> {
        let mut m = Multipart::new(BufReader::with_capacity(7, stream), boundary, max);
        let mut out = Vec::new();
        loop {
            let p = m.next_part();
            let stop = !matches!(p, Ok(Some(_)));
            out.push(p);
            if stop {
                return out;
            }
        }
    }

    fn pictures(out: &[io::Result<Option<Part>>]) -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|p| match p {
                Ok(Some(Part::Picture(b))) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn parts_with_and_without_content_length() {
        let s = b"preamble\r\n--frame\r\nContent-Type: image/jpeg\r\nContent-Length: 5\r\n\r\nAB\r\nC\r\n\
--frame\r\nContent-Type: image/jpeg\r\n\r\nno length -- here\r\n--frame\r\n\r\nthird\r\n--frame--\r\n";
        let out = parts(s, "frame", 100);
        assert_eq!(pictures(&out), [b"AB\r\nC".to_vec(), b"no length -- here".to_vec(), b"third".to_vec()]);
        assert!(matches!(out.last(), Some(Ok(None))));
    }

    #[test]
    fn boundaries_with_their_own_dashes_and_bare_newlines() {
        // The parameter already has dashes; servers write it as is, or with two more.
        let s = b"--myboundary\nContent-Length: 2\n\nab\n----myboundary\n\ncd\n--myboundary\n\nef\n";
        let out = parts(s, "--myboundary", 100);
        assert_eq!(pictures(&out), [b"ab".to_vec(), b"cd".to_vec()]);
        // The stream then ends inside the last part: an error, not a picture.
        assert_eq!(out.last().unwrap().as_ref().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(boundary_of("multipart/x-mixed-replace; boundary=\"--b1\""), Some("--b1".into()));
        assert_eq!(boundary_of("multipart/x-mixed-replace;boundary=--"), None);
        assert_eq!(boundary_of("multipart/x-mixed-replace"), None);
    }

    #[test]
    fn oversized_parts_are_skipped_with_bounded_memory() {
        let big = vec![b'x'; 5000];
        let mut s = b"--b\r\nContent-Length: 5000\r\n\r\n".to_vec();
        s.extend_from_slice(&big);
        s.extend_from_slice(b"\r\n--b\r\n\r\n");
        s.extend_from_slice(&big);
        s.extend_from_slice(b"\r\n--b\r\nContent-Length: 3\r\n\r\nok!\r\n--b--\r\n");
        let out = parts(&s, "b", 1000);
        assert!(matches!(out[0], Ok(Some(Part::TooLarge(5000)))), "{:?}", out[0]);
        assert!(matches!(out[1], Ok(Some(Part::TooLarge(5000)))), "{:?}", out[1]);
        assert_eq!(pictures(&out), [b"ok!".to_vec()]);
    }

    #[test]
    fn malformed_headers_are_bad_parts_and_the_stream_goes_on() {
        let mut s = b"--b\r\nContent-Length: lots\r\n\r\njunk\r\n--b\r\n".to_vec();
        s.extend(std::iter::repeat_n(b'h', MAX_HEADER_LINE + 10));
        s.extend_from_slice(b"\r\n\r\njunk\r\n--b\r\nContent-Length: 2\r\n\r\nhi\r\n--b--\r\n");
        let out = parts(&s, "b", 100);
        assert!(matches!(&out[0], Ok(Some(Part::Malformed(m))) if m.contains("Content-Length")), "{:?}", out[0]);
        assert!(matches!(&out[1], Ok(Some(Part::Malformed(m))) if m.contains("header line")), "{:?}", out[1]);
        assert_eq!(pictures(&out), [b"hi".to_vec()]);
        // A stream that never has a boundary line.
        let junk = vec![b'z'; (MAX_SKIP as usize) * 2];
        let mut m = Multipart::new(BufReader::new(&junk[..]), "b", 100);
        assert!(matches!(m.next_part(), Ok(Some(Part::Malformed(_)))));
    }
}
