//! ImageFolder datasets and their train/validation split.
//!
//! Shared by the host (training) and the device (evaluation) so that both
//! see exactly the same split of the same files.
//!
//! Layouts: `ROOT/train/<class>/…` + `ROOT/val/<class>/…`, or
//! `ROOT/<class>/…` split by a seeded, stratified draw. Class folders are
//! searched recursively; files are kept by extension (decoding, and the
//! skipping of unreadable files, is the caller's job); hidden files are
//! ignored. Classes are ordered by folder name.
//!
//! Extra folders ([`merge_extra`], `tern-host train --extra DIR`) join a
//! dataset: ImageFolders such as the captures of `tern-device run
//! --capture`, whose JSON sidecars say whether a person reviewed them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::FormatError;

/// Extensions (lower case) taken as images.
pub const IMAGE_EXTENSIONS: [&str; 11] = ["jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pnm"];
/// Most files a dataset may list.
pub const MAX_FILES: usize = 10_000_000;

/// One labelled image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The file.
    pub path: PathBuf,
    /// Index into [`Dataset::classes`].
    pub label: usize,
}

/// A dataset split into training and validation samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Class names (folder names), sorted.
    pub classes: Vec<String>,
    /// Training samples, grouped by class, in a fixed order.
    pub train: Vec<Sample>,
    /// Validation samples.
    pub val: Vec<Sample>,
    /// Whether the split came from `train/` + `val/` folders.
    pub presplit: bool,
}

impl Dataset {
    /// Keeps at most `max` samples per class in each split, the first ones
    /// in the dataset's order (quick runs on a subset; host and device cut
    /// the same way).
    pub fn limit_per_class(mut self, max: Option<usize>) -> Dataset {
        if let Some(max) = max {
            let n = self.classes.len();
            let cut = |v: Vec<Sample>| {
                let mut seen = vec![0usize; n];
                v.into_iter()
                    .filter(|s| {
                        let k = &mut seen[s.label.min(n.saturating_sub(1))];
                        *k += 1;
                        *k <= max
                    })
                    .collect()
            };
            self.train = cut(self.train);
            self.val = cut(self.val);
        }
        self
    }

    /// Samples per class in `samples`.
    pub fn counts(&self, samples: &[Sample]) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for s in samples {
            c[s.label] += 1;
        }
        c
    }
}

