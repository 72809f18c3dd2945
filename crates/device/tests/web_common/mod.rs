//! `tern-device run --http 127.0.0.1:0` as a child process, for the web
//! view tests: started on the tiny colour bundle with a synthetic source,
//! its address read from its stderr, killed when dropped.
#![allow(dead_code)]

use ureq2 as ureq;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `tern-device run --http`.
pub struct Device {
    child: Child,
    /// The web view's address.
    pub addr: SocketAddr,
}

impl Device {
    /// Runs `tern-device run BUNDLE ARGS... --http 127.0.0.1:0`, with `env`
    /// set, and waits for the address on its stderr.
    pub fn start(bundle: &Path, args: &[&str], env: &[(&str, &str)]) -> Device {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-device"));
        cmd.arg("run").arg(bundle).args(args).args(["--http", "127.0.0.1:0"]);
        cmd.env_remove("TERN_HTTP_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start tern-device");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if let Some(rest) = line.strip_prefix("tern-device: web view on http://") {
                    let addr = rest.split('/').next().unwrap_or("").to_owned();
                    let _ = tx.send(Ok(addr));
                } else if line.starts_with("error") {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(a)) => a.parse().expect("address"),
            Ok(Err(e)) => panic!("tern-device failed: {e}"),
            Err(_) => panic!("tern-device printed no address"),
        };
        Device { child, addr }
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET /api/status` (with `token` as a bearer token, if any).
    pub fn status(&self, token: Option<&str>) -> serde_json::Value {
        let mut req = ureq::get(&self.url("/api/status")).timeout(Duration::from_secs(5));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        req.call().expect("GET /api/status").into_json().expect("status JSON")
    }

    /// Polls the status until `ok` holds, for at most `within`.
    pub fn wait_status(&self, within: Duration, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let end = Instant::now() + within;
        loop {
            let s = self.status(None);
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < end, "{what}: not within {within:?}; last status {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A raw connection to the server, with read and write timeouts.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends `request` on a new connection and reads the response head.
    pub fn raw(&self, request: &[u8]) -> (TcpStream, String) {
        let mut s = self.connect();
        s.write_all(request).expect("send request");
        let head = read_head(&mut s);
        (s, head)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads up to and including the blank line after the headers.
pub fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
        assert!(head.len() < 65536, "response head too long");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The status code of a response head.
pub fn code(head: &str) -> u16 {
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"))
}
