//! `tern-host dream --class LABEL_OR_INDEX`.

use std::path::PathBuf;

use anyhow::Result;
use tern_host::pretrained::class_index;
use tern_host::viz::{dream, to_rgb, Differentiable, DreamOptions};

/// Arguments of `dream`.
#[derive(clap::Args)]
pub struct Args {
    /// The class: an index or a label.
    #[arg(long)]
    class: String,
    /// The PNG to write.
    #[arg(long, default_value = "dream.png")]
    out: PathBuf,
    /// Gradient steps.
    #[arg(long, default_value_t = DreamOptions::default().steps)]
    steps: usize,
    /// Learning rate.
    #[arg(long, default_value_t = DreamOptions::default().lr)]
    lr: f64,
    /// Weight of the total-variation penalty (0: none).
    #[arg(long, default_value_t = DreamOptions::default().tv_weight)]
    tv_weight: f64,
    /// Random shift per step, in pixels.
    #[arg(long, default_value_t = DreamOptions::default().jitter)]
    jitter: i64,
    /// Blur every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    blur_every: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[command(flatten)]
    model: super::model_args::ModelArgs,
}

/// Runs the ascent and writes the image with its probability.
pub fn run(a: Args) -> Result<()> {
    let net = a.model.load()?;
    let class = class_index(net.labels(), &a.class)?;
    let o = DreamOptions { steps: a.steps, lr: a.lr, tv_weight: a.tv_weight, jitter: a.jitter, blur_every: a.blur_every, seed: a.seed };
    let d = dream(&net, class, &o)?;
    let caption = vec![
        format!("{} (class {class})", net.labels()[class]),
        format!("p = {:.3}, TV = {:.4}", d.probability, d.total_variation),
        format!("{} steps, tv weight {}", o.steps, o.tv_weight),
    ];
    tern_host::plot::panels_png(&a.out, "", &[(to_rgb(&d.pixels)?, caption)], 2)?;
    println!(
        "{}",
        serde_json::json!({"out": a.out, "class": class, "label": net.labels()[class],
            "probability": d.probability, "total_variation": d.total_variation})
    );
    Ok(())
}
