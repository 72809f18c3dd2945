//! The leaf every other module reads, writes and hashes through: bounded
//! reads of regular files, sha256 in hex, and atomic writes (temp file +
//! fsync + rename), private or not. It depends on nothing else in the crate
//! but its error type.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::FormatError;

/// Reads the regular file at `path`, refusing anything larger than `limit`
/// bytes. FIFOs, sockets and devices (`/dev/zero`) are refused before they
/// are opened, so a FIFO without a writer cannot block the caller; the read
/// itself stops at `limit + 1` bytes whatever the file's metadata claims.
/// `what` names the file in errors (`bundle`, `image`).
pub fn read_regular(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, FormatError> {
    use std::io::Read;
    let not_regular = |kind: &str| FormatError::Invalid {
        what: format!("{what} {}", path.display()),
        detail: format!("{kind}, not a regular file"),
    };
    let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(file_kind(&meta)));
    }
    let too_large = |size: u64| FormatError::TooLarge { what: format!("{what} {}", path.display()), size, limit };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
    // The path may have been replaced between the two looks.
    let meta = file.metadata().map_err(|e| FormatError::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(file_kind(&meta)));
    }
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| FormatError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// What kind of file `meta` describes, in words.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

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
    fn only_regular_files_are_read_and_never_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_regular(Path::new("/dev/zero"), 1 << 20, "image").unwrap_err().to_string();
        assert!(err.contains("/dev/zero") && err.contains("a device, not a regular file"), "{err}");
        let err = read_regular(dir.path(), 1 << 20, "bundle").unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        // Would block forever if it were opened.
        let err = read_regular(&fifo, 1 << 20, "bundle").unwrap_err().to_string();
        assert!(err.contains("a FIFO"), "{err}");
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_regular(&p, 10, "f").unwrap(), b"0123456789");
        let err = read_regular(&p, 9, "f").unwrap_err();
        assert!(matches!(err, FormatError::TooLarge { size: 10, limit: 9, .. }), "{err}");
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
