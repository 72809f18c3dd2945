//! The leaf every other module writes and hashes through: sha256 in hex,
//! and atomic writes (temp file + fsync + rename), private or not. It depends on nothing
//! else in the crate but its error type.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::FormatError;

/// sha256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// synced, then renamed over `path`: readers see the old file or the new
/// one, never half of one. The file gets the permissions of any new file
/// (0666 less the umask), not the temporary file's private 0600, so a
/// bundle written by one user can be read by the service that runs it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    write_via_temp(path, bytes, 0o666, true)
}

/// Writes a new file that only its owner may read (0600), such as a
/// secret key, the same way as [`write_atomic`]; fails if `path` exists, so
/// a key is never overwritten by mistake.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    write_via_temp(path, bytes, 0o600, false)
}

/// Writes a new file with the permissions of any new file, as
/// [`write_atomic`]; fails if `path` exists.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    write_via_temp(path, bytes, 0o666, false)
}

fn write_via_temp(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> Result<(), FormatError> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tern-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut tmp = builder.tempfile_in(dir).map_err(|e| FormatError::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| FormatError::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| FormatError::io(tmp.path(), e))?;
    if replace {
        tmp.persist(path).map_err(|e| FormatError::io(path, e.error))?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| FormatError::io(path, e.error))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.onnx");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
    }

    #[cfg(unix)]
    #[test]
    fn atomic_write_gives_the_permissions_of_a_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let p = dir.path().join("m.onnx");
        write_atomic(&p, b"one").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), mode(&plain), "not the mode std::fs::write gives (umask applied to 0666)");
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        write_new_private(&p, b"secret").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_new_private(&p, b"other").is_err(), "an existing key was replaced");
        assert!(write_new(&p, b"other").is_err(), "an existing file was replaced");
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
    }
}