/// Lists `root` as an ImageFolder dataset. Without `train/`+`val/`, each
/// class is split on its own (stratified): its files sorted, shuffled with
/// `seed`, and `round(n · val_fraction)` of them (at least one when the
/// class has two or more files and the fraction is positive) go to
/// validation.
pub fn scan(root: &Path, val_fraction: f64, seed: u64) -> Result<Dataset, FormatError> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(FormatError::Invalid {
            what: "val_fraction".into(),
            detail: format!("{val_fraction} is outside [0, 1)"),
        });
    }
    let (train_dir, val_dir) = (root.join("train"), root.join("val"));
    if train_dir.is_dir() && val_dir.is_dir() {
        let train = class_files(&train_dir)?;
        let val = class_files(&val_dir)?;
        let classes: Vec<String> = train.iter().map(|(c, _)| c.clone()).collect();
        if let Some((c, _)) = val.iter().find(|(c, _)| !classes.contains(c)) {
            return Err(FormatError::Invalid {
                what: "dataset".into(),
                detail: format!("{}: class `{c}` has no folder in {}", val_dir.display(), train_dir.display()),
            });
        }
        let flatten = |groups: Vec<(String, Vec<PathBuf>)>| -> Vec<Sample> {
            groups
                .into_iter()
                .flat_map(|(c, files)| {
                    let l = classes.iter().position(|x| *x == c).unwrap_or(0);
                    files.into_iter().map(move |path| Sample { path, label: l })
                })
                .collect()
        };
        let (train, val) = (flatten(train), flatten(val));
        return Ok(Dataset { classes, train, val, presplit: true });
    }
    let groups = class_files(root)?;
    let classes = groups.iter().map(|(c, _)| c.clone()).collect();
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (label, (_, mut files)) in groups.into_iter().enumerate() {
        let mut rng = SplitMix64(seed ^ (label as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        shuffle(&mut files, &mut rng);
        let n = files.len();
        let mut n_val = (n as f64 * val_fraction).round() as usize;
        if val_fraction > 0.0 && n >= 2 {
            n_val = n_val.clamp(1, n - 1);
        }
        let mut val_files: Vec<PathBuf> = files.drain(..n_val).collect();
        val_files.sort();
        files.sort();
        val.extend(val_files.into_iter().map(|path| Sample { path, label }));
        train.extend(files.into_iter().map(|path| Sample { path, label }));
    }
    Ok(Dataset { classes, train, val, presplit: false })
}

/// `(class name, sorted image files)` for each class folder of `dir`.
fn class_files(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, FormatError> {
    let mut classes = Vec::new();
    for entry in read_dir_sorted(dir)? {
        if !entry.is_dir() {
            continue;
        }
        let name = entry
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| FormatError::Invalid {
                what: "class folder".into(),
                detail: format!("{}: the name is not valid UTF-8", entry.display()),
            })?
            .to_owned();
        if name.starts_with('.') {
            continue;
        }
        let mut files = Vec::new();
        collect_images(&entry, &mut files)?;
        if files.is_empty() {
            return Err(FormatError::Invalid {
                what: "dataset".into(),
                detail: format!("class folder {} has no image files", entry.display()),
            });
        }
        files.sort();
        classes.push((name, files));
    }
    if classes.len() < 2 {
        return Err(FormatError::Invalid {
            what: "dataset".into(),
            detail: format!(
                "{} has {} class folder(s); a classifier needs at least two (layout: ROOT/<class>/*.jpg)",
                dir.display(),
                classes.len()
            ),
        });
    }
    Ok(classes)
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FormatError> {
    for path in read_dir_sorted(dir)? {
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if is_image_path(&path) {
            if out.len() >= MAX_FILES {
                return Err(FormatError::TooLarge {
                    what: format!("dataset {}", dir.display()),
                    size: out.len() as u64,
                    limit: MAX_FILES as u64,
                });
            }
            out.push(path);
        }
    }
    Ok(())
}

/// Whether the file name has an image extension.
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, FormatError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| FormatError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| FormatError::io(dir, e)))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort();
    Ok(entries)
}

/// What [`merge_extra`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExtraReport {
    /// The extra folders.
    pub folders: Vec<PathBuf>,
    /// Images added (training and validation).
    pub added: usize,
    /// Images skipped because their content (sha256) is already in the set.
    pub duplicates: usize,
    /// Images skipped because their sidecar says `reviewed: false`.
    pub unreviewed: usize,
    /// Classes that only the extra folders have.
    pub new_classes: Vec<String>,
}

/// Largest sidecar read, bytes.
const MAX_SIDECAR_BYTES: u64 = 1 << 20;

