//! `tern-host attack IMAGE --target LABEL`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tern_host::pretrained::class_index;
use tern_host::viz::{argmax, attack, pixels, to_rgb, AttackOptions, Differentiable};
use tern_model_format::preprocess::open_image;
use tern_model_format::report::ClassifyLine;

/// Arguments of `attack`.
#[derive(clap::Args)]
pub struct Args {
    /// The photo to perturb.
    image: PathBuf,
    /// Class to reach (index or label); without it, any other class.
    #[arg(long)]
    target: Option<String>,
    /// L∞ budget in 8-bit steps (8 = 8/255).
    #[arg(long, default_value_t = 8)]
    eps: u8,
    /// Maximum sign-gradient steps.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Step size in 8-bit steps.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Folder for `attack.png` (side by side) and `adversarial.png`.
    #[arg(long, default_value = "attack")]
    out_dir: PathBuf,
    /// Bundles (float, int8…) to run the adversarial PNG through with
    /// tern-device, the device's code path: does the attack survive export
    /// and quantization?
    #[arg(long, value_delimiter = ',')]
    check: Vec<PathBuf>,
    /// The tern-device binary for `--check` (default: $TERN_DEVICE_BIN,
    /// then beside tern-host, then PATH).
    #[arg(long)]
    device_bin: Option<PathBuf>,
    #[command(flatten)]
    model: super::model_args::ModelArgs,
}

/// Top-1 `(index, label, probability)` of `image` under `bundle`, by
/// tern-device.
fn device_top1(bin: &std::path::Path, bundle: &std::path::Path, image: &std::path::Path) -> Result<(u64, String, f64)> {
    let out = std::process::Command::new(bin)
        .args(["classify", "--json", "--top-k", "1"])
        .arg(bundle)
        .arg(image)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} classify {} failed: {}",
            bin.display(),
            bundle.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line: ClassifyLine = serde_json::from_slice(&out.stdout).context("bad output from tern-device")?;
    let top = line.top.into_iter().next().context("tern-device classify printed no top label")?;
    Ok((top.index as u64, top.label, f64::from(top.probability)))
}

/// Runs the attack, writes the figures, prints a JSON summary.
pub fn run(a: Args) -> Result<()> {
    let net = a.model.load()?;
    let labels = net.labels().to_vec();
    let target = a.target.as_deref().map(|t| class_index(&labels, t)).transpose()?;
    let img = open_image(&a.image).with_context(|| format!("cannot read {}", a.image.display()))?;
    let x0 = pixels(&img, &net.preprocessing(), net.device());
    let r = attack(&net, &x0, &AttackOptions { target, eps: a.eps, steps: a.steps, alpha: a.alpha })?;
    std::fs::create_dir_all(&a.out_dir).with_context(|| format!("cannot create {}", a.out_dir.display()))?;
    let (b, f) = (argmax(&r.before), argmax(&r.after));
    let amplify = 0.5 / (r.linf.max(1.0 / 255.0));
    let delta = (&r.pixels - &x0) * amplify + 0.5;
    let adv_path = a.out_dir.join("adversarial.png");
    let adv = to_rgb(&r.pixels)?;
    adv.save(&adv_path).with_context(|| format!("cannot write {}", adv_path.display()))?;
    let panels = vec![
        (to_rgb(&x0)?, vec!["original".into(), format!("{}: {:.3}", labels[b], r.before[b])]),
        (to_rgb(&delta)?, vec![format!("perturbation x{amplify:.0}"), format!("L∞ = {:.0}/255", r.linf * 255.0)]),
        (adv, vec!["adversarial".into(), format!("{}: {:.3}", labels[f], r.after[f])]),
    ];
    let title = match target {
        Some(t) => format!("targeted attack → {} in {} steps", labels[t], r.steps),
        None => format!("untargeted attack in {} steps", r.steps),
    };
    tern_host::plot::panels_png(&a.out_dir.join("attack.png"), &title, &panels, 1)?;
    let bin = super::eval::device_bin(a.device_bin.clone());
    let mut checks = Vec::new();
    for bundle in &a.check {
        let (index, label, p) = device_top1(&bin, bundle, &adv_path)?;
        let survives = index == f as u64;
        eprintln!(
            "{}: the adversarial image reads as {label} ({p:.3}): the attack {}",
            bundle.display(),
            if survives { "survives" } else { "does not survive" }
        );
        checks.push(serde_json::json!({"bundle": bundle, "index": index, "label": label, "probability": p, "survives": survives}));
    }
    println!(
        "{}",
        serde_json::json!({
            "image": a.image, "adversarial": adv_path, "steps": r.steps, "linf_255": r.linf * 255.0,
            "before": {"index": b, "label": labels[b], "probability": r.before[b]},
            "after": {"index": f, "label": labels[f], "probability": r.after[f]},
            "target": target.map(|t| serde_json::json!({"index": t, "label": labels[t],
                "before": r.before[t], "after": r.after[t]})),
            "device": checks,
        })
    );
    Ok(())
}
