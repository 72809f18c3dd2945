//! Reviewing captures: list them (newest first, paged, with their
//! sidecars), confirm one, move one to another label, delete one.
//!
//! A small typed API for a front end (the web view, `tern-device review`):
//! requests and responses are serde types, and every error maps to an HTTP
//! status ([`ReviewError::status`]: 400 for a malformed request, 404 for a
//! capture that is not there, 409 when a move would overwrite a file).
//!
//! A capture's id is its path under the capture folder,
//! `<label folder>/<file>.jpg`. Ids are checked before any file is
//! touched: exactly two components, neither empty, hidden (`.`, `..`,
//! `.x`), nor holding `\` or control characters, the second an image file
//! name; and the folder and the file must be a real directory and a
//! regular file (not symbolic links), so nothing outside the capture
//! folder is ever read, moved or deleted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{folder_label, label_folder, Sidecar};
use tern_model_format::dataset::is_image_path;

/// Largest sidecar read, bytes.
const MAX_SIDECAR_BYTES: u64 = 1 << 20;
/// Largest page.
pub const MAX_PER_PAGE: usize = 500;
/// Longest id or label accepted, bytes.
const MAX_ID_BYTES: usize = 512;

/// Why a review request failed.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The request is malformed (a bad id, label or page): 400.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No such capture: 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with what is on disk (the target exists): 409.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The file system failed: 500.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl ReviewError {
    /// The HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            ReviewError::BadRequest(_) => 400,
            ReviewError::NotFound(_) => 404,
            ReviewError::Conflict(_) => 409,
            ReviewError::Io { .. } => 500,
        }
    }

    fn io(what: String) -> impl FnOnce(std::io::Error) -> ReviewError {
        move |source| ReviewError::Io { what, source }
    }
}

/// `list`: one page of captures, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// Page number, from 0.
    #[serde(default)]
    pub page: usize,
    /// Captures per page, 1 to [`MAX_PER_PAGE`].
    #[serde(default = "default_per_page")]
    pub per_page: usize,
    /// Only this label (the real label, not its folder name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Only captures nobody has confirmed or moved yet.
    #[serde(default)]
    pub unreviewed: bool,
}

fn default_per_page() -> usize {
    50
}

impl Default for ListRequest {
    fn default() -> Self {
        ListRequest { page: 0, per_page: default_per_page(), label: None, unreviewed: false }
    }
}

/// One page of captures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    /// Captures matching the request, on all pages.
    pub total: usize,
    /// This page's number.
    pub page: usize,
    /// Captures per page.
    pub per_page: usize,
    /// This page, newest first.
    pub items: Vec<Item>,
}

/// One capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Its id: `<label folder>/<file>.jpg`.
    pub id: String,
    /// The label it is filed under.
    pub label: String,
    /// Modification time of the image, ms since the epoch.
    pub mtime_ms: u64,
    /// Its sidecar, if it has one that could be read.
    pub sidecar: Option<Sidecar>,
}

/// `move`: file a capture under another label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRequest {
    /// The capture.
    pub id: String,
    /// The label to file it under (an existing one or a new one).
    pub label: String,
}

/// `delete`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The capture deleted.
    pub id: String,
}

