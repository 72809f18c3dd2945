//! PNG figures: panels of images with captions, grids of feature maps.
//!
//! Text is drawn with plotters' pure-Rust `ab_glyph` backend and the DejaVu
//! Sans font of Debian's `fonts-dejavu-core` (on every Debian/Ubuntu
//! desktop and on this project's machines), found at run time.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use plotters::prelude::*;

/// Where DejaVu Sans is looked for.
pub const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
];

/// Registers the font once; the error names the package to install.
pub fn ensure_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var("TERN_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| {
                format!("no font for figure captions: install Debian's fonts-dejavu-core or set TERN_FONT to a .ttf (looked in {FONT_PATHS:?})")
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path}: not a usable TrueType font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `panels` side by side, each `scale` times its size, with its
/// caption lines underneath, and an optional title on top.
pub fn panels_png(path: &Path, title: &str, panels: &[(RgbImage, Vec<String>)], scale: u32) -> Result<()> {
    ensure_font()?;
    let pad = 12u32;
    let line = 20u32;
    let lines = panels.iter().map(|(_, c)| c.len()).max().unwrap_or(0) as u32;
    let tile_w = panels.iter().map(|(i, _)| i.width() * scale).max().unwrap_or(1);
    let tile_h = panels.iter().map(|(i, _)| i.height() * scale).max().unwrap_or(1);
    let top = if title.is_empty() { pad } else { pad + line + 6 };
    let w = pad + panels.len() as u32 * (tile_w + pad);
    let h = top + tile_h + pad + lines * line + pad;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let font = ("sans-serif", 16).into_font();
    if !title.is_empty() {
        root.draw_text(title, &("sans-serif", 18).into_font().color(&BLACK), (pad as i32, pad as i32)).map_err(draw_err)?;
    }
    for (k, (img, caption)) in panels.iter().enumerate() {
        let x0 = pad + k as u32 * (tile_w + pad);
        blit(&root, img, x0, top, scale)?;
        for (j, text) in caption.iter().enumerate() {
            let y = top + tile_h + pad / 2 + j as u32 * line;
            root.draw_text(text, &font.color(&BLACK), (x0 as i32, y as i32)).map_err(draw_err)?;
        }
    }
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Draws `tiles` (all the same size) in a grid of `cols` columns, `scale`
/// times their size, under a title.
pub fn grid_png(path: &Path, title: &str, tiles: &[RgbImage], cols: usize, scale: u32) -> Result<()> {
    ensure_font()?;
    let cols = cols.max(1);
    let rows = tiles.len().div_ceil(cols).max(1);
    let (tw, th) = tiles.first().map_or((1, 1), |t| (t.width() * scale, t.height() * scale));
    let gap = 2u32;
    let top = 34u32;
    let w = gap + cols as u32 * (tw + gap);
    let h = top + rows as u32 * (th + gap) + gap;
    let title_w = 12 + 10 * title.chars().count() as u32;
    let root = BitMapBackend::new(path, (w.max(title_w), h)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    root.draw_text(title, &("sans-serif", 18).into_font().color(&BLACK), (6, 8)).map_err(draw_err)?;
    for (i, t) in tiles.iter().enumerate() {
        let x = gap + (i % cols) as u32 * (tw + gap);
        let y = top + (i / cols) as u32 * (th + gap);
        blit(&root, t, x, y, scale)?;
    }
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn blit(root: &DrawingArea<BitMapBackend, plotters::coord::Shift>, img: &RgbImage, x0: u32, y0: u32, scale: u32) -> Result<()> {
    let scaled;
    let img = if scale > 1 {
        scaled = image::imageops::resize(img, img.width() * scale, img.height() * scale, image::imageops::FilterType::Nearest);
        &scaled
    } else {
        img
    };
    for (x, y, p) in img.enumerate_pixels() {
        root.draw_pixel(((x0 + x) as i32, (y0 + y) as i32), &RGBColor(p[0], p[1], p[2])).map_err(draw_err)?;
    }
    Ok(())
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}
