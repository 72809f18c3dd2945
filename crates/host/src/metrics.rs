//! Classification metrics: accuracy, per-class precision and recall, the
//! confusion matrix.

use serde::{Deserialize, Serialize};

/// Precision and recall of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// The class.
    pub label: String,
    /// Correct predictions of this class / all predictions of it (0 when
    /// it was never predicted).
    pub precision: f64,
    /// Correct predictions of this class / its samples.
    pub recall: f64,
    /// Samples of this class.
    pub support: usize,
}

/// Metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Fraction of samples predicted correctly.
    pub accuracy: f64,
    /// Samples evaluated.
    pub samples: usize,
    /// Per class, in label order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

impl Metrics {
    /// Metrics of `predicted` against `truth` (label indices below
    /// `labels.len()`; others are ignored).
    pub fn new(labels: &[String], truth: &[usize], predicted: &[usize]) -> Metrics {
        let n = labels.len();
        let mut confusion = vec![vec![0usize; n]; n];
        let mut samples = 0;
        let mut correct = 0;
        for (&t, &p) in truth.iter().zip(predicted) {
            if t < n && p < n {
                confusion[t][p] += 1;
                samples += 1;
                correct += usize::from(t == p);
            }
        }
        let per_class = (0..n)
            .map(|c| {
                let support: usize = confusion[c].iter().sum();
                let predicted_c: usize = confusion.iter().map(|row| row[c]).sum();
                let tp = confusion[c][c];
                ClassMetrics {
                    label: labels[c].clone(),
                    precision: ratio(tp, predicted_c),
                    recall: ratio(tp, support),
                    support,
                }
            })
            .collect();
        Metrics { accuracy: ratio(correct, samples), samples, per_class, confusion }
    }

    /// A text table: accuracy, precision/recall per class, the matrix.
    pub fn table(&self) -> String {
        let mut s = format!("accuracy {:.2}% on {} images\n", self.accuracy * 100.0, self.samples);
        let width = self.per_class.iter().map(|c| c.label.chars().count()).max().unwrap_or(5).max(5);
        s += &format!("{:>width$}  precision  recall  support\n", "class");
        for c in &self.per_class {
            s += &format!("{:>width$}  {:>9.3}  {:>6.3}  {:>7}\n", c.label, c.precision, c.recall, c.support);
        }
        s += "confusion matrix (rows: true class, columns: predicted)\n";
        for (c, row) in self.per_class.iter().zip(&self.confusion) {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
            s += &format!("{:>width$} {}\n", c.label, cells.join(""));
        }
        s
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ratios() {
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let truth = [0, 0, 0, 1, 1, 2];
        let pred = [0, 0, 1, 1, 2, 2];
        let m = Metrics::new(&labels, &truth, &pred);
        assert_eq!(m.samples, 6);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(m.confusion, vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
        assert!((m.per_class[0].precision - 1.0).abs() < 1e-12);
        assert!((m.per_class[0].recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.per_class[1].precision - 0.5).abs() < 1e-12);
        assert!((m.per_class[2].precision - 0.5).abs() < 1e-12);
        assert_eq!(m.per_class[2].support, 1);
        assert!(m.table().contains("accuracy 66.67% on 6 images"));
    }

    #[test]
    fn never_predicted_class_has_zero_precision() {
        let labels: Vec<String> = ["x", "y"].map(String::from).to_vec();
        let m = Metrics::new(&labels, &[0, 1], &[0, 0]);
        assert_eq!(m.per_class[1].precision, 0.0);
        assert_eq!(m.per_class[1].recall, 0.0);
        assert_eq!(m.accuracy, 0.5);
    }
}