/// The captures under one folder.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The captures under `root` (made by `--capture root`).
    pub fn open(root: &Path) -> Result<Store, ReviewError> {
        let meta = std::fs::metadata(root).map_err(ReviewError::io(format!("capture folder {}", root.display())))?;
        if !meta.is_dir() {
            return Err(ReviewError::BadRequest(format!("capture folder {} is not a directory", root.display())));
        }
        Ok(Store { root: root.to_path_buf() })
    }

    /// The capture folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// One page of captures, newest first (by the image's modification
    /// time, then id).
    pub fn list(&self, req: &ListRequest) -> Result<ListResponse, ReviewError> {
        if req.per_page == 0 || req.per_page > MAX_PER_PAGE {
            return Err(ReviewError::BadRequest(format!(
                "per_page {}: expected 1 to {MAX_PER_PAGE}",
                req.per_page
            )));
        }
        let folder = req.label.as_deref().map(checked_label).transpose()?;
        let mut all = Vec::new();
        for dir in self.entries(&self.root)? {
            let name = match dir.file_name().and_then(|n| n.to_str()) {
                Some(n) if !n.starts_with('.') => n.to_owned(),
                _ => continue,
            };
            if folder.as_ref().is_some_and(|f| *f != name) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&dir).map_err(ReviewError::io(format!("{}", dir.display())))?;
            if !meta.is_dir() {
                continue;
            }
            for file in self.entries(&dir)? {
                let Some(fname) = file.file_name().and_then(|n| n.to_str()) else { continue };
                if fname.starts_with('.') || !is_image_path(&file) {
                    continue;
                }
                let Ok(meta) = std::fs::symlink_metadata(&file) else { continue };
                if !meta.is_file() {
                    continue;
                }
                let mtime_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                all.push((mtime_ms, format!("{name}/{fname}")));
            }
        }
        all.sort_by(|a, b| b.cmp(a));
        let mut items = Vec::new();
        let mut total = 0;
        let skip = req.page.saturating_mul(req.per_page);
        for (mtime_ms, id) in all {
            let on_page = total >= skip && items.len() < req.per_page;
            // Sidecars are read for the page, and for every capture only
            // when filtering on them. A malformed one does not hide the
            // others.
            if !on_page && !req.unreviewed {
                total += 1;
                continue;
            }
            let sidecar = self.sidecar_of(&id).ok().flatten();
            if req.unreviewed && sidecar.as_ref().is_some_and(|s| s.reviewed) {
                continue;
            }
            total += 1;
            if on_page {
                items.push(self.item(id, mtime_ms, sidecar));
            }
        }
        Ok(ListResponse { total, page: req.page, per_page: req.per_page, items })
    }

    /// One capture.
    pub fn get(&self, id: &str) -> Result<Item, ReviewError> {
        let (image, _) = self.resolve(id)?;
        let mtime_ms = std::fs::metadata(&image)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let sidecar = self.sidecar_of(id)?;
        Ok(self.item(id.to_owned(), mtime_ms, sidecar))
    }

    /// The image file of a capture (to serve it).
    pub fn image_path(&self, id: &str) -> Result<PathBuf, ReviewError> {
        Ok(self.resolve(id)?.0)
    }

    /// Confirms a capture's label: its sidecar says `reviewed: true`.
    pub fn confirm(&self, id: &str) -> Result<Item, ReviewError> {
        let (_, side) = self.resolve(id)?;
        let mut s = self.sidecar_of(id)?.ok_or_else(|| {
            ReviewError::NotFound(format!("capture {id} has no sidecar ({} is missing)", side.display()))
        })?;
        s.reviewed = true;
        write_sidecar(&side, &s)?;
        self.get(id)
    }

    /// Files a capture under `req.label` (a new folder if needed), its
    /// sidecar updated (`label`, `reviewed: true`). Moving to its own label
    /// confirms it. The answer carries the new id.
    pub fn relabel(&self, req: &MoveRequest) -> Result<Item, ReviewError> {
        let (image, side) = self.resolve(&req.id)?;
        let folder = checked_label(&req.label)?;
        let (from_folder, file) = req.id.split_once('/').unwrap_or(("", &req.id));
        if folder == from_folder {
            let mut s = self.sidecar_of(&req.id)?;
            if let Some(s) = &mut s {
                s.label = req.label.clone();
                s.reviewed = true;
                write_sidecar(&side, s)?;
            }
            return self.get(&req.id);
        }
        let target_dir = self.root.join(&folder);
        match std::fs::symlink_metadata(&target_dir) {
            Ok(m) if !m.is_dir() => {
                return Err(ReviewError::Conflict(format!("{} exists and is not a folder", target_dir.display())))
            }
            Ok(_) => {}
            Err(_) => std::fs::create_dir(&target_dir)
                .map_err(ReviewError::io(format!("cannot create {}", target_dir.display())))?,
        }
        let new_id = format!("{folder}/{file}");
        let target = target_dir.join(file);
        let target_side = target.with_extension("json");
        if target.exists() || target_side.exists() {
            return Err(ReviewError::Conflict(format!("{new_id} exists already")));
        }
        let sidecar = self.sidecar_of(&req.id)?;
        if let Some(mut s) = sidecar {
            s.label = req.label.clone();
            s.reviewed = true;
            let json = serde_json::to_vec_pretty(&s).map_err(|e| ReviewError::BadRequest(e.to_string()))?;
            tern_model_format::files::write_new(&target_side, &json).map_err(|e| ReviewError::Io {
                what: format!("cannot write {}", target_side.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            if let Err(e) = std::fs::rename(&image, &target) {
                let _ = std::fs::remove_file(&target_side);
                return Err(ReviewError::Io {
                    what: format!("cannot move {} to {}", image.display(), target.display()),
                    source: e,
                });
            }
            std::fs::remove_file(&side).map_err(ReviewError::io(format!("cannot remove {}", side.display())))?;
        } else {
            std::fs::rename(&image, &target)
                .map_err(ReviewError::io(format!("cannot move {} to {}", image.display(), target.display())))?;
        }
        self.get(&new_id)
    }

    /// Deletes a capture and its sidecar.
    pub fn delete(&self, id: &str) -> Result<Deleted, ReviewError> {
        let (image, side) = self.resolve(id)?;
        std::fs::remove_file(&image).map_err(ReviewError::io(format!("cannot delete {}", image.display())))?;
        match std::fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ReviewError::Io { what: format!("cannot delete {}", side.display()), source: e }),
        }
        Ok(Deleted { id: id.to_owned() })
    }

    fn item(&self, id: String, mtime_ms: u64, sidecar: Option<Sidecar>) -> Item {
        let label = match &sidecar {
            Some(s) => s.label.clone(),
            None => folder_label(id.split('/').next().unwrap_or_default()),
        };
        Item { id, label, mtime_ms, sidecar }
    }

    /// The image and sidecar paths of a valid, existing capture id.
    fn resolve(&self, id: &str) -> Result<(PathBuf, PathBuf), ReviewError> {
        let bad = |why: &str| ReviewError::BadRequest(format!("capture id {:?}: {why}", id));
        if id.len() > MAX_ID_BYTES {
            return Err(bad("too long"));
        }
        let parts: Vec<&str> = id.split('/').collect();
        let [folder, file] = parts[..] else { return Err(bad("expected LABEL_FOLDER/FILE.jpg")) };
        for p in [folder, file] {
            if p.is_empty() || p.starts_with('.') || p.contains('\\') || p.chars().any(char::is_control) {
                return Err(bad("each part must be a plain, visible file name"));
            }
        }
        if !is_image_path(Path::new(file)) {
            return Err(bad("not an image file name"));
        }
        let dir = self.root.join(folder);
        let image = dir.join(file);
        let not_found = || ReviewError::NotFound(format!("no capture {id} in {}", self.root.display()));
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(not_found()),
        }
        match std::fs::symlink_metadata(&image) {
            Ok(m) if m.is_file() => {}
            _ => return Err(not_found()),
        }
        let side = image.with_extension("json");
        Ok((image, side))
    }

    /// The sidecar of `id` (`None` when it has none; an error when it is
    /// unreadable or malformed).
    fn sidecar_of(&self, id: &str) -> Result<Option<Sidecar>, ReviewError> {
        let side = self.root.join(Path::new(id).with_extension("json"));
        match std::fs::symlink_metadata(&side) {
            Ok(m) if m.is_file() => {}
            _ => return Ok(None),
        }
        let bytes = tern_model_format::files::read_regular(&side, MAX_SIDECAR_BYTES, "sidecar").map_err(|e| {
            ReviewError::Io { what: format!("cannot read {}", side.display()), source: std::io::Error::other(e.to_string()) }
        })?;
        match serde_json::from_slice(&bytes) {
            Ok(s) => Ok(Some(s)),
            Err(e) => Err(ReviewError::Conflict(format!("sidecar {} is not a capture sidecar: {e}", side.display()))),
        }
    }

    fn entries(&self, dir: &Path) -> Result<Vec<PathBuf>, ReviewError> {
        let rd = std::fs::read_dir(dir).map_err(ReviewError::io(format!("cannot read {}", dir.display())))?;
        let mut v = Vec::new();
        for e in rd {
            v.push(e.map_err(ReviewError::io(format!("cannot read {}", dir.display())))?.path());
        }
        Ok(v)
    }
}