/// Adds the images of the ImageFolders `extra` (`EXTRA/<class>/…`) to `ds`.
///
/// - Classes join by folder name; a class found only in extra folders
///   becomes a new class (class indices follow the sorted names again).
/// - An image whose content sha256 equals that of an image already in the
///   set (the dataset's, or an earlier extra one) is skipped and counted.
/// - A JSON sidecar beside an image (`x.json` for `x.jpg`, as captures
///   have) is read only for `reviewed`: with `reviewed_only`, images whose
///   sidecar says `"reviewed": false` (or has no `reviewed`) are skipped;
///   images without a sidecar are taken. Sidecars are never images.
/// - Each class's extra images are split like [`scan`] splits a class
///   (seeded, `val_fraction`), so a new class has validation images too;
///   they follow the dataset's own images of the class.
pub fn merge_extra(
    mut ds: Dataset,
    extra: &[PathBuf],
    reviewed_only: bool,
    val_fraction: f64,
    seed: u64,
) -> Result<(Dataset, ExtraReport), FormatError> {
    let mut report = ExtraReport { folders: extra.to_vec(), ..ExtraReport::default() };
    let mut seen = HashSet::new();
    for s in ds.train.iter().chain(&ds.val) {
        seen.insert(file_sha256(&s.path)?);
    }
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for root in extra {
        let entries = read_dir_sorted(root)?;
        for dir in entries.into_iter().filter(|p| p.is_dir()) {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                return Err(FormatError::Invalid {
                    what: "class folder".into(),
                    detail: format!("{}: the name is not valid UTF-8", dir.display()),
                });
            };
            if name.starts_with('.') {
                continue;
            }
            let mut files = Vec::new();
            collect_images(&dir, &mut files)?;
            for f in files {
                if reviewed_only && !reviewed(&f)? {
                    report.unreviewed += 1;
                    continue;
                }
                if !seen.insert(file_sha256(&f)?) {
                    report.duplicates += 1;
                    continue;
                }
                found.push((name.clone(), f));
            }
        }
    }
    let mut classes = ds.classes.clone();
    for (c, _) in &found {
        if !classes.contains(c) {
            classes.push(c.clone());
            report.new_classes.push(c.clone());
        }
    }
    classes.sort();
    report.new_classes.sort();
    let index = |c: &str| classes.iter().position(|x| x == c).unwrap_or(0);
    let remap: Vec<usize> = ds.classes.iter().map(|c| index(c)).collect();
    for s in ds.train.iter_mut().chain(ds.val.iter_mut()) {
        s.label = remap.get(s.label).copied().unwrap_or(0);
    }
    for (label, class) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = found.iter().filter(|(c, _)| c == class).map(|(_, f)| f.clone()).collect();
        if files.is_empty() {
            continue;
        }
        report.added += files.len();
        let mut rng = SplitMix64(seed ^ 0x5eed_e47a ^ (label as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        shuffle(&mut files, &mut rng);
        let n = files.len();
        let mut n_val = (n as f64 * val_fraction).round() as usize;
        if val_fraction > 0.0 && n >= 2 {
            n_val = n_val.clamp(1, n - 1);
        }
        let mut val: Vec<PathBuf> = files.drain(..n_val).collect();
        val.sort();
        files.sort();
        ds.val.extend(val.into_iter().map(|path| Sample { path, label }));
        ds.train.extend(files.into_iter().map(|path| Sample { path, label }));
    }
    // Stable: each class's own images stay before its extra ones.
    ds.train.sort_by_key(|s| s.label);
    ds.val.sort_by_key(|s| s.label);
    ds.classes = classes;
    Ok((ds, report))
}

/// Whether the image's sidecar (if any) says a person reviewed it.
fn reviewed(image: &Path) -> Result<bool, FormatError> {
    let side = image.with_extension("json");
    if !side.is_file() {
        return Ok(true);
    }
    let bytes = crate::files::read_regular(&side, MAX_SIDECAR_BYTES, "sidecar")?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| FormatError::Invalid {
        what: format!("sidecar {}", side.display()),
        detail: format!("not JSON: {e}"),
    })?;
    Ok(v.get("reviewed").and_then(serde_json::Value::as_bool).unwrap_or(false))
}

/// sha256 of a file's content, streamed.
fn file_sha256(path: &Path) -> Result<[u8; 32], FormatError> {
    let mut f = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| FormatError::io(path, e))?;
    Ok(h.finalize().into())
}

