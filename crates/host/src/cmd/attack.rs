//! `tern-host attack IMAGE --target LABEL`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tern_host::pretrained::class_index;
use tern_host::viz::{argmax, attack, pixels, to_rgb, AttackOptions, Differentiable};
use tern_model_format::preprocess::open_image;

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
    #[command(flatten)]
    model: super::model_args::ModelArgs,
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
    println!(
        "{}",
        serde_json::json!({
            "image": a.image, "adversarial": adv_path, "steps": r.steps, "linf_255": r.linf * 255.0,
            "before": {"index": b, "label": labels[b], "probability": r.before[b]},
            "after": {"index": f, "label": labels[f], "probability": r.after[f]},
            "target": target.map(|t| serde_json::json!({"index": t, "label": labels[t],
                "before": r.before[t], "after": r.after[t]})),
        })
    );
    Ok(())
}
