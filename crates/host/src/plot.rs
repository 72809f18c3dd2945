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

/// The confusion matrix as a heat map: rows are true classes, columns
/// predictions, each cell shaded by its share of the row and labelled with
/// its count.
pub fn confusion_png(path: &Path, title: &str, labels: &[String], confusion: &[Vec<usize>]) -> Result<()> {
    ensure_font()?;
    let n = labels.len().max(1);
    let cell = if n <= 10 { 56u32 } else { (560 / n as u32).max(14) };
    let label_w = 12 + 8 * labels.iter().map(|l| l.chars().count()).max().unwrap_or(4).min(24) as u32;
    let col_h = 8 + 7 * labels.iter().map(|l| l.chars().count()).max().unwrap_or(4).min(24) as u32;
    let (left, top) = (label_w, 56 + col_h);
    let w = left + n as u32 * cell + 20;
    let h = top + n as u32 * cell + 40;
    let root = BitMapBackend::new(path, (w.max(360), h)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let black = |size| ("sans-serif", size).into_font().color(&BLACK);
    root.draw_text(title, &black(18), (6, 8)).map_err(draw_err)?;
    root.draw_text("rows: true class; columns: predicted", &black(13), (6, 34)).map_err(draw_err)?;
    let rotated = ("sans-serif", 13).into_font().transform(FontTransform::Rotate270).color(&BLACK);
    for (c, label) in labels.iter().enumerate() {
        let name: String = label.chars().take(24).collect();
        let x = (left + c as u32 * cell + cell / 2) as i32 - 7;
        root.draw_text(&name, &rotated, (x, (top - 6) as i32)).map_err(draw_err)?;
    }
    for (r, row) in confusion.iter().enumerate().take(n) {
        let total = row.iter().sum::<usize>().max(1) as f64;
        let name: String = labels.get(r).map(|l| l.chars().take(24).collect()).unwrap_or_default();
        let y = (top + r as u32 * cell) as i32;
        root.draw_text(&name, &black(13), (6, y + cell as i32 / 2 - 7)).map_err(draw_err)?;
        for (c, &v) in row.iter().enumerate().take(n) {
            let share = v as f64 / total;
            let shade = (255.0 - share * 200.0) as u8;
            let color = if r == c { RGBColor(shade, 255 - (255 - shade) / 4, shade) } else { RGBColor(255, shade, shade) };
            let x = (left + c as u32 * cell) as i32;
            root.draw(&Rectangle::new([(x, y), (x + cell as i32 - 1, y + cell as i32 - 1)], color.filled()))
                .map_err(draw_err)?;
            if cell >= 28 {
                root.draw_text(&v.to_string(), &black(13), (x + 4, y + cell as i32 / 2 - 7)).map_err(draw_err)?;
            }
        }
    }
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Training curves: loss (left) and accuracy (right) per epoch, training
/// and validation. `series` holds `(epoch, train_loss, val_loss,
/// train_accuracy, val_accuracy)`.
pub fn curves_png(path: &Path, title: &str, series: &[(usize, f64, f64, f64, f64)]) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(draw_err)?;
    let (l, r) = root.split_horizontally(500);
    let last = series.last().map_or(1, |s| s.0).max(2);
    let max_loss = series.iter().map(|s| s.1.max(s.2)).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let min_acc = series.iter().map(|s| s.3.min(s.4)).fold(1.0f64, f64::min).min(0.9).max(0.0);
    for (area, caption, range, pick) in [
        (&l, "loss", 0.0..max_loss, 0usize),
        (&r, "accuracy", (min_acc - 0.02).max(0.0)..1.0, 1usize),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(1usize..last, range)
            .map_err(draw_err)?;
        chart.configure_mesh().x_desc("epoch").draw().map_err(draw_err)?;
        let train: Vec<(usize, f64)> = series.iter().map(|s| (s.0, if pick == 0 { s.1 } else { s.3 })).collect();
        let val: Vec<(usize, f64)> = series.iter().map(|s| (s.0, if pick == 0 { s.2 } else { s.4 })).collect();
        chart
            .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
            .map_err(draw_err)?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(val, RED.stroke_width(2)))
            .map_err(draw_err)?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw().map_err(draw_err)?;
    }
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
