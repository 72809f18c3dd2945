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

use std::path::{Path, PathBuf};

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
