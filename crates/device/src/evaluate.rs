//! Accuracy of a bundle on a labelled ImageFolder, on the device's own code
//! path (the shared preprocessing, tract).

use std::path::PathBuf;

use anyhow::{bail, Result};
use tern_model_format::dataset::Sample;
use tern_model_format::preprocess::open_image;

use crate::Classifier;

/// The result for one image (the line `eval --json` prints).
pub use tern_model_format::report::Prediction as ImageResult;

/// Checks that the data set's classes are the bundle's labels, in order.
pub fn check_labels(clf: &Classifier, classes: &[String]) -> Result<()> {
    let labels = &clf.manifest().labels;
    if labels != classes {
        bail!("the data set's classes {classes:?} are not the bundle's labels {labels:?} (same names, same order)");
    }
    Ok(())
}

/// Classifies every sample; `each` sees every result as it comes. Files
/// that cannot be read are returned with the reason, not fatal.
pub fn evaluate(
    clf: &mut Classifier,
    samples: &[Sample],
    mut each: impl FnMut(&ImageResult),
) -> Result<(Vec<ImageResult>, Vec<(PathBuf, String)>)> {
    let mut results = Vec::with_capacity(samples.len());
    let mut skipped = Vec::new();
    for s in samples {
        let img = match open_image(&s.path) {
            Ok(img) => img,
            Err(e) => {
                skipped.push((s.path.clone(), e.to_string()));
                continue;
            }
        };
        let out = clf.classify(&img)?;
        let probabilities = clf.label_probabilities(&out);
        // Ties go to the lower index, as in `engine::rank`.
        let predicted = probabilities.iter().enumerate().fold(0, |b, (k, v)| if *v > probabilities[b] { k } else { b });
        let r = ImageResult { path: s.path.clone(), label: s.label, predicted, probabilities };
        each(&r);
        results.push(r);
    }
    Ok((results, skipped))
}
