//! User names and passwords for the services the device talks to (the MQTT
//! broker, network cameras), gathered the same way for each: the user name
//! from a flag or an environment variable, the password from the first line
//! of a file or from an environment variable, never from the command line
//! (where `ps` shows it to every user of the machine). [`Password`] never
//! prints itself.

use std::fmt;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Largest password file read.
const MAX_PASSWORD_FILE: u64 = 64 * 1024;

/// A password; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: String) -> Password {
        Password(password)
    }

    /// The password itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Where one service's user name and password come from, named in errors.
#[derive(Debug, Clone, Copy)]
pub struct Sources {
    /// The service, as errors name it (`"MQTT"`, `"camera"`).
    pub service: &'static str,
    /// The user name flag (`--mqtt-username`).
    pub username_flag: &'static str,
    /// The user name's environment variable.
    pub username_env: &'static str,
    /// The password file flag (`--mqtt-password-file`).
    pub password_flag: &'static str,
    /// The password's environment variable.
    pub password_env: &'static str,
}

impl Sources {
    /// The user name from `username` (the command line) or the environment,
    /// and the password from the first line of `password_file` or from the
    /// environment (both at once is an error); empty values count as none.
    /// `env` looks a variable up (`|k| std::env::var(k).ok()`). A password
    /// without a user name is an error.
    pub fn gather(
        &self,
        username: Option<String>,
        password_file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Option<String>, Option<Password>)> {
        let username = username.or_else(|| env(self.username_env)).filter(|u| !u.is_empty());
        let env_password = env(self.password_env).filter(|p| !p.is_empty());
        let password = match (password_file, env_password) {
            (Some(f), Some(_)) => bail!(
                "{} password given twice, in {} ({}) and in {}: keep one",
                self.service,
                f.display(),
                self.password_flag,
                self.password_env
            ),
            (Some(f), None) => Some(self.read_password(f)?),
            (None, Some(p)) => Some(Password(p)),
            (None, None) => None,
        };
        if username.is_none() && password.is_some() {
            bail!("{} password without a user name: give {} NAME or {}", self.service, self.username_flag, self.username_env);
        }
        Ok((username, password))
    }

    /// The first line of `path` (its line ending dropped), read up to
    /// [`MAX_PASSWORD_FILE`] bytes.
    pub fn read_password(&self, path: &Path) -> Result<Password> {
        let what = format!("{} password file {}", self.service, path.display());
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {what}"))?;
        let mut text = String::new();
        file.take(MAX_PASSWORD_FILE + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {what} (UTF-8 text expected)"))?;
        if text.len() as u64 > MAX_PASSWORD_FILE {
            bail!("{what}: over {MAX_PASSWORD_FILE} bytes");
        }
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if line.is_empty() {
            bail!("{what}: the first line is empty");
        }
        Ok(Password(line.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Sources = Sources {
        service: "camera",
        username_flag: "--url-username",
        username_env: "U",
        password_flag: "--url-password-file",
        password_env: "P",
    };

    #[test]
    fn sources_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\r\nignored\n").unwrap();
        let none = |_: &str| None;
        let (u, p) = S.gather(Some("admin".into()), Some(&file), none).unwrap();
        assert_eq!((u.as_deref(), p.as_ref().map(Password::expose)), (Some("admin"), Some("s3cret")));
        assert!(!format!("{p:?}").contains("s3cret"));
        let env = |k: &str| Some(if k == "U" { "envuser" } else { "envpw" }.to_owned());
        let (u, p) = S.gather(None, None, env).unwrap();
        assert_eq!((u.as_deref(), p.as_ref().map(Password::expose)), (Some("envuser"), Some("envpw")));
        let twice = S.gather(Some("a".into()), Some(&file), env).unwrap_err().to_string();
        assert!(twice.contains("given twice") && twice.contains("--url-password-file"), "{twice}");
        let alone = S.gather(None, Some(&file), none).unwrap_err().to_string();
        assert_eq!(alone, "camera password without a user name: give --url-username NAME or U");
        assert_eq!(S.gather(None, None, none).unwrap(), (None, None));
        std::fs::write(&file, "\n").unwrap();
        assert!(S.gather(Some("a".into()), Some(&file), none).unwrap_err().to_string().contains("first line is empty"));
        std::fs::write(&file, vec![b'x'; MAX_PASSWORD_FILE as usize + 1]).unwrap();
        assert!(S.read_password(&file).unwrap_err().to_string().contains("over"));
        assert!(S.read_password(&dir.path().join("missing")).unwrap_err().to_string().contains("cannot open camera password file"));
    }
}