/// SplitMix64: a tiny, well-known generator, enough for a reproducible
/// shuffle (and identical on every platform).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn stratified_split_is_seeded_and_complete() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..10 {
            touch(&d.path().join(format!("cat/{i}.jpg")));
            touch(&d.path().join(format!("dög ü/{i}.PNG")));
        }
        touch(&d.path().join("cat/notes.txt"));
        touch(&d.path().join("cat/.hidden.jpg"));
        let a = scan(d.path(), 0.2, 7).unwrap();
        assert_eq!(a.classes, vec!["cat".to_string(), "dög ü".to_string()]);
        assert_eq!(a.counts(&a.val), vec![2, 2]);
        assert_eq!(a.counts(&a.train), vec![8, 8]);
        assert_eq!(a, scan(d.path(), 0.2, 7).unwrap());
        let b = scan(d.path(), 0.2, 8).unwrap();
        assert_ne!(a.val, b.val, "another seed should draw another split");
        for s in &a.val {
            assert!(!a.train.contains(s));
        }
    }

    #[test]
    fn presplit_layout() {
        let d = tempfile::tempdir().unwrap();
        for c in ["a", "b"] {
            touch(&d.path().join(format!("train/{c}/1.jpg")));
            touch(&d.path().join(format!("val/{c}/2.jpg")));
        }
        let ds = scan(d.path(), 0.5, 0).unwrap();
        assert!(ds.presplit);
        assert_eq!(ds.train.len(), 2);
        assert_eq!(ds.val.len(), 2);
    }

    fn write(p: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn extra_folders_join_classes_add_new_ones_and_skip_duplicates() {
        let d = tempfile::tempdir().unwrap();
        let (base, cap, more) = (d.path().join("base"), d.path().join("cap"), d.path().join("more"));
        for i in 0..5 {
            write(&base.join(format!("red/{i}.png")), format!("red {i}").as_bytes());
            write(&base.join(format!("green/{i}.png")), format!("green {i}").as_bytes());
        }
        // Captures: a duplicate of a base image, reviewed and unreviewed
        // frames, a plain image without a sidecar, a new class.
        write(&cap.join("red/a.jpg"), b"red 0");
        write(&cap.join("red/b.jpg"), b"red new");
        write(&cap.join("red/b.json"), br#"{"label":"red","reviewed":false}"#);
        write(&cap.join("green/c.jpg"), b"green new");
        write(&cap.join("green/c.json"), br#"{"reviewed":true}"#);
        for i in 0..3 {
            write(&cap.join(format!("blue/{i}.jpg")), format!("blue {i}").as_bytes());
            write(&cap.join(format!("blue/{i}.json")), br#"{"reviewed":true}"#);
        }
        write(&more.join("blue/x.jpg"), b"blue 0");
        write(&more.join("blue/y.jpg"), b"blue y");
        std::fs::create_dir_all(cap.join("empty")).unwrap();
        let ds = scan(&base, 0.2, 3).unwrap();
        let extra = [cap.clone(), more.clone()];

        let (m, r) = merge_extra(ds.clone(), &extra, true, 0.2, 3).unwrap();
        assert_eq!(m.classes, ["blue", "green", "red"]);
        assert_eq!(r.new_classes, ["blue"]);
        assert_eq!((r.added, r.duplicates, r.unreviewed), (5, 2, 1), "{r:?}");
        assert_eq!(m.counts(&m.train), [3, 5, 4]);
        assert_eq!(m.counts(&m.val), [1, 1, 1]);
        // Old samples keep their class under the new numbering.
        for s in m.train.iter().chain(&m.val) {
            let class = &m.classes[s.label];
            assert!(s.path.parent().unwrap().ends_with(class), "{s:?}");
        }
        assert!(!m.train.iter().chain(&m.val).any(|s| s.path.extension().unwrap() == "json"));
        assert_eq!(m, merge_extra(ds.clone(), &extra, true, 0.2, 3).unwrap().0, "seeded");

        let (_, r) = merge_extra(ds.clone(), &extra, false, 0.2, 3).unwrap();
        assert_eq!((r.added, r.duplicates, r.unreviewed), (6, 2, 0), "{r:?}");

        write(&cap.join("green/c.json"), b"{not json");
        let err = merge_extra(ds, &extra, true, 0.2, 3).unwrap_err().to_string();
        assert!(err.contains("c.json"), "{err}");
    }

    #[test]
    fn refuses_empty_and_single_class_datasets() {
        let d = tempfile::tempdir().unwrap();
        assert!(scan(d.path(), 0.2, 0).unwrap_err().to_string().contains("0 class folder"));
        touch(&d.path().join("only/1.jpg"));
        assert!(scan(d.path(), 0.2, 0).unwrap_err().to_string().contains("1 class folder"));
        std::fs::create_dir_all(d.path().join("empty")).unwrap();
        let err = scan(d.path(), 0.2, 0).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("no image files"), "{err}");
        assert!(scan(&d.path().join("missing"), 0.2, 0).is_err());
    }
}
