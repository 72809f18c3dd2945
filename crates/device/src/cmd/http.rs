//! The `--http*` flags of `run`: the live web view.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tern_device::trust::Trust;
use tern_device::mqtt::MqttMonitor;
use tern_device::web::{self, Loader, WebServer, WebSettings, WebSink};
use tern_device::LoadOptions;

/// Flags of the web view.
#[derive(clap::Args)]
pub struct HttpArgs {
    /// Serve the live web view (stream, label, figures, events, /api, /metrics)
    /// on ADDR:PORT, e.g. `0.0.0.0:8080`; port 0 takes a free port (printed on
    /// stderr).
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<String>,
    /// File whose first line is the token every request must carry
    /// (default: $TERN_HTTP_TOKEN; neither: no token). Never on the command line.
    #[arg(long, value_name = "FILE", requires = "http")]
    http_token_file: Option<PathBuf>,
    /// Requests served at once, streams included; beyond, 503.
    #[arg(long, value_name = "N", default_value_t = web::DEFAULT_MAX_CLIENTS as u64,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    http_max_clients: u64,
    /// Highest frame rate of the MJPEG stream.
    #[arg(long, value_name = "FPS", default_value_t = 10.0)]
    http_fps: f64,
    /// Largest upload to /api/classify, bytes; beyond, 413.
    #[arg(long, value_name = "BYTES", default_value_t = web::DEFAULT_MAX_UPLOAD)]
    http_max_upload: usize,
    /// A client that accepts no data for this many seconds is dropped.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    http_write_timeout: f64,
}

impl HttpArgs {
    /// Starts the server when `--http` is given; `/api/classify` loads
    /// `bundle` on first use, through `trust`, on one thread.
    /// With `captures` (`--capture DIR`), the page also reviews them
    /// ([`web::review`]); with `mqtt`, `/metrics` and `/api/status` show
    /// the MQTT queue.
    pub fn start(
        &self,
        bundle: &Path,
        trust: &Trust,
        options: &LoadOptions,
        captures: Option<&Path>,
        mqtt: Option<MqttMonitor>,
    ) -> Result<Option<(WebServer, WebSink)>> {
        let Some(addr) = &self.http else { return Ok(None) };
        let token = web::read_token(self.http_token_file.as_deref(), std::env::var(web::TOKEN_ENV).ok())?;
        let write_timeout = Duration::try_from_secs_f64(self.http_write_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--http-write-timeout {}: expected seconds > 0", self.http_write_timeout))?;
        let settings = WebSettings {
            addr: addr.clone(),
            token,
            max_clients: self.http_max_clients as usize,
            fps: self.http_fps,
            max_upload: self.http_max_upload,
            write_timeout,
            mqtt,
            ..WebSettings::default()
        };
        let (path, trust, options) = (bundle.to_owned(), trust.clone(), options.threads(1));
        let loader: Loader = Box::new(move || Ok(trust.load(&path, &options)?.0));
        let protected = settings.token.is_some();
        let extra = match captures {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create --capture {}", dir.display()))?;
                let store = tern_device::capture::review::Store::open(dir)
                    .map_err(|e| anyhow::anyhow!("--capture {}: {e}", dir.display()))?;
                web::review::routes(store)
            }
            None => axum::Router::new(),
        };
        let (server, sink) = web::start(settings, Some(loader), extra)?;
        // Always printed (also with --quiet): with port 0 it is the only way
        // to learn the port.
        eprintln!(
            "tern-device: web view on http://{}/{}",
            server.local_addr(),
            if protected { " (token required)" } else { "" }
        );
        Ok(Some((server, sink)))
    }
}
