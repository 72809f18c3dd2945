//! Network cameras: an HTTP Motion-JPEG stream or JPEG snapshot URL
//! ([`http`]), or RTSP with H.264 (`rtsp`, with the cargo feature of that
//! name, on by default), with the same [`FrameSource`] contract as a local camera — a
//! server that goes away is [`SourceError::Lost`](crate::source::SourceError)
//! and the run loop reopens it with back-off; an undecodable or oversized
//! picture is a bad frame.
//!
//! Credentials never travel in the URL: a URL with `user:password@` is
//! refused, and [`Credentials::resolve`] reads the password from a file or
//! from [`ENV_PASSWORD`].

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

pub use crate::secret::Password;
use crate::secret::Sources;
use crate::source::FrameSource;

pub mod http;
#[cfg(feature = "rtsp")]
pub mod rtsp;

/// Environment variable holding the camera's user name.
pub const ENV_USERNAME: &str = "TERN_URL_USERNAME";
/// Environment variable holding the camera's password.
pub const ENV_PASSWORD: &str = "TERN_URL_PASSWORD";

/// Default largest picture accepted from a network camera (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// How a network camera is reached.
#[derive(Debug, Clone)]
pub struct NetcamSettings {
    /// Longest wait for the TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for any read (the response head, each piece of the
    /// stream); a server that stays silent longer is lost.
    pub read_timeout: Duration,
    /// Largest picture accepted, bytes; checked before it is read.
    pub max_frame: usize,
    /// For a snapshot URL (one JPEG per request), requests per second.
    pub fps: Option<f64>,
    /// User name and password (HTTP basic authentication).
    pub credentials: Option<Credentials>,
}

impl Default for NetcamSettings {
    fn default() -> Self {
        NetcamSettings {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            fps: None,
            credentials: None,
        }
    }
}

/// User name and password of a network camera.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: Password,
}

impl Credentials {
    /// Gathers the credentials: the user name from `username` (the command
    /// line) or [`ENV_USERNAME`]; the password from the first line of
    /// `password_file` or from [`ENV_PASSWORD`] (both at once is an error).
    /// `env` looks a variable up (`|k| std::env::var(k).ok()`). `None` when
    /// neither is given; one without the other is an error.
    pub fn resolve(
        username: Option<String>,
        password_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Credentials>> {
        match SOURCES.gather(username, password_file, env)? {
            (None, _) => Ok(None),
            (Some(_), None) => bail!(
                "camera user name given without a password: --url-password-file FILE or {ENV_PASSWORD}"
            ),
            (Some(username), Some(password)) => {
                if username.contains(':') {
                    bail!("camera user name {username:?}: HTTP basic authentication forbids ':' in it");
                }
                Ok(Some(Credentials { username, password }))
            }
        }
    }
}

/// Where a camera's credentials come from.
const SOURCES: Sources = Sources {
    service: "camera",
    username_flag: "--url-username",
    username_env: ENV_USERNAME,
    password_flag: "--url-password-file",
    password_env: ENV_PASSWORD,
};

/// What kind of network camera a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http://`: an MJPEG stream or a JPEG snapshot.
    Http,
    /// `rtsp://`: RTSP with H.264.
    Rtsp,
}

/// Checks a camera URL: `http://` or `rtsp://`, a host, and no user name or
/// password in it (those come from [`Credentials::resolve`]).
pub fn check_url(url: &str) -> Result<Scheme> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        anyhow!("camera URL {url:?}: expected http://HOST[:PORT]/PATH or rtsp://HOST[:PORT]/PATH")
    })?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "rtsp" => Scheme::Rtsp,
        "https" | "rtsps" => bail!(
            "camera URL {}: {scheme}:// (TLS) is not supported; most cameras serve http:// or rtsp:// on the local network",
            redact(url)
        ),
        other => bail!("camera URL {}: scheme {other:?}, expected http:// or rtsp://", redact(url)),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        bail!(
            "camera URL {}: no user name or password in the URL (the command line is visible to every \
             user of the machine); give --url-username NAME (or {ENV_USERNAME}) and --url-password-file FILE \
             (or {ENV_PASSWORD})",
            redact(url)
        );
    }
    if authority.is_empty() {
        bail!("camera URL {url:?} has no host");
    }
    Ok(scheme)
}

/// The URL with any `user:password@` replaced by `***@`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Opens the network camera at `url` (checked with [`check_url`]): the first
/// request is made here, so a wrong URL, a refused password or a silent
/// server is an error now rather than a lost source later.
pub fn open(url: &str, settings: &NetcamSettings) -> Result<Box<dyn FrameSource>> {
    match check_url(url)? {
        Scheme::Http => Ok(Box::new(http::HttpCamera::open(url, settings.clone())?)),
        #[cfg(feature = "rtsp")]
        Scheme::Rtsp => Ok(Box::new(rtsp::RtspCamera::open(url, settings.clone())?)),
        #[cfg(not(feature = "rtsp"))]
        Scheme::Rtsp => bail!(
            "camera URL {}: this tern-device was built without RTSP support (--no-default-features); \
             rebuild with the default features or `--features rtsp`, or use the camera's HTTP MJPEG URL",
            redact(url)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_credentials_refused_in_them() {
        assert_eq!(check_url("http://cam.local:8080/video").unwrap(), Scheme::Http);
        assert_eq!(check_url("RTSP://10.0.0.5/stream1").unwrap(), Scheme::Rtsp);
        assert_eq!(check_url("http://h/p?user=a@b").unwrap(), Scheme::Http);
        let e = check_url("http://admin:hunter2@cam/video").unwrap_err().to_string();
        assert!(e.contains("--url-password-file") && !e.contains("hunter2"), "{e}");
        assert!(check_url("rtsp://admin@cam/x").is_err());
        assert!(check_url("https://cam/x").unwrap_err().to_string().contains("TLS"));
        assert!(check_url("ftp://cam/x").is_err());
        assert!(check_url("cam/x").is_err());
        assert!(check_url("http:///x").is_err());
        assert_eq!(redact("http://a:b@h:1/p@q"), "http://***@h:1/p@q");
    }

    #[test]
    fn credentials_come_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let none = |_: &str| None;
        let c = Credentials::resolve(Some("admin".into()), Some(&file), none).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("admin", "s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        let env = |k: &str| match k {
            ENV_USERNAME => Some("viewer".to_owned()),
            ENV_PASSWORD => Some("pw".to_owned()),
            _ => None,
        };
        let c = Credentials::resolve(None, None, env).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("viewer", "pw"));
        assert!(Credentials::resolve(None, None, none).unwrap().is_none());
        assert!(Credentials::resolve(None, Some(&file), env).unwrap_err().to_string().contains("twice"));
        assert!(Credentials::resolve(Some("a".into()), None, none).unwrap_err().to_string().contains("password"));
        assert!(Credentials::resolve(None, Some(&file), none).unwrap_err().to_string().contains("user name"));
        std::fs::write(&file, "\n").unwrap();
        assert!(Credentials::resolve(Some("a".into()), Some(&file), none).is_err());
    }
}
