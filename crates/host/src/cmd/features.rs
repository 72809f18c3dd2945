//! `tern-host features IMAGE --layers ...`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tern_host::viz::{feature_maps, normalize, pixels, Differentiable};
use tern_model_format::preprocess::open_image;

/// Arguments of `features`.
#[derive(clap::Args)]
pub struct Args {
    /// The photo.
    image: PathBuf,
    /// Layers: `stem`, `block.0` … `block.15`, `head`.
    #[arg(long, value_delimiter = ',', default_value = "stem,block.5,block.12")]
    layers: Vec<String>,
    /// Folder for `features-<layer>.png`.
    #[arg(long, default_value = "features")]
    out_dir: PathBuf,
    #[command(flatten)]
    model: super::model_args::ModelArgs,
}

/// Writes one grid per layer and prints the strongest channels.
pub fn run(a: Args) -> Result<()> {
    let net = a.model.load()?;
    let img = open_image(&a.image).with_context(|| format!("cannot read {}", a.image.display()))?;
    let pre = net.preprocessing();
    let x = normalize(&pixels(&img, &pre, net.device()), &pre);
    std::fs::create_dir_all(&a.out_dir).with_context(|| format!("cannot create {}", a.out_dir.display()))?;
    for maps in feature_maps(net.backbone(), &x, &a.layers)? {
        let path = a.out_dir.join(format!("features-{}.png", maps.layer));
        let cols = (maps.tiles.len() as f64).sqrt().ceil() as usize;
        let scale = (96 / maps.size.1.max(1)).clamp(1, 8) as u32;
        let top: Vec<String> = maps.strongest.iter().take(6).map(|(c, m)| format!("#{c} ({m:.2})")).collect();
        let title = format!(
            "{} — {}: {} channels, {}x{}; strongest: {}",
            a.image.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            maps.layer,
            maps.tiles.len(),
            maps.size.0,
            maps.size.1,
            top.join(" ")
        );
        tern_host::plot::grid_png(&path, &title, &maps.tiles, cols, scale)?;
        println!("{}: {} channels {}x{}, strongest {}", path.display(), maps.tiles.len(), maps.size.0, maps.size.1, top.join(", "));
    }
    Ok(())
}
