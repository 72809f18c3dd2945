//! `tern-device run --url URL` and its options: a network camera as the
//! frame source.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use tern_device::netcam::{self, Credentials, NetcamSettings};

/// Options of `run --url`.
#[derive(clap::Args, Debug, Clone)]
pub struct NetcamArgs {
    /// A network camera: an HTTP MJPEG stream or JPEG snapshot URL
    /// (`http://HOST[:PORT]/PATH`), or an RTSP stream with H.264
    /// (`rtsp://HOST[:PORT]/PATH`). No user name or password in the URL.
    #[arg(long, group = "source", value_name = "URL")]
    pub url: Option<String>,
    /// User name of the camera (default: $TERN_URL_USERNAME).
    #[arg(long, value_name = "NAME", requires = "url")]
    pub url_username: Option<String>,
    /// File whose first line is the camera's password (default:
    /// $TERN_URL_PASSWORD). Never on the command line.
    #[arg(long, value_name = "FILE", requires = "url")]
    pub url_password_file: Option<PathBuf>,
    /// Seconds to wait for the camera to answer, connect and each read (for
    /// RTSP: each request and each picture); a camera silent for longer is
    /// lost and reopened.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, requires = "url")]
    pub url_timeout: f64,
    /// Largest picture accepted from the camera, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 16, requires = "url",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub url_max_frame_mib: u64,
}

impl NetcamArgs {
    /// The URL, checked, and how to reach it; `fps` paces snapshot URLs.
    pub fn settings(&self, fps: Option<f64>) -> Result<Option<(String, NetcamSettings)>> {
        let Some(url) = &self.url else { return Ok(None) };
        netcam::check_url(url)?;
        let timeout = std::time::Duration::try_from_secs_f64(self.url_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| anyhow!("--url-timeout {}: expected a number of seconds > 0", self.url_timeout))?;
        let credentials = Credentials::resolve(self.url_username.clone(), self.url_password_file.as_deref(), |k| {
            std::env::var(k).ok()
        })?;
        let settings = NetcamSettings {
            connect_timeout: timeout,
            read_timeout: timeout,
            max_frame: usize::try_from(self.url_max_frame_mib << 20)?,
            fps,
            credentials,
        };
        Ok(Some((url.clone(), settings)))
    }
}