/// `label`'s folder name, after checking the label is usable.
fn checked_label(label: &str) -> Result<String, ReviewError> {
    if label.trim().is_empty() {
        return Err(ReviewError::BadRequest("the label is empty".into()));
    }
    if label.len() > MAX_ID_BYTES {
        return Err(ReviewError::BadRequest(format!("label of {} bytes: at most {MAX_ID_BYTES}", label.len())));
    }
    if label.chars().any(char::is_control) {
        return Err(ReviewError::BadRequest(format!("label {:?} holds control characters", label)));
    }
    Ok(label_folder(label))
}

fn write_sidecar(path: &Path, s: &Sidecar) -> Result<(), ReviewError> {
    let json = serde_json::to_vec_pretty(s).map_err(|e| ReviewError::BadRequest(e.to_string()))?;
    tern_model_format::files::write_atomic(path, &json).map_err(|e| ReviewError::Io {
        what: format!("cannot write {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::super::Policy;
    use super::*;

    fn sidecar(label: &str, frame: u64) -> Sidecar {
        Sidecar {
            label: label.into(),
            predicted: label.into(),
            probability: 0.5,
            probabilities: [("cat".to_string(), 0.5), ("dog".to_string(), 0.5)].into_iter().collect(),
            bundle: "m.onnx".into(),
            graph_sha256: "ab".repeat(32),
            source: "folder x".into(),
            name: Some(format!("{frame}.png")),
            frame,
            ts_ms: 1_000 + frame,
            time: super::super::utc_time(1_000 + frame),
            policy: Policy::Below,
            reviewed: false,
        }
    }

    /// Three captures: cat/1, cat/2, dog/3 (newest last), with sidecars.
    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        for (i, label) in [(1u64, "cat"), (2, "cat"), (3, "dog")] {
            let dir = d.path().join(label);
            std::fs::create_dir_all(&dir).unwrap();
            let img = dir.join(format!("{i}.jpg"));
            std::fs::write(&img, format!("jpeg {i}")).unwrap();
            std::fs::write(img.with_extension("json"), serde_json::to_vec(&sidecar(label, i)).unwrap()).unwrap();
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i);
            std::fs::File::options().write(true).open(&img).unwrap().set_modified(t).unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        (d, s)
    }

    fn ids(r: &ListResponse) -> Vec<&str> {
        r.items.iter().map(|i| i.id.as_str()).collect()
    }

    #[test]
    fn lists_newest_first_in_pages() {
        let (_d, s) = store();
        let all = s.list(&ListRequest::default()).unwrap();
        assert_eq!(all.total, 3);
        assert_eq!(ids(&all), ["dog/3.jpg", "cat/2.jpg", "cat/1.jpg"]);
        assert_eq!(all.items[0].sidecar.as_ref().unwrap().frame, 3);
        let p1 = s.list(&ListRequest { page: 1, per_page: 2, ..ListRequest::default() }).unwrap();
        assert_eq!((p1.total, ids(&p1)), (3, vec!["cat/1.jpg"]));
        let cats = s.list(&ListRequest { label: Some("cat".into()), ..ListRequest::default() }).unwrap();
        assert_eq!(ids(&cats), ["cat/2.jpg", "cat/1.jpg"]);
        let e = s.list(&ListRequest { per_page: 0, ..ListRequest::default() }).unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        // JSON requests with defaults, as a web front end sends them.
        let r: ListRequest = serde_json::from_str(r#"{"page":1}"#).unwrap();
        assert_eq!(r.per_page, 50);
    }

    #[test]
    fn confirm_move_delete() {
        let (d, s) = store();
        let c = s.confirm("cat/1.jpg").unwrap();
        assert!(c.sidecar.unwrap().reviewed);
        let unreviewed = s.list(&ListRequest { unreviewed: true, ..ListRequest::default() }).unwrap();
        assert_eq!(ids(&unreviewed), ["dog/3.jpg", "cat/2.jpg"]);
        let p1 = s.list(&ListRequest { unreviewed: true, page: 1, per_page: 1, ..ListRequest::default() }).unwrap();
        assert_eq!((p1.total, ids(&p1)), (2, vec!["cat/2.jpg"]));

        // To a new label whose name needs encoding.
        let m = s.relabel(&MoveRequest { id: "cat/2.jpg".into(), label: "red/blue".into() }).unwrap();
        assert_eq!(m.id, "red%2Fblue/2.jpg");
        assert_eq!(m.label, "red/blue");
        let sc = m.sidecar.unwrap();
        assert!(sc.reviewed && sc.label == "red/blue" && sc.predicted == "cat");
        assert!(!d.path().join("cat/2.jpg").exists() && !d.path().join("cat/2.json").exists());
        assert_eq!(std::fs::read(d.path().join("red%2Fblue/2.jpg")).unwrap(), b"jpeg 2");

        // To an existing label; a clash is a conflict and changes nothing.
        std::fs::write(d.path().join("dog/1.jpg"), b"other").unwrap();
        let e = s.relabel(&MoveRequest { id: "cat/1.jpg".into(), label: "dog".into() }).unwrap_err();
        assert_eq!(e.status(), 409, "{e}");
        assert!(d.path().join("cat/1.jpg").exists());
        let m = s.relabel(&MoveRequest { id: "dog/3.jpg".into(), label: "cat".into() }).unwrap();
        assert_eq!(m.id, "cat/3.jpg");

        s.delete("cat/3.jpg").unwrap();
        assert!(!d.path().join("cat/3.jpg").exists() && !d.path().join("cat/3.json").exists());
        assert_eq!(s.delete("cat/3.jpg").unwrap_err().status(), 404);
        assert_eq!(s.confirm("dog/1.jpg").unwrap_err().status(), 404, "no sidecar");
    }

    #[test]
    fn ids_cannot_leave_the_folder() {
        let (d, s) = store();
        let outside = d.path().parent().unwrap().join("outside.jpg");
        for id in [
            "../outside.jpg",
            "cat/../../outside.jpg",
            "/etc/passwd",
            "cat/.hidden.jpg",
            "..",
            "cat",
            "cat/1.json",
            "cat/1.jpg/x",
            "cat\\..\\x.jpg",
            "ca\u{0}t/1.jpg",
            "",
        ] {
            let e = s.delete(id).unwrap_err();
            assert_eq!(e.status(), 400, "{id:?}: {e}");
        }
        assert_eq!(s.delete("cow/1.jpg").unwrap_err().status(), 404);
        #[cfg(unix)]
        {
            // A symbolic link inside the folder that points outside it.
            std::fs::create_dir_all(d.path().join("cat")).unwrap();
            std::os::unix::fs::symlink(&outside, d.path().join("cat/link.jpg")).unwrap();
            std::os::unix::fs::symlink("/tmp", d.path().join("tmp")).unwrap();
            assert_eq!(s.delete("cat/link.jpg").unwrap_err().status(), 404);
            assert_eq!(s.get("tmp/x.jpg").unwrap_err().status(), 404);
            assert!(!s.list(&ListRequest::default()).unwrap().items.iter().any(|i| i.id.contains("link")));
        }
        for label in ["", "  ", "a\nb"] {
            let e = s.relabel(&MoveRequest { id: "cat/1.jpg".into(), label: label.into() }).unwrap_err();
            assert_eq!(e.status(), 400, "{label:?}: {e}");
        }
    }
}
